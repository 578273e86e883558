"""Metrics, health endpoints, audit log, dashboard and alert rules, against a live redisguard."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard import fast
from redisguard.observe.metrics import parse_samples as samples
from redisguard.protocol.resp import encode_command
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, TLSClient, raw_exchange, read_until, start_proxy

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "config" / "prometheus"


def scrape(p: ProxyProc) -> str:
    body: bytes = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read()
    return body.decode()


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is required (apt-get install prometheus; bash .ci/run installs it)"
    return path


@pytest.fixture
def fresh(tmp_path: Path, certs: Path, redis_server: RedisProc) -> Iterator[tuple[ProxyProc, Path]]:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="audit_denied_per_second = 1000.0\n")
    yield p, users
    p.stop()


def test_exact_counters_after_scripted_traffic(fresh: tuple[ProxyProc, Path], certs: Path) -> None:
    p, _ = fresh
    cmds = [
        [b"PING"],  # noauth (user default)
        [b"AUTH", b"alice", b"bad"],  # wrong_password
        [b"AUTH", b"ghost", b"x"],  # unknown_user
        [b"AUTH", b"disabled", b"dis-pw"],  # disabled_user
        [b"AUTH", b"alice", b"alice-pw"],
        *[[b"SET", b"cache:%d" % i, b"v"] for i in range(5)],  # 5 allowed set
        *[[b"GET", b"cache:%d" % i] for i in range(3)],  # 3 allowed get
        *[[b"GET", b"secret:%d" % i] for i in range(4)],  # 4 denied get (key)
        [b"CLIENT", b"KILL", b"ID", b"1"],  # denied client|kill (command)
        [b"PUBLISH", b"other", b"m"],  # denied publish (channel)
        [b"FLUSHALL"],  # disabled
        [b"NOSUCH"],  # request error: unknown_command
        [b"GET"],  # request error: arity
    ]
    raw_exchange(p.plain_port, b"".join(encode_command(c) for c in cmds))
    raw_exchange(p.tls_port, b"GET x\r\n", expect_close=True)  # plaintext on TLS → handshake failure
    s = samples(scrape(p))
    want = {
        'redisguard_denied_commands_total{command="ping",mode="enforce",reason="noauth",user="default"}': 1,
        'redisguard_auth_failures_total{listener="local",reason="wrong_password"}': 1,
        'redisguard_auth_failures_total{listener="local",reason="unknown_user"}': 1,
        'redisguard_auth_failures_total{listener="local",reason="disabled_user"}': 1,
        'redisguard_auth_successes_total{listener="local",method="password"}': 1,
        'redisguard_commands_total{command="set",result="allowed",user="alice"}': 5,
        'redisguard_commands_total{command="get",result="allowed",user="alice"}': 3,
        'redisguard_commands_total{command="get",result="denied",user="alice"}': 4,
        'redisguard_denied_commands_total{command="get",mode="enforce",reason="key",user="alice"}': 4,
        'redisguard_denied_commands_total{command="client|kill",mode="enforce",reason="command",user="alice"}': 1,
        'redisguard_denied_commands_total{command="publish",mode="enforce",reason="channel",user="alice"}': 1,
        'redisguard_denied_commands_total{command="flushall",mode="enforce",reason="disabled",user="alice"}': 1,
        'redisguard_request_errors_total{reason="unknown_command"}': 1,
        'redisguard_request_errors_total{reason="arity"}': 1,
        'redisguard_connections_total{listener="local"}': 2,  # ours + start_proxy's readiness probe
        'redisguard_connections_active{listener="local"}': 0,
        "redisguard_upstream_up": 1,
    }
    for k, v in want.items():
        assert s.get(k) == v, (k, s.get(k))
    # ours (plaintext on the TLS port) + start_proxy's readiness probe (connect, close)
    assert sum(v for k, v in s.items() if k.startswith("redisguard_tls_handshake_failures_total")) == 2
    assert s['redisguard_tls_handshake_failures_total{listener="tls",reason="protocol"}'] == 1
    assert sum(v for k, v in s.items() if k.startswith("redisguard_auth_failures_total")) == 3
    build = [k for k in s if k.startswith("redisguard_build_info{")]
    assert len(build) == 1 and 'redis_version="7.0' in build[0] and f'fast_path="{fast.KERNEL}"' in build[0]
    assert s['redisguard_certificate_expiry_timestamp_seconds{cert="tls:server"}'] > time.time() + 300 * 86400
    assert not any("_created" in k for k in s)
    assert "127.0.0.1" not in scrape(p)  # no client addresses in labels


def test_health_endpoints(fresh: tuple[ProxyProc, Path]) -> None:
    p, _ = fresh
    base = f"http://127.0.0.1:{p.metrics_port}"
    assert urllib.request.urlopen(base + "/healthz").read() == b"ok\n"
    r = urllib.request.urlopen(base + "/readyz")
    assert r.status == 200 and r.read().startswith(b"ready")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nope")
    assert e.value.code == 404


def test_every_alert_names_its_runbook_section() -> None:
    """Each rule's runbook_url is a section of docs/alerts.md (GitHub's anchor of its heading)."""
    rules = (PROM / "redisguard-alerts.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    urls = re.findall(r'runbook_url: "docs/alerts.md#([\w-]+)"', rules)
    headings = re.findall(r"^## (.+)$", (REPO / "docs" / "alerts.md").read_text(), re.M)
    anchors = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-") for h in headings}
    assert len(urls) == len(alerts) == 11 and set(urls) <= anchors, (urls, anchors)
    assert all(url.startswith(a.lower()) for a, url in zip(alerts, urls, strict=True))


def test_promtool_check_metrics_on_a_real_scrape(fresh: tuple[ProxyProc, Path], tls_client: TLSClient) -> None:
    p, _ = fresh
    raw_exchange(p.plain_port, b"AUTH alice alice-pw\r\nGET cache:1\r\nGET x\r\n")
    res = subprocess.run([promtool(), "check", "metrics"], input=scrape(p), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rules_and_unit_tests() -> None:
    res = subprocess.run([promtool(), "check", "rules", "redisguard-alerts.yml"], cwd=PROM, capture_output=True, text=True)
    assert res.returncode == 0 and "SUCCESS: 11 rules found" in res.stdout, res.stdout + res.stderr
    res = subprocess.run([promtool(), "test", "rules", "redisguard-alerts.test.yml"], cwd=PROM, capture_output=True,
                         text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def _names_in(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\bredisguard_[a-z_]+", expr)}


def test_dashboard_and_alerts_use_only_real_metrics(fresh: tuple[ProxyProc, Path]) -> None:
    p, _ = fresh
    text = scrape(p)
    exported = set(re.findall(r"^# TYPE (redisguard_[a-z_]+) ", text, re.M))
    exported |= {n + "_total" for n in exported}
    dash = json.loads((REPO / "config" / "grafana" / "redisguard-dashboard.json").read_text())
    used: set[str] = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used |= _names_in(t["expr"])
    for var in dash["templating"]["list"]:
        used |= _names_in(json.dumps(var.get("query", "")))
    used |= _names_in((PROM / "redisguard-alerts.yml").read_text())
    assert used, "queries found"
    assert used <= exported, used - exported
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "user", "listener"}
    assert all(t["datasource"]["uid"] == "${datasource}" for pn in dash["panels"] for t in pn["targets"])


def test_audit_log_fields_and_no_secrets(fresh: tuple[ProxyProc, Path]) -> None:
    p, _ = fresh
    raw_exchange(p.plain_port, b"AUTH alice wrong-secret-123\r\nAUTH alice alice-pw\r\nSET secret:k topsecretvalue\r\n")
    time.sleep(0.3)
    text = p.log.read_text()
    assert "wrong-secret-123" not in text and "alice-pw" not in text and "topsecretvalue" not in text
    assert "svc-test-password" not in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    denied = [e for e in events if e["event"] == "command_denied"][-1]
    assert {k: denied[k] for k in ("user", "command", "reason", "listener")} == {
        "user": "alice", "command": "set", "reason": "key", "listener": "local",
    }  # fmt: skip
    assert denied["peer"].startswith("127.0.0.1:") and "tls_identity" in denied and "keys" not in denied
    fail = [e for e in events if e["event"] == "auth_failure"][-1]
    assert fail["reason"] == "wrong_password" and fail["user"] == "alice"
    assert any(e["event"] == "connection_accepted" for e in events)
    assert any(e["event"] == "redisguard_started" for e in events)


def test_denied_flood_is_rate_limited(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="audit_denied_per_second = 5.0\naudit_keys = true\n")
    try:
        flood = b"AUTH alice alice-pw\r\n" + b"GET secret:x\r\n" * 2000
        out = raw_exchange(p.plain_port, flood)
        assert out.count(b"-NOPERM") == 2000
        s = samples(scrape(p))
        logged = sum(1 for line in p.log.read_text().splitlines() if '"command_denied"' in line)
        assert logged <= 20
        assert s["redisguard_audit_events_suppressed_total"] == 2000 - logged
        assert '"keys": ["secret:x"]' in p.log.read_text()  # audit_keys = true: key names, never values
    finally:
        p.stop()


def test_sighup_reloads_users_and_certificates(fresh: tuple[ProxyProc, Path]) -> None:
    p, users = fresh
    assert raw_exchange(p.plain_port, b"AUTH carol carol-pw\r\n").startswith(b"-WRONGPASS")
    kept = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
    gone = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
    kept.sendall(b"AUTH alice alice-pw\r\n")
    gone.sendall(b"AUTH bob bob-pw\r\n")
    time.sleep(0.2)
    assert read_until(kept, b"+OK\r\n") == b"+OK\r\n" and read_until(gone, b"+OK\r\n") == b"+OK\r\n"
    users.write_text(USERS_ACL.replace("user bob on >bob-pw", "user bob on >new-pw") + "user carol on >carol-pw ~* +@all\n")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert raw_exchange(p.plain_port, b"AUTH carol carol-pw\r\n") == b"+OK\r\n"
    assert read_until(gone, lambda d: False, timeout=3) == b""  # bob's password changed: his session is closed, as ACL LOAD does
    kept.sendall(b"GET cache:still\r\n")
    assert read_until(kept, b"$-1\r\n") == b"$-1\r\n"  # alice's rules did not change: still connected
    kept.close()
    gone.close()
    users.write_text("user broken +nosuchcommand\n")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert raw_exchange(p.plain_port, b"AUTH carol carol-pw\r\n") == b"+OK\r\n"  # kept the last good users
    for text in ("", "# only a comment\n", "user carol on >carol-pw ~* +@all\n"):  # no explicit `user default`
        users.write_text(text)
        p.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert raw_exchange(p.plain_port, b"GET x\r\n") == b"-NOAUTH Authentication required.\r\n"  # still closed
    s = samples(scrape(p))
    assert s['redisguard_config_reload_total{result="success"}'] == 1
    assert s['redisguard_config_reload_total{result="failure"}'] == 4
    assert "no 'user default' line" in p.log.read_text()
    assert '"config_reload_failed"' in p.log.read_text()


def refused(port: int) -> bool:
    """The proxy accepted the TCP connection and dropped it without a byte (reset or close)."""
    try:
        return raw_exchange(port, b"PING\r\n", expect_close=True) == b""
    except ConnectionResetError:
        return True


def test_guards_sources_limits_throttle_idle(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    extra = (
        "[[listener]]\nname = \"fenced\"\ntype = \"tcp\"\naddress = \"127.0.0.1:0\"\nallowed_sources = [\"10.0.0.0/8\"]\n"
        "[[listener]]\nname = \"one\"\ntype = \"tcp\"\naddress = \"127.0.0.1:0\"\nmax_connections = 1\n"
    )  # fmt: skip
    d = tmp_path / "p"
    d.mkdir()
    p = start_proxy(d, certs, users, redis_server.port, extra=extra)
    cfg = p.config.read_text().replace("auth_timeout = 3.0", "auth_timeout = 30.0\nidle_timeout = 1.0")
    cfg = cfg.replace("auth_failures_per_minute = 100000.0", "auth_failures_per_minute = 3.0")
    p.stop()
    # fixed ports for the two extra listeners
    from tests.helpers import free_port

    fenced, one = free_port(), free_port()
    cfg = cfg.replace('address = "127.0.0.1:0"\nallowed', f'address = "127.0.0.1:{fenced}"\nallowed', 1)
    cfg = cfg.replace('address = "127.0.0.1:0"\nmax_connections', f'address = "127.0.0.1:{one}"\nmax_connections', 1)
    p.config.write_text(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(p.config)],
                            stderr=open(p.log, "wb"))  # fmt: skip
    p.proc = proc
    try:
        from tests.helpers import wait_port

        wait_port(one, proc)
        assert refused(fenced)
        held = socket.create_connection(("127.0.0.1", one))
        time.sleep(0.2)
        assert refused(one)
        held.close()
        # idle timeout: an authenticated, idle client is closed; a blocked one is not
        s1 = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
        s2 = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
        s1.sendall(b"AUTH admin admin-pw\r\n")
        s2.sendall(b"AUTH admin admin-pw\r\nBLPOP cache:idle 3\r\n")
        time.sleep(0.2)
        assert read_until(s1, b"+OK\r\n") == b"+OK\r\n"
        time.sleep(1.6)
        assert read_until(s1, lambda d: False, timeout=3) == b""  # closed for idleness
        s2.settimeout(5)
        assert s2.recv(100).startswith(b"+OK\r\n")  # still open, reply to BLPOP (nil) comes after 3 s
        s1.close()
        s2.close()
        # throttling: past 3 failures a minute AUTH waits (progressively), but the right password gets in
        tries = b"".join(encode_command([b"AUTH", b"alice", b"wrong%d" % i]) for i in range(3))
        tries += encode_command([b"AUTH", b"alice", b"alice-pw"])
        out = raw_exchange(p.plain_port, tries, quiet=3.0)
        assert out == b"-WRONGPASS invalid username-password pair or user is disabled.\r\n" * 3 + b"+OK\r\n"
        s = samples(scrape(p))
        assert s['redisguard_connections_rejected_total{listener="fenced",reason="source_not_allowed"}'] == 1
        assert s['redisguard_connections_rejected_total{listener="one",reason="limit"}'] == 1
        assert s['redisguard_auth_throttled_total{listener="local"}'] >= 2
        assert s['redisguard_auth_failures_total{listener="local",reason="wrong_password"}'] == 3
    finally:
        p.stop()


def test_sighup_reloads_certificates(tmp_path: Path, redis_server: RedisProc) -> None:
    import ssl

    from redisguard.cli.certs import init_dev_certs

    certs = tmp_path / "certs"
    init_dev_certs(certs)
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, redis_server.port)
    try:
        old_ca = (certs / "ca.pem").read_text()
        before = samples(scrape(p))['redisguard_certificate_expiry_timestamp_seconds{cert="tls:server"}']
        init_dev_certs(certs, days=30, force=True)  # a new CA and server certificate, 30 days
        p.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        ctx = ssl.create_default_context(cadata=(certs / "ca.pem").read_text())
        with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PING\r\n")
                assert read_until(tls, b"-NOAUTH Authentication required.\r\n") == b"-NOAUTH Authentication required.\r\n"
        old = ssl.create_default_context(cadata=old_ca)
        with socket.create_connection(("127.0.0.1", p.tls_port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                old.wrap_socket(raw, server_hostname="localhost")
        after = samples(scrape(p))['redisguard_certificate_expiry_timestamp_seconds{cert="tls:server"}']
        assert after < before - 300 * 86400
        assert '"config_reloaded"' in p.log.read_text()
    finally:
        p.stop()


def test_node_label_when_configured(tmp_path: Path) -> None:
    """[metrics] node: every series carries it (one sidecar per cluster node); without it, none does."""
    from redisguard.config.model import ConfigError
    from redisguard.config.parse import parse_config
    from redisguard.observe.metrics import Metrics, parse_samples

    m = Metrics(node="node-1")
    m.commands.labels("alice", "get", "allowed").inc()
    samples = parse_samples(m.render().decode())
    assert samples['redisguard_commands_total{command="get",node="node-1",result="allowed",user="alice"}'] == 1
    assert all('node="node-1"' in k for k in samples)
    assert not any("node=" in k for k in parse_samples(Metrics().render().decode()))
    base = {"listener": [{"name": "p", "type": "tcp", "address": "127.0.0.1:6390"}],
            "upstream": {"address": "127.0.0.1:6379"}, "acl": {"users_file": "users.acl"}}  # fmt: skip
    assert parse_config({**base, "metrics": {"node": "n1"}}, tmp_path).metrics.node == "n1"
    try:
        parse_config({**base, "metrics": {"node": "a b"}}, tmp_path)
    except ConfigError as e:
        assert str(e).startswith("metrics.node:")
    else:
        raise AssertionError("a bad node label was accepted")
