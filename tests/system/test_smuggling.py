"""The smuggling differential, live: the same byte streams sent straight to a real Redis and through
redisguard (as a user allowed everything) must make Redis run the same commands — seen with MONITOR on
the upstream — or redisguard must refuse. And the attack that found the class: a read-only user's
RESP3 frame must not run anything upstream.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, raw_exchange, read_until

# Harmless commands only: what they do to the data does not matter, only that Redis ran them.
CMDS = [[b"ECHO", b"a"], [b"PING"], [b"GET", b"cache:k"], [b"EXISTS", b"cache:x"], [b"SET", b"cache:s", b"1"]]
PIECES = [
    *[encode_command(c) for c in CMDS],
    b"ECHO inline\r\n", b"PING\n", b"ECHO 'a b' \"c\\x41\"\r\n", b"\r\n", b"*0\r\n", b"*-1\r\n",
    b"~2\r\n$4\r\nECHO\r\n$1\r\nz\r\n", b"|1\r\n$4\r\nPING\r\n", b"%1\r\n$4\r\nECHO\r\n$1\r\ny\r\n",
    b">2\r\n$4\r\nECHO\r\n$1\r\nw\r\n", b"*2\r\n+ECHO\r\n$1\r\nv\r\n", b"*2\r\n$4\r\nECHO\r\n:5\r\n",
    b"*1\r\n*1\r\n$4\r\nPING\r\n", b"*2\r\n$4\r\nECHOxx$1\r\nu\r\n", b"*1\r\n$4\r\nPING\r\nECHO t\r\n",
    b"ECHO a\x00b\r\n", b"*1\r\n$4\r\nPI\x00G\r\n", b"ECHO \xff\x80\r\n", b"ECHO \"unterminated\r\n",
    b"*2\r\n$4\r\nECHO\r\n$3\r\nab\r\n",
]  # fmt: skip


def _stream(rng: random.Random) -> bytes:
    data = bytearray(b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))))
    for _ in range(rng.choice([0, 0, 1, 2])):  # mutate a byte, delete one, or insert one
        i = rng.randrange(len(data) + 1)
        op = rng.randrange(3)
        if op == 0 and i < len(data):
            data[i] = rng.choice(b"*$~%|>+:\r\n\x00 ab1")
        elif op == 1 and i < len(data):
            del data[i]
        else:
            data[i:i] = bytes([rng.choice(b"*$\r\n0 ")])
    return bytes(data)


class Monitor:
    """MONITOR on the upstream: the commands each client connection (by address) made Redis run."""

    LINE = re.compile(rb'^\+[0-9.]+ \[\d+ ([^\]]+)\] (.*)$')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(encode_command([b"AUTH", UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode()]) +
                          encode_command([b"MONITOR"]))  # fmt: skip
        assert read_until(self.sock, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
        self.lines: list[tuple[bytes, list[bytes]]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                m = self.LINE.match(line)
                if m:
                    with self.lock:
                        self.lines.append((m.group(1), _unrepr(m.group(2))))

    def wait_for(self, marker: bytes, timeout: float = 5.0) -> list[tuple[bytes, list[bytes]]]:
        """Everything logged up to the ECHO ``marker`` (sent afterwards on another connection)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for i, (_, argv) in enumerate(self.lines):
                    if argv == [b"ECHO", marker] or argv == [b"echo", marker]:
                        seen, self.lines = self.lines[:i], self.lines[i + 1 :]
                        return seen
            time.sleep(0.005)
        raise AssertionError(f"marker {marker!r} never reached MONITOR")

    def close(self) -> None:
        self.sock.close()


def _unrepr(s: bytes) -> list[bytes]:
    """MONITOR's quoted arguments (sdscatrepr) back to bytes."""
    out: list[bytes] = []
    i = 0
    esc = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b"}
    while i < len(s):
        assert s[i] == ord('"'), s
        i += 1
        cur = bytearray()
        while s[i] != ord('"'):
            if s[i] == ord("\\"):
                nxt = s[i + 1]
                if nxt == ord("x"):
                    cur.append(int(s[i + 2 : i + 4], 16))
                    i += 4
                    continue
                cur += esc.get(nxt, bytes([nxt]))
                i += 2
                continue
            cur.append(s[i])
            i += 1
        out.append(bytes(cur))
        i += 2  # closing quote and the space
    return out


