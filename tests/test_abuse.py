"""Abuse on loopback: one client's hostile request must not stall another client (a latency probe in
its own process asks the proxy ACL WHOAMI — answered by redisguard itself, so Redis's own work on
the attack does not count — while each attack runs), nor shift replies, nor lock out a client with
the right password."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from redisguard.resp import encode_command

from .helpers import ProxyProc, raw_exchange, read_until

PROBE = r"""
import json, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"AUTH admin admin-pw\r\n"); assert s.recv(100) == b"+OK\r\n"
print("ready", flush=True)
worst, n, end = 0.0, 0, time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic()
    s.sendall(b"ACL WHOAMI\r\n")
    got = b""
    while len(got) < 11:
        got += s.recv(100)
    worst = max(worst, time.monotonic() - t)
    n += 1
    time.sleep(0.01)
print(json.dumps({"worst": worst, "pings": n}), flush=True)
"""


def probe_while(proxy: ProxyProc, attack: Callable[[], None], seconds: float = 4.0) -> float:
    """The worst PING round trip another client saw while ``attack`` ran."""
    p = subprocess.Popen([sys.executable, "-c", PROBE, str(proxy.plain_port), str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"
    attack()
    out = json.loads(p.stdout.readline())
    p.wait(10)
    assert out["pings"] > 20
    return float(out["worst"])


def _send(port: int, data: bytes, chunk: int = 1 << 16, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"AUTH admin admin-pw\r\n")
        read_until(s, b"+OK\r\n")
        for i in range(0, len(data), chunk):
            s.sendall(data[i : i + chunk])
            if pause:
                time.sleep(pause)
        return read_until(s, lambda d: d.endswith(b"\r\n") and len(d) > 0, timeout=20)


def _huge_count() -> bytes:
    return b"*2147483647\r\n$3\r\nDEL\r\n"


def _empty_args(n: int) -> bytes:
    return b"*%d\r\n$3\r\nDEL\r\n" % (n + 1) + b"$0\r\n\r\n" * n


def _mget(n: int) -> bytes:
    return encode_command([b"MGET", *[b"cache:%d" % i for i in range(n)]])


ATTACKS = {
    "huge declared count, then close": lambda port: raw_exchange(port, _huge_count()),
    "16 MiB request of empty arguments": lambda port: _send(port, _empty_args(16 * 1024 * 1024 // 6)),
    "MGET with 300k keys": lambda port: _send(port, _mget(300_000)),
    "1 MB key matched against patterns": lambda port: _send(port, encode_command([b"GET", b"cache:" + b"x" * 1_000_000])),
    "300k-GET pipeline as a first request": lambda port: _send(port, encode_command([b"GET", b"cache:k"]) * 300_000),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_no_request_stalls_other_clients(proxy: ProxyProc, name: str) -> None:
    worst = probe_while(proxy, lambda: ATTACKS[name](proxy.plain_port))
    print(f"{name}: worst {worst * 1000:.1f} ms")
    assert worst < 0.1, f"{name}: another client's PING took {worst * 1000:.0f} ms"


def test_unauthenticated_long_line_in_tiny_records_is_refused_at_64k(proxy: ProxyProc) -> None:
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=10) as s:
        t = time.monotonic()
        for _ in range(65_600 // 50):  # just past 64 KiB, so the proxy has read every byte when it closes
            s.sendall(b"x" * 50)
        out = read_until(s, lambda d: False, timeout=5)
        assert out == b"-ERR Protocol error: too big inline request\r\n"
        assert time.monotonic() - t < 5


def test_reply_skip_with_a_refusal_does_not_shift_replies(proxy: ProxyProc, direct) -> None:  # type: ignore[no-untyped-def]
    direct.set("cache:1", "one")
    direct.set("cache:2", "two")
    out = raw_exchange(proxy.plain_port, b"AUTH alice alice-pw\r\nCLIENT REPLY SKIP\r\nGET victim:key\r\n"
                       b"GET cache:1\r\nGET cache:2\r\nCLIENT REPLY SKIP\r\nGET cache:1\r\nGET cache:2\r\n")  # fmt: skip
    assert out == b"+OK\r\n$3\r\none\r\n$3\r\ntwo\r\n$3\r\ntwo\r\n"


def test_wrong_passwords_from_a_shared_address_do_not_lock_out_the_right_one(proxy: ProxyProc) -> None:
    """The fixture allows 100000 failures a minute; a dedicated proxy with the default budget would
    take minutes, so this drives the same session code through the real transport quickly: an
    attacker hammering alice from 127.0.0.1 while alice logs in from 127.0.0.1 too."""
    attackers = [socket.create_connection(("127.0.0.1", proxy.plain_port)) for _ in range(5)]
    try:
        for a in attackers:
            a.sendall(b"".join(encode_command([b"AUTH", b"alice", b"guess%d" % i]) for i in range(20)))
        ok = 0
        for _ in range(5):
            if raw_exchange(proxy.plain_port, b"AUTH alice alice-pw\r\n", quiet=3.0) == b"+OK\r\n":
                ok += 1
        assert ok == 5
    finally:
        for a in attackers:
            a.close()
