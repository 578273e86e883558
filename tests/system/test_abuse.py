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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, RedisProc, raw_exchange, read_until

PROBE = r"""
import json, os, socket, sys, time
port, pid, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
request, reply = sys.argv[4].encode(), sys.argv[5].encode()

def runnable() -> float:
    # Seconds the proxy's threads (and its workers', and this probe's) spent ready to run but not
    # running (schedstat's run-queue wait): the machine's noise, which a stall of the proxy's own is not.
    total = 0
    pids = [pid]
    try:
        pids += [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    paths = [f"/proc/{p}/task/{t}/schedstat" for p in pids for t in os.listdir(f"/proc/{p}/task")]
    for path in paths + ["/proc/thread-self/schedstat"]:
        try:
            total += int(open(path).read().split()[1])
        except (OSError, IndexError, ValueError):
            pass  # (a thread that ended meanwhile)
    return total / 1e9

s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"AUTH admin admin-pw\r\n"); assert s.recv(100) == b"+OK\r\n"
print("ready", flush=True)
times, late, end = [], 0.0, time.monotonic() + seconds
while time.monotonic() < end:
    waited = runnable()
    t = time.monotonic()
    s.sendall(request + b"\r\n")
    got = b""
    while len(got) < len(reply):
        got += s.recv(100)
    assert got == reply, got
    took = time.monotonic() - t
    times.append(max(0.0, took - (runnable() - waited)))  # the round trip, less the machine's noise
    t = time.monotonic()
    time.sleep(0.01)
    late = max(late, time.monotonic() - t - 0.01)  # the machine's own noise: this process woken late
times.sort()
print(json.dumps({"worst": times[-1], "p50": times[len(times) // 2], "pings": len(times), "late": late}), flush=True)
"""
# ACL WHOAMI is answered by redisguard itself (Redis's own work on an attack does not count); PING
# goes through to Redis, as an unrelated client's request does.
WHOAMI = ("ACL WHOAMI", "$5\r\nadmin\r\n")
PING = ("PING", "+PONG\r\n")


