"""Protocol fidelity, connections: large values stream through, a client that reads nothing costs the
proxy bounded memory, a blocked client slows no one, and the endings (Redis restarted, CLIENT KILL on
Redis, a half-closed client) are what a direct client of Redis sees."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import redis

from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    TLSClient,
    raw_exchange,
    read_until,
    start_proxy,
    start_redis,
)  # fmt: skip
from tests.system.conftest import LOGIN, POLICY, _flush, _group, cmds, exchange


def test_large_values_stream_through(tls_client: TLSClient) -> None:
    c = tls_client("admin", "admin-pw")
    big = b"\x00\xff" * (15 * 1024 * 1024)  # 30 MB
    assert c.set("cache:big", big) is True
    assert c.get("cache:big") == big
    c.delete("cache:big")


def test_blocked_client_does_not_slow_others_and_releases_upstream(guarded: ProxyProc, redis_server: RedisProc) -> None:
    admin = redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    before = len(admin.client_list())
    s = socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5)
    s.sendall(cmds(LOGIN, [b"BLPOP", b"cache:never", b"0"]))
    time.sleep(0.3)
    assert len(admin.client_list()) == before + 1
    start = time.monotonic()
    assert exchange(guarded.plain_port, cmds(LOGIN, [b"PING"])) == b"+OK\r\n+PONG\r\n"
    assert time.monotonic() - start < 3
    s.close()
    deadline = time.monotonic() + 5
    while len(admin.client_list()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(admin.client_list()) == before
    admin.close()


def test_upstream_restart_closes_client_cleanly(tmp_path: Path, certs: Path) -> None:
    r = start_redis()
    users = tmp_path / "users.acl"
    users.write_text("\n".join(POLICY) + "\n")
    p = start_proxy(tmp_path, certs, users, r.port)
    try:
        s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
        s.sendall(cmds(LOGIN, [b"BLPOP", b"cache:q", b"0"]))
        time.sleep(0.3)
        assert read_until(s, b"+OK\r\n") == b"+OK\r\n"
        r.stop()
        rest = b""
        while chunk := s.recv(100):
            rest += chunk
        assert rest == b""  # closed, as a direct client of the stopped Redis sees it
    finally:
        p.stop()
        r.stop()


def test_client_kill_on_redis_closes_the_client_as_redis_would(mirror: RedisProc, guarded: ProxyProc,
                                                               redis_server: RedisProc) -> None:  # fmt: skip
    """CLIENT KILL (here: of every normal client but the killer) on the upstream closes the proxied
    client's connection, after the replies Redis sent before; the same script straight to Redis."""
    script = cmds(LOGIN, [b"SET", b"cache:k", b"v"], [b"GET", b"cache:k"])
    for port in (mirror.port, guarded.plain_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(script)
            assert read_until(s, b"+OK\r\n+OK\r\n$1\r\nv\r\n") == b"+OK\r\n+OK\r\n$1\r\nv\r\n"
            target = mirror.port if port == mirror.port else redis_server.port
            user, pw = (b"mon", b"mon-pw") if port == mirror.port else (UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode())
            killed = raw_exchange(target, cmds([b"AUTH", user, pw], [b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"yes"]))
            assert killed.startswith(b"+OK\r\n:")
            assert read_until(s, lambda d: False, timeout=3) == b""  # EOF, no error line


def test_half_close_gets_every_reply(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(LOGIN, [b"SET", b"cache:h", b"1"], [b"INCR", b"cache:h"], [b"GET", b"other"], [b"GET", b"cache:h"])
    outs = []
    for port in (mirror.port, guarded.plain_port):
        _flush(mirror.port)
        _flush(redis_server.port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(script)
            s.shutdown(socket.SHUT_WR)
            outs.append(read_until(s, lambda d: False, timeout=3))
    assert outs[1] == outs[0] and outs[0].endswith(b"$1\r\n2\r\n")


def test_slow_reader_is_bounded(guarded: ProxyProc) -> None:
    """A client that pipelines 300 MB of replies and reads nothing: the proxy's memory stays small."""
    val = b"v" * (1 << 20)
    s = socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s.sendall(cmds(LOGIN, [b"SET", b"cache:big1", val]))
    read_until(s, b"+OK\r\n+OK\r\n")
    threading.Thread(target=lambda: s.sendall(cmds(*[[b"GET", b"cache:big1"]] * 300)), daemon=True).start()
    time.sleep(2)
    rss = int(_group(rb"VmRSS:\s+(\d+)", Path(f"/proc/{guarded.proc.pid}/status").read_bytes()))
    assert rss < 150 * 1024, f"proxy RSS {rss} kB while a client is not reading"
    got = 0
    s.settimeout(10)
    reply = len(b"$%d\r\n" % len(val)) + len(val) + 2
    while got < 300 * reply:
        chunk = s.recv(1 << 20)
        assert chunk
        got += len(chunk)
    assert got == 300 * reply
    s.close()
