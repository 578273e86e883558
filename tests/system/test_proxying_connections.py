"""End to end, the client connections: malformed RESP answered and closed as Redis does, plaintext on the
TLS port and TLS on the plaintext one, a stalled handshake and a silent client timed out, a unix-socket
listener."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, RedisProc, raw_exchange, start_proxy, start_redis


@pytest.mark.parametrize(
    "data",
    [
        b"*abc\r\n",
        b"*1\r\n$-5\r\n",
        b'SET "a\r\n',
        b"*1\r\n$99999999999\r\n",
        b"*2\r\n$3\r\nGET\r\n:1\r\n",
    ],
)
def test_malformed_resp_matches_redis_and_closes(redis_server: RedisProc, proxy: ProxyProc, data: bytes) -> None:
    # Authenticate first on both so that the post-auth limits apply, as with a real client.
    r = start_redis(extra=["--user", "default off", "--user", "alice on >alice-pw ~cache:* +@all"])
    try:
        login = encode_command([b"AUTH", b"alice", b"alice-pw"])
        want = raw_exchange(r.port, login + data, expect_close=True)
        got = raw_exchange(proxy.plain_port, login + data, expect_close=True)
        assert got == want
        assert b"Protocol error" in got
    finally:
        r.stop()
    # the proxy is unaffected
    assert raw_exchange(proxy.plain_port, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"


def test_plaintext_on_tls_port_is_closed(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.tls_port, b"PING\r\n", expect_close=True)
    assert out == b""
    text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics").read().decode()
    assert 'redisguard_tls_handshake_failures_total{listener="tls"' in text
    # still serving
    assert raw_exchange(proxy.plain_port, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"


def test_a_stalled_tls_handshake_times_out_as_such(proxy: ProxyProc) -> None:
    """A ClientHello that stops after its first byte: closed at handshake_timeout, counted as a timeout
    (uvloop reports its own handshake timeout as a connection abort)."""
    def timeouts() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics").read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('redisguard_tls_handshake_failures_total{listener="tls",reason="timeout"}'))  # fmt: skip

    before = timeouts()
    assert raw_exchange(proxy.tls_port, b"\x16", expect_close=True, timeout=10) == b""
    deadline = time.monotonic() + 5  # uvloop closes the socket first, and tells the proxy at its next turn
    while timeouts() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert timeouts() == before + 1


def test_tls_client_on_plain_port_is_closed(proxy: ProxyProc, certs: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost").sendall(b"PING\r\n")


def test_silent_client_is_closed(proxy: ProxyProc) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=10) as s:
        assert s.recv(100) == b""  # closed by auth_timeout (3 s in the test config)
    assert 2.0 < time.monotonic() - start < 9.0
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as s:
        assert s.recv(100) == b""  # TLS handshake_timeout


def test_unix_socket_listener(tmp_path: Path, certs: Path, users_file: Path, redis_server: RedisProc) -> None:
    sock = tmp_path / "rg.sock"
    extra = f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{sock}"\nsocket_mode = "600"\n'
    p = start_proxy(tmp_path, certs, users_file, redis_server.port, extra=extra)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        c = redis.Redis(unix_socket_path=str(sock), username="alice", password="alice-pw")
        assert c.set("cache:unix", "1") is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("nope")
        c.close()
    finally:
        p.stop()
    assert not sock.exists()  # removed on shutdown