def probe_stats(proxy: ProxyProc, attack: Callable[[], object], seconds: float = 4.0,
                probe: tuple[str, str] = WHOAMI) -> tuple[float, float, float]:  # fmt: skip
    """(p50, worst) round trip of another client's ``probe`` request while ``attack`` ran, and how late
    the probe's own sleeps woke up at worst (the machine's noise, not the proxy's)."""
    p = subprocess.Popen([sys.executable, "-c", PROBE, str(proxy.plain_port), str(proxy.proc.pid), str(seconds), *probe],
                         stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"ready"
    attack()
    out = json.loads(p.stdout.readline())
    p.wait(10)
    assert out["pings"] > 20
    return float(out["p50"]), float(out["worst"]), float(out["late"])


def probe_while(proxy: ProxyProc, attack: Callable[[], object], seconds: float = 4.0) -> float:
    """The worst round trip another client saw while ``attack`` ran."""
    return probe_stats(proxy, attack, seconds)[1]


def _send(port: int, data: bytes, chunk: int = 1 << 16) -> bytes:
    """Log in as admin, send ``data``, read replies until the proxy has been quiet for 0.5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"AUTH admin admin-pw\r\n")
        read_until(s, b"+OK\r\n")
        for i in range(0, len(data), chunk):
            s.sendall(data[i : i + chunk])
        out = b""
        s.settimeout(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                got = s.recv(1 << 20)
            except TimeoutError:
                break
            if not got:
                break
            out += got
        return out


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
    "50k refusals queued behind one forwarded reply": lambda port: _send(port, b"PING\r\n" + b"X\n" * 50_000),
    "128k unknown commands before AUTH": lambda port: raw_exchange(port, b"X\n" * 128_000, quiet=1.0, timeout=20),
    "MGET with 1M keys": lambda port: _send(port, _mget(1_000_000)),
    "a 30-byte request with a 3M-element reply": lambda port: _send(port, b"SADD cache:s a\r\nSRANDMEMBER cache:s -3000000\r\n"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_no_request_stalls_other_clients(proxy: ProxyProc, name: str) -> None:
    _, worst, late = probe_stats(proxy, lambda: ATTACKS[name](proxy.plain_port))
    print(f"{name}: worst {worst * 1000:.1f} ms (the probe's own sleeps woke up to {late * 1000:.1f} ms late)")
    # 100 ms of the proxy's own, plus what the machine itself delayed: another workload on both cores
    # delays the probe's wake-ups too, while a stall of the proxy's own does not (the probe is idle).
    assert worst < 0.1 + 2 * late, f"{name}: another client's PING took {worst * 1000:.0f} ms (noise {late * 1000:.0f} ms)"


# Users whose key patterns need the general matcher: `*:p0:*` ... (issue 21, section 4).
PATTERN_COUNTS = (1, 10, 100)
PATTERN_USERS = "".join(
    f"user p{n} on >p{n}-pw {' '.join(f'~*:p{i}:*' for i in range(n))} +@all -@dangerous\n" for n in PATTERN_COUNTS
)
# A user of many prefix patterns (`~p0:*` ...): each cheap to match, a thousand of them per key.
PREFIX_PATTERNS = 1000
PREFIX_USER = f"user prefixes on >prefixes-pw {' '.join(f'~p{i}:*' for i in range(PREFIX_PATTERNS))} +get\n"
NOPERM_KEY = b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"


@pytest.fixture(scope="module")
def pattern_proxy(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    from tests.helpers import USERS_ACL, start_proxy

    d = tmp_path_factory.mktemp("patterns")
    users = d / "users.acl"
    users.write_text(USERS_ACL + PATTERN_USERS + PREFIX_USER)
    p = start_proxy(d, certs, users, redis_server.port)
    yield p
    p.stop()


def _pattern_rounds(n: int, attack: str, direct: redis.Redis) -> list[tuple[bytes, bytes]]:
    """The requests of one attacker round for user p<n> and the exact replies Redis gives them. Keys are
    runs of ':' (every position starts a candidate match of every pattern) ending in the last pattern's
    `:p<n-1>:` (allowed, after all patterns are tried) or not (denied)."""
    tail = b"p%d:" % (n - 1)
    if attack.startswith("GET"):
        size = int(attack.split()[1].replace("KiB", "")) * (1024 if attack.endswith("KiB") else 1)
        allowed, denied = b":" * (size - len(tail)) + tail, b":" * size
        direct.set(allowed, b"value")
        return [(encode_command([b"GET", denied]), NOPERM_KEY), (encode_command([b"GET", allowed]), b"$5\r\nvalue\r\n")]
    keys = [b":" * 50 + tail + b"%d" % i for i in range(1000)]
    ok = encode_command([b"MSET", *[a for k in keys for a in (k, b"v")]])
    bad = encode_command([b"MSET", *[a for k in keys[:-1] for a in (k, b"v")], b":" * 60, b"v"])
    return [(ok, b"+OK\r\n"), (bad, NOPERM_KEY)]


def _attack_rounds(proxy: ProxyProc, auth: bytes, request: bytes, want: bytes,
                   seconds: float) -> tuple[float, float, float, list[int], list[str]]:  # fmt: skip
    """4 connections logged in with ``auth`` send ``request`` round after round for ``seconds``, each round's
    replies checked against ``want``, while another client PINGs: probe_stats's figures, the rounds each
    attacker finished, and the rounds whose replies were wrong."""
    import threading

    stop = threading.Event()
    answered: list[int] = []
    failures: list[str] = []

    def attacker() -> None:
        with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=120) as s:
            s.sendall(auth)
            assert read_until(s, b"+OK\r\n") == b"+OK\r\n"
            done = 0
            while not stop.is_set():
                s.sendall(request)
                got = read_until(s, want, timeout=120)
                if got != want:
                    failures.append(f"round {done}: {got[:200]!r}")
                    return
                done += 1
            answered.append(done)

    threads = [threading.Thread(target=attacker) for _ in range(4)]

    def attack_for() -> None:
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()

    p50, worst, late = probe_stats(proxy, attack_for, seconds=seconds + 0.5, probe=PING)
    for t in threads:
        t.join(180)
    return p50, worst, late, answered, failures


# 63,000 bytes: the repro, just under the 64 KiB that once sent a request off the loop
@pytest.mark.parametrize("attack", ["GET 1KiB", "GET 63000", "GET 64KiB", "GET 512KiB", "MSET 1000"])
@pytest.mark.parametrize("n", PATTERN_COUNTS)
def test_key_patterns_do_not_stall_other_clients(pattern_proxy: ProxyProc, direct: redis.Redis, n: int, attack: str) -> None:
    """4 connections of a user with n `*:p<i>:*` patterns send keys of 1-512 KiB (GET) or MSET 1,000 keys,
    round after round, while another client PINGs: the PING stays fast (matching costly requests runs
    in the decide thread with the GIL released), and every attacker request is answered, in order,
    with Redis's exact reply."""
    rounds = _pattern_rounds(n, attack, direct)
    request = b"".join(r for r, _ in rounds)
    want = b"".join(w for _, w in rounds)
    p50, worst, late, answered, failures = _attack_rounds(pattern_proxy, b"AUTH p%d p%d-pw\r\n" % (n, n), request, want, 2.0)
    print(f"{n} patterns, {attack}: PING p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms "
          f"(the probe's sleeps woke up to {late * 1000:.1f} ms late), attacker rounds {answered}")  # fmt: skip
    assert not failures, failures
    assert len(answered) == 4 and all(answered), answered  # every attacker got every reply, in order
    # Typically p50 < 2 ms and max < 40 ms here (issue 21 asks < 50 ms); a busy 2-core machine adds
    # its own spikes to the max, hence the margin. Before the kernel: p50 267 ms, max 464 ms.
    assert p50 < 0.05, f"another client's PING took {p50 * 1000:.0f} ms (median)"
    assert worst < 0.25, f"another client's PING took {worst * 1000:.0f} ms"


def test_unauthenticated_long_line_in_tiny_records_is_refused_at_64k(proxy: ProxyProc) -> None:
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=10) as s:
        t = time.monotonic()
        line = b"x" * (64 * 1024 + 1)  # one byte past the limit: the proxy has read every byte when it closes
        for i in range(0, len(line), 50):
            s.sendall(line[i : i + 50])
        out = read_until(s, lambda d: False, timeout=5)
        assert out == b"-ERR Protocol error: too big inline request\r\n"
        assert time.monotonic() - t < 5


