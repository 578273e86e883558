"""End to end, the upstream: Redis down and back, the service user's password revoked, Redis over a unix
socket and over TLS, and DEBUG as Redis's own enable-debug-command says."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, raw_exchange, start_proxy, start_redis


def test_upstream_down_and_back(tmp_path: Path, certs: Path, users_file: Path) -> None:
    r = start_redis()
    p = start_proxy(tmp_path, certs, users_file, r.port)
    try:

        def client() -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                               username="alice", password="alice-pw", socket_timeout=5)  # fmt: skip

        assert client().set("cache:up", "1") is True
        r.stop()
        out = raw_exchange(p.plain_port, b"AUTH alice alice-pw\r\nPING\r\n", expect_close=True)
        # AUTH is the proxy's; PING is the first request that needs Redis
        # ... and names no address behind the proxy (the proxy's log does)
        assert out == b"+OK\r\n-ERR redisguard: upstream Redis is unavailable\r\n"
        assert str(r.port).encode() not in out
        ready = urllib.request.Request(f"http://127.0.0.1:{p.metrics_port}/readyz")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(ready)
        assert e.value.code == 503
        r.start()
        assert client().ping() is True
        assert p.proc.poll() is None
    finally:
        p.stop()
        r.stop()


def test_upstream_bad_credentials_is_a_clear_error(tmp_path: Path, certs: Path, users_file: Path) -> None:
    r = start_redis()
    p = start_proxy(tmp_path, certs, users_file, r.port)
    (tmp_path / "upstream.pw").write_text("wrong")  # not re-read; test the live AUTHCHECK path instead:
    try:
        # revoke the service user's password on the real Redis: new upstream connections fail AUTH
        admin = redis.Redis(port=r.port, username="svc", password="svc-test-password")
        admin.execute_command("ACL", "SETUSER", "svc", "resetpass", ">other")
        admin.close()
        out = raw_exchange(p.plain_port, b"AUTH alice alice-pw\r\nPING\r\n", expect_close=True)
        assert out == b"+OK\r\n-ERR redisguard: upstream authentication failed; check [upstream] username and password\r\n"
        # counted, and audit-logged (rate-limited), so a rotated password shows up without a client's help
        body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
        assert "redisguard_upstream_auth_failures_total 1.0" in body
        assert "upstream_auth_failed" in p.log.read_text()
    finally:
        p.stop()
        r.stop()


@pytest.mark.parametrize("mode", ["unix", "tls"])
def test_upstream_over_unix_socket_and_tls(tmp_path: Path, certs: Path, users_file: Path, mode: str) -> None:
    """[upstream] path = unix socket (the sidecar setup), and tls = true (wrapping a remote Redis)."""
    from tests.helpers import free_port

    sock = tmp_path / "redis.sock"
    tls_port = free_port()
    extra = {
        "unix": ["--unixsocket", str(sock), "--unixsocketperm", "700"],
        "tls": ["--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file",
                str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no"],
    }[mode]  # fmt: skip
    r = start_redis(extra=extra)
    tls_upstream = f'tls = true\ntls_ca_file = "{certs / "ca.pem"}"\ntls_server_name = "localhost"\n'
    upstream_extra = tls_upstream if mode == "tls" else ""
    p = start_proxy(tmp_path, certs, users_file, tls_port if mode == "tls" else r.port, upstream_extra=upstream_extra)
    if mode == "unix":  # point the upstream at the socket instead of host:port
        cfg = p.config.read_text().replace(f'address = "127.0.0.1:{r.port}"', f'path = "{sock}"')
        p.stop()
        p.config.write_text(cfg)
        p = start_proxy_from(p)
    try:
        c = redis.Redis(host="127.0.0.1", port=p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                        username="alice", password="alice-pw")  # fmt: skip
        assert c.set("cache:via", mode) is True
        assert c.get("cache:via") == mode.encode()
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("other")
        c.close()
        assert "command_table_fallback" not in p.log.read_text()  # COMMAND INFO came over that path too
    finally:
        p.stop()
        r.stop()


def start_proxy_from(p: ProxyProc) -> ProxyProc:
    import subprocess as sp
    import sys

    from tests.helpers import wait_port

    proc = sp.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(p.config)], stderr=open(p.log, "wb"))
    wait_port(p.plain_port, proc)
    return ProxyProc(proc, p.tls_port, p.plain_port, p.metrics_port, p.config, p.log)


def test_protected_commands_follow_the_upstreams_setting(tmp_path: Path, certs: Path, users_file: Path) -> None:
    """enable_debug_command = "upstream" (the default): Redis's `local` means local to redisguard."""
    r = start_redis(extra=["--enable-debug-command local"])
    p = start_proxy(tmp_path, certs, users_file, r.port)
    try:
        debug = encode_command([b"AUTH", b"admin", b"admin-pw"]) + encode_command([b"DEBUG", b"SLEEP", b"0"])
        assert raw_exchange(p.plain_port, debug) == b"+OK\r\n+OK\r\n"  # a loopback client of redisguard
    finally:
        p.stop()
        r.stop()
