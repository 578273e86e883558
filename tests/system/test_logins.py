"""Who may log in how and from where: certificate-only users, per-user allowed sources, and unmapped
client certificates refused — through the real proxy, real TLS and a real Redis."""

from __future__ import annotations

import contextlib
import datetime
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from redisguard.commands.table import CommandTable
from redisguard.config.load import load_config
from redisguard.config.model import ConfigError
from redisguard.policy.decide import LoginRules, Policy, Shared
from redisguard.session.machine import Session
from tests.helpers import ProxyProc, RedisProc, raw_exchange, scrape, start_proxy
from tests.system.test_tls_policy import _config, ask, client_cert, tls_connect

WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
USERS = """\
user default off
user svc-app on nopass ~* +@all
user svc-db on >db-pw ~* +@all
user carol on >carol-pw ~* +@all
user bob on >bob-pw ~* +@all
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    d = tmp_path_factory.mktemp("logins")
    users = d / "users.acl"
    users.write_text(USERS)
    p = start_proxy(d, certs, users, redis_server.port, tls_listener='unmapped_cert = "refuse"',
                    acl='cert_only = ["svc-*"]\n'
                        'user_sources = { carol = ["10.0.0.0/8"], bob = ["127.0.0.1/32", "::1/128"] }')  # fmt: skip
    yield p
    p.stop()


def audit(p: ProxyProc, event: str) -> list[dict[str, object]]:
    return [e for line in p.log.read_text().splitlines() if line.startswith("{") and (e := json.loads(line))["event"] == event]


def failures(p: ProxyProc, reason: str) -> float:
    return scrape(p.metrics_port).get(f'redisguard_auth_failures_total{{listener="local",reason="{reason}"}}', 0.0)


def test_cert_only_users_cannot_log_in_with_a_password(guarded: ProxyProc) -> None:
    before = failures(guarded, "cert_only")
    # nopass, a right password, HELLO's AUTH: each is Redis's WRONGPASS, byte for byte
    out = raw_exchange(guarded.plain_port, b"AUTH svc-app anything\r\nAUTH svc-db db-pw\r\nHELLO 3 AUTH svc-db db-pw\r\n"
                       b"PING\r\nAUTH bob bob-pw\r\nPING\r\n")  # fmt: skip
    assert out == WRONGPASS * 3 + b"-NOAUTH Authentication required.\r\n+OK\r\n+PONG\r\n"
    assert failures(guarded, "cert_only") == before + 3
    events = [e for e in audit(guarded, "auth_failure") if e["reason"] == "cert_only"]
    assert {e["user"] for e in events} >= {"svc-app", "svc-db"}
    assert all("db-pw" not in json.dumps(e) for e in events)


def test_cert_only_user_logs_in_with_its_certificate(guarded: ProxyProc, certs: Path, tmp_path: Path) -> None:
    cert = client_cert(certs, "svc-app", tmp_path)
    with tls_connect(guarded.tls_port, certs, cert[:2]) as s:
        assert ask(s, b"ACL WHOAMI\r\n") == b"$7\r\nsvc-app\r\n"
        assert ask(s, b"SET k v\r\n") == b"+OK\r\n"
        assert ask(s, b"AUTH svc-app x\r\n") == WRONGPASS  # ... still not by password


def test_user_sources(guarded: ProxyProc, certs: Path, tmp_path: Path) -> None:
    before = failures(guarded, "source_not_allowed")
    # carol may log in from 10.0.0.0/8 only: the right password from 127.0.0.1 is a WRONGPASS
    assert raw_exchange(guarded.plain_port, b"AUTH carol carol-pw\r\nHELLO 2 AUTH carol carol-pw\r\n") == WRONGPASS * 2
    assert failures(guarded, "source_not_allowed") == before + 2
    assert raw_exchange(guarded.plain_port, b"AUTH bob bob-pw\r\n") == b"+OK\r\n"  # bob's list has 127.0.0.1
    assert any(e["reason"] == "source_not_allowed" and e["user"] == "carol" for e in audit(guarded, "auth_failure"))
    # ... and by certificate: it names a user, so the connection stays, but not logged in
    cert = client_cert(certs, "carol", tmp_path)
    with tls_connect(guarded.tls_port, certs, cert[:2]) as s:
        assert ask(s, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"
    assert any(e["reason"] == "source_not_allowed" and e.get("tls_identity") == "carol"
               for e in audit(guarded, "auth_failure"))  # fmt: skip


def test_unmapped_certificate_is_refused(guarded: ProxyProc, proxy: ProxyProc, certs: Path, tmp_path: Path) -> None:
    def closed_after_handshake(cert: tuple[Path, Path]) -> list[dict[str, object]]:
        """The proxy closes the connection before anything is sent; the audit events it logged."""
        before = len(audit(guarded, "auth_failure"))
        with tls_connect(guarded.tls_port, certs, cert, ssl.TLSVersion.TLSv1_2) as s, \
                contextlib.suppress(ConnectionError, ssl.SSLError):  # fmt: skip
            s.settimeout(5)
            assert s.recv(100) == b""
        deadline = time.monotonic() + 5
        while len(audit(guarded, "auth_failure")) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return [e for e in audit(guarded, "auth_failure")[before:] if e["reason"] == "unmapped_cert"]

    cert = client_cert(certs, "nobody", tmp_path)
    (event,) = closed_after_handshake(cert[:2])
    assert event["tls_identity"] == "nobody" and event["listener"] == "tls"
    (event,) = closed_after_handshake(nameless_cert(certs, tmp_path))  # a verified certificate with no CN at all
    assert event["tls_identity"] == ""
    # without a client certificate the listener still lets the client AUTH
    with tls_connect(guarded.tls_port, certs) as s:
        assert ask(s, b"AUTH bob bob-pw\r\n") == b"+OK\r\n"
    # the default, unmapped_cert = "default": the connection goes on as the default user
    with tls_connect(proxy.tls_port, certs, cert[:2]) as s:
        assert ask(s, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"


def nameless_cert(certs: Path, out: Path) -> tuple[Path, Path]:
    """A client certificate from the dev CA whose subject has no common name."""
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)  # (the dev CA's: cli/certs.py)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem, key_path = out / "nameless.pem", out / "nameless.key"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return pem, key_path


def test_login_rules_sources_pure() -> None:
    import ipaddress

    rules = LoginRules((b"svc-*", b"ops-[ab]"), {"u": (ipaddress.ip_network("10.0.0.0/8"), "unix"),
                                                  "v": (ipaddress.ip_network("2001:db8::/32"),)})  # fmt: skip
    assert rules.refusal("svc-x", "10.1.1.1", "password") == "cert_only"
    assert rules.refusal("svc-x", "10.1.1.1", "client_cert") == ""
    assert rules.refusal("ops-a", "1.1.1.1", "password") == "cert_only" and rules.refusal("ops-c", "1.1.1.1", "password") == ""
    assert rules.refusal("u", "10.9.9.9", "password") == "" and rules.refusal("u", "unix", "password") == ""
    assert rules.refusal("u", "::ffff:10.0.0.1", "password") == ""  # IPv4-mapped counts as IPv4
    assert rules.refusal("u", "11.0.0.1", "password") == "source_not_allowed"
    assert rules.refusal("v", "unix", "password") == "source_not_allowed"
    assert rules.refusal("v", "2001:db8::1", "password") == "" and rules.refusal("other", "1.2.3.4", "password") == ""


@pytest.mark.parametrize(("peer", "address"), [("10.0.0.1:5000", "10.0.0.1"), ("::1:6000", "::1"), ("unix", "unix"),
                                               ("", "unix")])  # fmt: skip
def test_session_address(table: CommandTable, peer: str, address: str) -> None:
    from redisguard.acl import default_user

    s = Session(Shared(Policy(table, {"default": default_user(table)})), "test", peer)
    assert s.address == address


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    p = _config(tmp_path, "", acl='user_sources = { alice = ["300.0.0.0/8"] }')
    with pytest.raises(ConfigError, match=r"acl.user_sources.alice: not a CIDR network \(or \"unix\"\): '300.0.0.0/8'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"acl.cert_only: user name patterns"):
        load_config(_config(tmp_path, "", acl="cert_only = [1]"))
    with pytest.raises(ConfigError, match=r"upstream.identity: must be one of auto, service, mirror; got 'proxy'"):
        load_config(_config(tmp_path, "", upstream='identity = "proxy"'))


def test_check_config_warns_about_login_rules_that_name_nobody(tmp_path: Path) -> None:
    from redisguard.cli.main import config_warnings

    p = _config(tmp_path, "", acl='cert_only = ["svc-*", "ops-*"]\nuser_sources = { ghost = ["10.0.0.0/8"], alice = ["unix"] }')
    _, warnings = config_warnings(str(p), bind=False)
    assert "acl.user_sources: no user 'ghost' in the users file" in warnings
    assert "acl.cert_only: 'svc-*' matches no user in the users file" in warnings
    (users_file := tmp_path / "users.acl").write_text(users_file.read_text() + "user svc-a on nopass ~* +get\n")
    _, warnings = config_warnings(str(p), bind=False)
    no_way_in = "acl.cert_only: 'svc-a' may log in only with a client certificate, but no tls listener has cert_user"
    assert any(w.startswith(no_way_in) for w in warnings)
    assert not any("alice" in w for w in warnings if w.startswith("acl."))