def test_reply_skip_with_a_refusal_does_not_shift_replies(proxy: ProxyProc, direct: redis.Redis) -> None:
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


def test_reload_and_acl_list_with_many_users_do_not_stall(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    """10,001 users: ACL LIST answers from a reply built once per load, SIGHUP re-reads the file in a
    worker thread and compares 1,000 connected clients' users by fingerprint."""
    import signal

    from tests.helpers import USERS_ACL, start_proxy

    users = tmp_path / "users.acl"
    many = "".join(f"user u{i} on >pw{i} ~app:{i}:* %R~shared:* &chan:{i} +@read +@write -@dangerous +client|id\n"
                   for i in range(10_000))  # fmt: skip
    users.write_text(USERS_ACL + many)
    p = start_proxy(tmp_path, certs, users, redis_server.port)
    held: list[socket.socket] = []
    try:
        for i in range(1000):
            c = socket.create_connection(("127.0.0.1", p.plain_port))
            c.sendall(b"AUTH u%d pw%d\r\n" % (i, i))
            held.append(c)
        for c in held:
            assert read_until(c, b"+OK\r\n") == b"+OK\r\n"

        def attack() -> None:
            for _ in range(3):
                out = _send(p.plain_port, b"ACL LIST\r\n")
                assert out.startswith(b"*10006\r\n")
            p.proc.send_signal(signal.SIGHUP)
            time.sleep(1.5)
            # ACL LOAD takes the SIGHUP path (read, parsed and its replies built off the loop), so an
            # ACL LIST right after it is served from replies already built
            with socket.create_connection(("127.0.0.1", p.plain_port), timeout=30) as admin:
                admin.sendall(b"AUTH admin admin-pw\r\nACL LOAD\r\n")
                assert read_until(admin, b"+OK\r\n+OK\r\n", timeout=30) == b"+OK\r\n+OK\r\n"
            assert _send(p.plain_port, b"ACL LIST\r\n").startswith(b"*10006\r\n")

        _, worst, late = probe_stats(p, attack, seconds=8.0)
        print(f"ACL LIST x3 + SIGHUP + ACL LOAD + ACL LIST with 1000 clients: worst {worst * 1000:.1f} ms "
              f"(noise {late * 1000:.1f} ms)")  # fmt: skip
        assert worst < 0.1 + 2 * late
        held[0].sendall(b"GET app:0:x\r\n")  # unchanged users stay connected
        assert read_until(held[0], b"$-1\r\n") == b"$-1\r\n"
        assert '"config_reloaded"' in p.log.read_text()
    finally:
        for c in held:
            c.close()
        p.stop()


def test_pipelined_cheap_requests_do_not_stall_other_clients(pattern_proxy: ProxyProc, direct: redis.Redis) -> None:
    """4 connections of a user with 1,000 prefix patterns pipeline 5,000 GETs round after round, of keys
    only the last pattern allows (each request far below OFFLOAD_NS, all of them seconds of checks), while
    another client PINGs: the session decides at most TURN_NS of estimated work per event-loop turn, fast
    path included, so the PING stays fast; every attacker reply is Redis's, in order."""
    keys = [b"p%d:%d" % (PREFIX_PATTERNS - 1, i) for i in range(5000)]
    direct.mset({k: b"v%d" % i for i, k in enumerate(keys)})
    request = b"".join(encode_command([b"GET", k]) for k in keys)
    want = b"".join(b"$%d\r\nv%d\r\n" % (len(b"v%d" % i), i) for i in range(len(keys)))
    p50, worst, late, answered, failures = _attack_rounds(pattern_proxy, b"AUTH prefixes prefixes-pw\r\n", request, want, 3.0)
    print(f"{PREFIX_PATTERNS} prefix patterns, 4 x 5,000 pipelined GETs: PING p50 {p50 * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms (the probe's sleeps woke up to {late * 1000:.1f} ms late), "
          f"attacker rounds {answered}")  # fmt: skip
    assert not failures, failures
    assert len(answered) == 4 and all(answered), answered  # every attacker got every reply, in order
    # Before the per-turn budget: p50 ~580 ms, max ~1.4 s (the fast path checked a whole read in one turn).
    assert p50 < 0.05, f"another client's PING took {p50 * 1000:.0f} ms (median)"
    assert worst < 0.25 + 2 * late, f"another client's PING took {worst * 1000:.0f} ms (noise {late * 1000:.0f} ms)"
