"""TLS policy per listener, against the real proxy with openssl s_client and Python's ssl: minimum
version, TLS 1.2 ciphers, the ECDH group, session tickets, a CRL (and its reload), and the config's
validation of each."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from redisguard.cli import certs as certs_mod
from redisguard.cli.preflight import crl_problem
from redisguard.config.load import load_config
from redisguard.config.model import ConfigError
from redisguard.transport.tls import OPENSSL
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, start_proxy


def s_client(port: int, *args: str, certs: Path) -> subprocess.CompletedProcess[str]:
    """openssl s_client against the proxy; stdin closed at once (it prints the handshake and quits)."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(certs / "ca.pem"),
                           "-servername", "localhost", *args],
                          input="", capture_output=True, text=True, timeout=30)  # fmt: skip


def handshake_ok(res: subprocess.CompletedProcess[str]) -> bool:
    return res.returncode == 0 and "Verify return code: 0 (ok)" in res.stdout and "Cipher is (NONE)" not in res.stdout


def client_cert(certs: Path, name: str, out: Path) -> tuple[Path, Path, x509.Certificate]:
    """A client certificate for ``name`` from the dev CA in ``certs``."""
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)  # (the dev CA's: cli/certs.py)
    key = certs_mod._key()
    cert = certs_mod._issue(name, key, ca, ca_key, 30, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem, key_path = out / f"{name}.pem", out / f"{name}.key"
    certs_mod._write_cert(pem, cert)
    certs_mod._write_key(key_path, key)
    return pem, key_path, cert


def write_crl(certs: Path, revoked: list[x509.Certificate], path: Path, next_update_days: float = 1) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)  # (the dev CA's: cli/certs.py)
    now = datetime.datetime.now(datetime.UTC)
    nxt = now + datetime.timedelta(days=next_update_days)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(min(now, nxt) - datetime.timedelta(minutes=5)).next_update(nxt))  # fmt: skip
    for cert in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                                      .revocation_date(now - datetime.timedelta(minutes=1)).build())  # fmt: skip
    crl = b.sign(ca_key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def tls_connect(port: int, certs: Path, cert: tuple[Path, Path] | None = None, version: ssl.TLSVersion | None = None
                ) -> ssl.SSLSocket:  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(*cert)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def ask(s: ssl.SSLSocket, cmd: bytes) -> bytes:
    s.sendall(cmd)
    return s.recv(4096)


Start = Callable[..., ProxyProc]  # start(listener settings, users file=...): a proxy with that [[listener]]


@pytest.fixture
def start(tmp_path: Path, certs: Path, users_file: Path, redis_server: RedisProc) -> Iterator[Start]:
    procs: list[ProxyProc] = []

    def run(listener: str, users: Path = users_file) -> ProxyProc:
        d = tmp_path / f"p{len(procs)}"
        d.mkdir()
        p = start_proxy(d, certs, users, redis_server.port, tls_listener=listener)
        procs.append(p)
        return p

    yield run
    for p in procs:
        p.stop()


def test_min_version_13_refuses_tls12(start: Start, certs: Path, proxy: ProxyProc) -> None:
    p = start('min_version = "1.3"')
    assert not handshake_ok(s_client(p.tls_port, "-tls1_2", certs=certs))
    res = s_client(p.tls_port, "-tls1_3", certs=certs)
    assert handshake_ok(res) and "TLSv1.3" in res.stdout
    assert handshake_ok(s_client(proxy.tls_port, "-tls1_2", certs=certs))  # the default: 1.2 still welcome


def test_tls12_ciphers_and_ecdh_curve(start: Start, certs: Path) -> None:
    p = start('ciphers = "ECDHE-ECDSA-AES256-GCM-SHA384"\necdh_curves = ["secp384r1"]')
    res = s_client(p.tls_port, "-tls1_2", certs=certs)
    assert handshake_ok(res) and "ECDHE-ECDSA-AES256-GCM-SHA384" in res.stdout
    assert "secp384r1" in res.stdout or "P-384" in res.stdout  # "Server Temp Key: ECDH, secp384r1, 384 bits"
    assert not handshake_ok(s_client(p.tls_port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", certs=certs))
    assert not handshake_ok(s_client(p.tls_port, "-tls1_2", "-groups", "prime256v1", certs=certs))
    assert not handshake_ok(s_client(p.tls_port, "-tls1_3", "-groups", "prime256v1", certs=certs))  # the group binds 1.3 too
    assert handshake_ok(s_client(p.tls_port, "-tls1_3", "-groups", "secp384r1", certs=certs))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_session_tickets_off(start: Start, certs: Path, proxy: ProxyProc, version: ssl.TLSVersion) -> None:
    def has_ticket(port: int) -> bool:
        with tls_connect(port, certs, version=version) as s:
            assert ask(s, b"PING\r\n").startswith(b"-NOAUTH")  # a reply: any post-handshake ticket has arrived
            assert s.session is not None
            return bool(s.session.has_ticket)

    assert has_ticket(proxy.tls_port)  # tickets are on by default
    p = start("session_tickets = false")
    assert not has_ticket(p.tls_port)
    if version == ssl.TLSVersion.TLSv1_2:  # and as openssl sees it
        assert "TLS session ticket lifetime hint" in s_client(proxy.tls_port, "-tls1_2", certs=certs).stdout
        assert "TLS session ticket lifetime hint" not in s_client(p.tls_port, "-tls1_2", certs=certs).stdout


def test_crl_refuses_a_revoked_client_certificate_and_is_reloaded(start: Start, certs: Path, tmp_path: Path) -> None:
    alice = client_cert(certs, "alice", tmp_path)
    bob = client_cert(certs, "bob", tmp_path)
    crl = tmp_path / "ca.crl"
    write_crl(certs, [bob[2]], crl)
    p = start(f'crl_file = "{crl}"')
    tls12 = ssl.TLSVersion.TLSv1_2  # the client certificate's verdict arrives in the handshake itself
    with tls_connect(p.tls_port, certs, alice[:2], tls12) as s:
        assert ask(s, b"ACL WHOAMI\r\n") == b"$5\r\nalice\r\n"

    def refused(cert: tuple[Path, Path], version: ssl.TLSVersion = tls12) -> bool:
        """The handshake fails and the proxy logs a bad client certificate (it closes without an alert)."""
        before = p.log.read_text().count('"bad_client_cert"')
        try:
            with tls_connect(p.tls_port, certs, cert, version) as s:
                assert ask(s, b"PING\r\n") == b""  # TLS 1.3: the verdict comes after the client's handshake
        except (ssl.SSLError, ConnectionError):
            pass
        deadline = time.monotonic() + 5
        while p.log.read_text().count('"bad_client_cert"') == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return p.log.read_text().count('"bad_client_cert"') > before

    assert refused(bob[:2])
    with tls_connect(p.tls_port, certs, None, tls12) as s:  # no certificate: no CRL to check (client_auth optional)
        assert ask(s, b"PING\r\n").startswith(b"-NOAUTH")
    # SIGHUP reloads the CRL with the certificates
    write_crl(certs, [alice[2], bob[2]], crl)
    os.kill(p.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while '"config_reloaded"' not in p.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused(alice[:2]) and refused(alice[:2], ssl.TLSVersion.TLSv1_3)


def test_expired_crl_is_a_check_config_error(certs: Path, tmp_path: Path) -> None:
    crl = tmp_path / "old.crl"
    write_crl(certs, [], crl, next_update_days=-1)
    problem = crl_problem(crl) or ""
    assert "expired" in problem and "every client certificate of that CA would be refused" in problem
    write_crl(certs, [], crl)
    assert crl_problem(crl) is None


def _config(tmp_path: Path, listener: str, acl: str = "", upstream: str = "", certs: Path | None = None) -> Path:
    d = certs or tmp_path
    (tmp_path / "users.acl").write_text(USERS_ACL)
    p = tmp_path / "rg.toml"
    p.write_text(f'[[listener]]\ntype = "tls"\naddress = "127.0.0.1:0"\ncert_file = "{d}/server.pem"\n'
                 f'key_file = "{d}/server.key"\n{listener}\n[upstream]\n{upstream}\n'
                 f'[acl]\nusers_file = "users.acl"\n{acl}\n')  # fmt: skip
    return p


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ('min_version = "1.1"', r"listener\[0\].min_version: must be one of 1.2, 1.3; got '1.1'"),
        ('ciphers = "NO-SUCH-CIPHER"', r"listener\[0\].ciphers: OpenSSL selects no cipher from 'NO-SUCH-CIPHER'"),
        ('ciphersuites = ["TLS_AES_256_GCM"]', r"listener\[0\].ciphersuites: not a TLS 1.3 cipher suite: 'TLS_AES_256_GCM'"),
        ('ciphersuites = ["TLS_AES_256_GCM_SHA384"]', r"listener\[0\].ciphersuites: Python's ssl module cannot choose TLS 1.3"),
        ('ecdh_curves = ["prime256v1", "secp384r1"]', r"listener\[0\].ecdh_curves: Python's ssl module can set one curve"),
        ('ecdh_curves = ["curve9000"]', r"listener\[0\].ecdh_curves: unknown elliptic curve 'curve9000'"),
        ('session_tickets = "no"', r"listener\[0\].session_tickets: expected bool"),
        ('crl_file = "x.crl"', r'listener\[0\].crl_file: a CRL checks client certificates: it needs client_auth'),
        ('unmapped_cert = "refuse"', r"listener\[0\].unmapped_cert: only means something with cert_user set"),
        ('unmapped_cert = "drop"', r"listener\[0\].unmapped_cert: must be one of default, refuse; got 'drop'"),
        ('min_versio = "1.3"', r"listener\[0\].min_versio: unknown option in \[\[listener\]\] \(did you mean min_version\?\)"),
    ],
)
def test_tls_policy_errors_name_the_key(tmp_path: Path, listener: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, listener), tls=OPENSSL)


def test_tls_policy_parsed_and_tcp_listeners_refuse_it(tmp_path: Path) -> None:
    suites = ", ".join(f'"{s}"' for s in reversed(OPENSSL.tls13_suites()))  # the fixed set, in any order, is accepted
    cfg = load_config(_config(tmp_path, f'min_version = "1.3"\nciphersuites = [{suites}]\nsession_tickets = false\n'
                              'ecdh_curves = ["secp384r1"]'), tls=OPENSSL)  # fmt: skip
    pol = cfg.listeners[0].tls_policy
    assert (pol.min_version, pol.session_tickets, pol.ecdh_curves) == ("1.3", False, ("secp384r1",))
    tcp = tmp_path / "tcp.toml"
    tcp.write_text('[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\nmin_version = "1.3"\n[acl]\nusers_file = "users.acl"\n')
    with pytest.raises(ConfigError, match=r"listener\[0\].min_version: only for a tls listener"):
        load_config(tcp, tls=OPENSSL)


def test_changed_tls_policy_is_named_by_its_keys(tmp_path: Path) -> None:
    from redisguard.runtime.reconfigure import changed_settings

    old = load_config(_config(tmp_path, ""), tls=OPENSSL)
    new = load_config(_config(tmp_path, 'min_version = "1.3"\necdh_curves = ["secp384r1"]', acl='cert_only = ["svc-*"]'),
                      tls=OPENSSL)
    assert changed_settings(old, new) == ["listener[0].min_version", "listener[0].ecdh_curves", "acl.cert_only"]