@pytest.fixture
def monitor(redis_server: RedisProc) -> Iterator[Monitor]:
    m = Monitor(redis_server.port)
    yield m
    m.close()


def _run(port: int, login: bytes, stream: bytes) -> None:
    """Log in, send the stream in one write, read until the server goes quiet or closes, close."""
    raw_exchange(port, login + stream, quiet=0.05, timeout=2.0)


def _executed(monitor: Monitor, redis_port: int, port: int, login: bytes, stream: bytes, n: int) -> list[list[bytes]]:
    _run(port, login, stream)
    marker = b"marker-%d" % n
    time.sleep(0.02)  # the proxy forwards, then closes its upstream connection: let Redis read it all
    raw_exchange(redis_port, encode_command([b"AUTH", UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode()]) +
                 encode_command([b"ECHO", marker]), quiet=0.05)  # fmt: skip
    seen = monitor.wait_for(marker)
    return [argv for _, argv in seen if argv[0].lower() not in (b"auth", b"hello")]


def test_live_differential_against_redis(proxy: ProxyProc, redis_server: RedisProc, monitor: Monitor) -> None:
    rng = random.Random(20261125)
    direct_login = encode_command([b"AUTH", UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode()])
    proxy_login = encode_command([b"AUTH", b"admin", b"admin-pw"])
    mismatches, refused, cases = [], 0, int(os.environ.get("REDISGUARD_DIFF_CASES", "80"))
    for n in range(cases):
        stream = _stream(rng)
        want = _executed(monitor, redis_server.port, redis_server.port, direct_login, stream, 2 * n)
        got = _executed(monitor, redis_server.port, proxy.plain_port, proxy_login, stream, 2 * n + 1)
        if got != want:
            # redisguard may refuse where Redis would go on, never run something else
            if got == want[: len(got)]:
                refused += 1
                continue
            mismatches.append((stream, want, got))
    assert not mismatches, mismatches[:3]
    assert refused <= cases // 10


def test_resp3_frames_run_nothing_for_a_read_only_user(proxy: ProxyProc, redis_server: RedisProc,
                                                      monitor: Monitor, direct: redis.Redis) -> None:
    """The attack that found the class: bob (+get ~report:*) smuggles FLUSHALL / CONFIG / SET in frames
    hiredis reads as a request and Redis reads as inline commands."""
    direct.set("report:keep", "1")
    login = encode_command([b"AUTH", b"bob", b"bob-pw"])
    _executed(monitor, redis_server.port, redis_server.port, b"", b"", 999)  # drain the SET above
    attacks = [
        b"*1\r\n$4\r\nPING\r\n~2\r\n$3\r\nGET\r\n$14\r\napp:\r\nFLUSHALL\r\n",
        b"|1\r\n$3\r\nGET\r\n$8\r\nreport:1\r\nSET report:keep 0\r\n",
        b"*2\r\n$3\r\nGET\r\n$8\r\nreport:1\r\n%1\r\n$3\r\nGET\r\n+x\r\nCONFIG SET maxmemory 1\r\n",
        b">2\r\n$3\r\nGET\r\n$8\r\nreport:1\r\n",
    ]
    for n, attack in enumerate(attacks):
        ran = _executed(monitor, redis_server.port, proxy.plain_port, login, attack, 1000 + n)
        assert all(argv[0].lower() in (b"get", b"ping") for argv in ran), ran
        for argv in ran:
            if argv[0].lower() == b"get":
                assert argv[1].startswith(b"report:"), ran
    assert direct.get("report:keep") == b"1"
    assert direct.config_get("maxmemory")["maxmemory"] != "1"
