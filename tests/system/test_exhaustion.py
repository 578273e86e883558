"""Exhaustion before AUTH: pending TLS handshakes, file descriptors, log volume, event-loop lag.

Real redis-server and redisguard processes; every wait polls /metrics up to a deadline (no timing
assertions: other tests share these 2 cores)."""

from __future__ import annotations

import socket
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redisguard.config.model import ConfigError, LimitsConfig
from redisguard.config.parse import parse_config
from redisguard.observe.metrics import parse_samples
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, free_port, read_until, start_proxy, wait_port

PENDING = 'redisguard_tls_handshakes_pending{listener="tls"}'


def scrape(p: ProxyProc) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    return parse_samples(text)


def wait_metrics(p: ProxyProc, ok: Callable[[dict[str, float]], bool], timeout: float = 10.0) -> dict[str, float]:
    """Scrape until ``ok(samples)``; return the last scrape either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(p)
        if ok(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def rejected(s: dict[str, float], listener: str, reason: str) -> float:
    return s.get(f'redisguard_connections_rejected_total{{listener="{listener}",reason="{reason}"}}', 0.0)


def silent(port: int, source: str, n: int) -> list[socket.socket]:
    """``n`` TCP connections from ``source`` (any 127.x.y.z address works on Linux loopback) that never speak."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


@pytest.fixture
def make_proxy(tmp_path: Path, certs: Path, redis_server: RedisProc) -> Iterator[Callable[..., ProxyProc]]:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    started: list[ProxyProc] = []

    def make(**kw: Any) -> ProxyProc:
        p = start_proxy(tmp_path, certs, users, redis_server.port, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def tls_ping(p: ProxyProc, certs: Path, port: int = 0, source: str = "") -> bool:
    if source:  # from a given loopback address: a raw TLS socket (redis-py cannot bind one)
        import ssl

        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port or p.tls_port), timeout=10, source_address=(source, 0)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"AUTH alice alice-pw\r\nPING\r\n")
                return read_until(tls, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
    c = redis.Redis(host="127.0.0.1", port=port or p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                    username="alice", password="alice-pw", socket_timeout=10, retry=Retry(NoBackoff(), 0))  # fmt: skip
    try:
        return bool(c.ping())
    finally:
        c.close()


def test_pending_handshake_flood_is_capped(make_proxy: Callable[..., ProxyProc], certs: Path) -> None:
    p = make_proxy(limits="max_pending_handshakes = 100\nmax_handshakes_per_source = 50\nhandshake_timeout = 60.0\n")
    flood: list[socket.socket] = []
    try:
        # 300 silent connections from one source: 50 are pending, the other 250 wait for a slot (no TLS
        # work, none refused, none evicted: nobody better is waiting).
        flood += silent(p.tls_port, "127.0.0.2", 300)
        s = wait_metrics(p, lambda s: s[PENDING] == 50)
        time.sleep(1.5)  # past STALLED: the pending ones are stalled now
        s = scrape(p)
        assert s[PENDING] == 50
        quiet = ("handshake_evicted", "handshake_limit_source", "handshake_wait_timeout")
        assert [rejected(s, "tls", r) for r in quiet] == [0] * 3
        # The flood is held, and legitimate clients log in and run PING: from another address, and from
        # the flooding address itself (behind one NAT): it waits, has spoken, so a stalled socket of
        # its source gives it its slot.
        assert tls_ping(p, certs)
        assert tls_ping(p, certs, source="127.0.0.2")
        s = scrape(p)
        assert rejected(s, "tls", "handshake_evicted") == 1
        # A second source fills the global budget (100): the rest of it, and a third source, wait.
        flood += silent(p.tls_port, "127.0.0.3", 60)
        flood += silent(p.tls_port, "127.0.0.4", 5)
        s = wait_metrics(p, lambda s: s[PENDING] == 100)
        assert s[PENDING] == 100
        time.sleep(1.5)
        assert tls_ping(p, certs, source="127.0.0.5")  # a stalled socket (any: the global cap) makes way
        s = scrape(p)
        assert rejected(s, "tls", "handshake_evicted") == 2
        assert rejected(s, "tls", "handshake_limit") == rejected(s, "tls", "handshake_limit_source") == 0
        assert s['redisguard_connections_active{listener="tls"}'] == 0
    finally:
        for sock in flood:
            sock.close()
    s = wait_metrics(p, lambda s: s[PENDING] == 0, timeout=30)
    assert s[PENDING] == 0
    assert tls_ping(p, certs)
    # Rejections are counted, not each logged: the log holds at most the limiter's burst of them.
    assert p.log.read_text().count('"connection_rejected"') < 265


def test_a_silent_flood_cannot_fill_the_wait_queue_for_long(make_proxy: Callable[..., ProxyProc], certs: Path) -> None:
    """More silent sockets than the queue holds (4 x 20 = 80 waiting): once it fills, those silent for
    STALLED seconds are dropped, so a real client from the same address gets in within seconds."""
    p = make_proxy(limits="max_pending_handshakes = 20\nmax_handshakes_per_source = 10\nhandshake_timeout = 60.0\n")
    flood = silent(p.tls_port, "127.0.0.7", 200)
    try:
        s = wait_metrics(p, lambda s: rejected(s, "tls", "handshake_limit_source") > 0)
        assert s[PENDING] == 10 and rejected(s, "tls", "handshake_limit_source") > 0  # the queue was full
        time.sleep(1.5)
        flood += silent(p.tls_port, "127.0.0.7", 50)  # the queue fills again: stalled waiting ones make way
        t0 = time.monotonic()
        assert tls_ping(p, certs, source="127.0.0.7")
        took = time.monotonic() - t0
        s = scrape(p)
        assert rejected(s, "tls", "handshake_evicted") > 0
        print(f"\na real client behind a silent flood of its own address served in {took:.2f} s")
    finally:
        for sock in flood:
            sock.close()


def test_a_reconnect_storm_from_one_address_is_served(make_proxy: Callable[..., ProxyProc], certs: Path) -> None:
    """1,000 TLS clients connecting at once from one address (a pool warming up, a NAT, everyone back
    after a failover), with the default limits (64 handshakes per source): every one is served, in
    turn, none reset; meanwhile silent sockets from that address still cannot keep them out."""
    import asyncio
    import ssl

    p = make_proxy(limits="handshake_timeout = 60.0\n")  # the default per-source and global budgets
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    idle = silent(p.tls_port, "127.0.0.6", 100)  # holding 64 slots of the same source, never speaking

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.tls_port, ssl=ctx, server_hostname="localhost",
                                                       local_addr=("127.0.0.6", 0), ssl_handshake_timeout=60)  # fmt: skip
        writer.write(b"AUTH alice alice-pw\r\nPING\r\n")
        got = await reader.readexactly(len(b"+OK\r\n+PONG\r\n"))
        writer.close()
        return got

    async def storm() -> list[bytes | BaseException]:
        return await asyncio.gather(*(one() for _ in range(1000)), return_exceptions=True)

    try:
        results = asyncio.run(storm())
    finally:
        for sock in idle:
            sock.close()
    failed = [r for r in results if r != b"+OK\r\n+PONG\r\n"]
    assert not failed, (len(failed), failed[:3])
    s = scrape(p)
    assert rejected(s, "tls", "handshake_limit_source") == rejected(s, "tls", "handshake_limit") == 0
    assert rejected(s, "tls", "handshake_wait_timeout") == 0


def _client_hello(certs: Path) -> bytes:
    """A real TLS ClientHello (made with a memory BIO), to send and then stall on."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("stall", ["one byte", "a whole ClientHello"])
def test_sockets_that_stall_after_speaking_cannot_lock_out_their_address(make_proxy: Callable[..., ProxyProc], certs: Path,
                                                                         stall: str) -> None:  # fmt: skip
    """Sockets that send a byte of a ClientHello (or a whole one) and then nothing hold their source's
    handshake slots only until they are stalled (1 s without a whole ClientHello, 2 s in the TLS
    handshake after it): a real client from the same address (behind one NAT) waiting for a slot gets
    one within seconds, not at handshake_timeout."""
    p = make_proxy(limits="max_handshakes_per_source = 10\nhandshake_timeout = 60.0\n")
    data = b"\x16" if stall == "one byte" else _client_hello(certs)
    flood = silent(p.tls_port, "127.0.0.9", 30)
    try:
        for sock in flood:
            sock.sendall(data)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert tls_ping(p, certs, source="127.0.0.9")  # (its own timeout: 10 s)
        took = time.monotonic() - t0
        s = scrape(p)
        assert rejected(s, "tls", "handshake_evicted") >= 1
        print(f"\n{stall}: a real client of the flooding address served in {took:.2f} s")
    finally:
        for sock in flood:
            sock.close()


def test_pending_handshakes_count_toward_max_connections(make_proxy: Callable[..., ProxyProc], certs: Path) -> None:
    port = free_port()
    small = (f'[[listener]]\nname = "small"\ntype = "tls"\naddress = "127.0.0.1:{port}"\n'
             f'cert_file = "{certs / "server.pem"}"\nkey_file = "{certs / "server.key"}"\nmax_connections = 3\n')  # fmt: skip
    p = make_proxy(extra=small, limits="handshake_timeout = 60.0\n")
    wait_port(port)  # a probe connection: wait until it is over, so it does not take one of the 3 places
    wait_metrics(p, lambda s: any(k.startswith('redisguard_tls_handshake_failures_total{listener="small"') for k in s))
    flood = silent(port, "127.0.0.5", 3)
    try:
        s = wait_metrics(p, lambda s: s.get('redisguard_tls_handshakes_pending{listener="small"}', 0) >= 3)
        assert s['redisguard_tls_handshakes_pending{listener="small"}'] == 3
        with pytest.raises(redis.ConnectionError):
            tls_ping(p, certs, port)  # 3 pending handshakes fill max_connections = 3: refused before any TLS work
        assert rejected(scrape(p), "small", "limit") >= 1
    finally:
        for sock in flood:
            sock.close()
    wait_metrics(p, lambda s: s['redisguard_tls_handshakes_pending{listener="small"}'] == 0)
    assert tls_ping(p, certs, port)


def test_fd_reserve_keeps_metrics_and_upstream_working(make_proxy: Callable[..., ProxyProc]) -> None:
    p = make_proxy(nofile=160)
    s = scrape(p)
    assert s["redisguard_file_descriptors_limit"] == 160
    # A client that logged in before the flood: its upstream connection opens at its first command.
    kept = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
    kept.sendall(b"AUTH alice alice-pw\r\n")
    assert read_until(kept, b"+OK\r\n") == b"+OK\r\n"
    flood = [socket.create_connection(("127.0.0.1", p.plain_port), timeout=5) for _ in range(120)]
    try:
        s = wait_metrics(p, lambda s: rejected(s, "local", "fd_reserve") > 0)
        assert rejected(s, "local", "fd_reserve") > 0
        assert s["redisguard_file_descriptors_accounted"] <= 160 - 64
        kept.sendall(b"SET cache:fd v\r\nGET cache:fd\r\n")
        assert read_until(kept, b"+OK\r\n$1\r\nv\r\n") == b"+OK\r\n$1\r\nv\r\n"
        assert not any(k.startswith("redisguard_accept_failures_total") for k in s)
    finally:
        for sock in flood:
            sock.close()
        kept.close()


def test_connection_events_are_rate_limited(make_proxy: Callable[..., ProxyProc]) -> None:
    p = make_proxy(extra="audit_connections_per_second = 2.0\n")
    for _ in range(60):
        socket.create_connection(("127.0.0.1", p.plain_port), timeout=5).close()
    s = wait_metrics(p, lambda s: s['redisguard_connections_total{listener="local"}'] >= 60)
    accepted = s['redisguard_connections_total{listener="local"}']  # the 60, and start_proxy's probe
    logged = p.log.read_text().count('"connection_accepted"')
    assert 1 <= logged < 60
    assert s["redisguard_audit_events_suppressed_total"] == accepted - logged


def test_event_loop_lag_and_fd_metrics_are_exported(proxy: ProxyProc) -> None:
    s = wait_metrics(proxy, lambda s: s.get("redisguard_event_loop_lag_seconds_count", 0) >= 1)
    assert s["redisguard_event_loop_lag_seconds_count"] >= 1
    assert 'redisguard_event_loop_lag_seconds_bucket{le="0.001"}' in s
    assert 'redisguard_event_loop_lag_seconds_bucket{le="10.0"}' in s
    assert s["redisguard_file_descriptors_limit"] > 0
    assert 0 < s["redisguard_file_descriptors_accounted"] < s["redisguard_file_descriptors_limit"]


from tests.system.test_config_cli import BASE  # noqa: E402  (one minimal config for both)


def test_exhaustion_limits_defaults_and_values(tmp_path: Path) -> None:
    cfg = parse_config(_toml(BASE), tmp_path)
    assert cfg.limits == LimitsConfig()
    assert (cfg.limits.max_pending_handshakes, cfg.limits.max_handshakes_per_source) == (1024, 64)
    assert (cfg.limits.fd_reserve, cfg.limits.memory_trim_interval, cfg.log.audit_connections_per_second) == (64, 5.0, 100.0)
    text = "[limits]\nmax_pending_handshakes = 10\nmax_handshakes_per_source = 2\nfd_reserve = 0\nmemory_trim_interval = 0\n"
    lim = parse_config(_toml(BASE + text), tmp_path).limits
    assert (lim.max_pending_handshakes, lim.max_handshakes_per_source) == (10, 2)
    assert (lim.fd_reserve, lim.memory_trim_interval) == (0, 0.0)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("[limits]\nmax_pending_handshakes = 0", "limits.max_pending_handshakes: must be at least 1"),
        ("[limits]\nmax_handshakes_per_source = -3", "limits.max_handshakes_per_source: must be at least 1"),
        ('[limits]\nmax_pending_handshakes = "many"', "limits.max_pending_handshakes: expected int"),
        ("[limits]\nmax_handshakes_per_source = 1.5", "limits.max_handshakes_per_source: expected int"),
        ("[limits]\nfd_reserve = -1", "limits.fd_reserve: must not be negative"),
        ("[limits]\nmemory_trim_interval = -0.5", "limits.memory_trim_interval: must not be negative"),
        ("[log]\naudit_connections_per_second = 0", "log.audit_connections_per_second: must be > 0"),
    ],
)
def test_exhaustion_limits_bad_values_name_the_key(tmp_path: Path, snippet: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_toml(BASE + snippet), tmp_path)
    assert message in str(e.value)


def _toml(text: str) -> dict[str, Any]:
    return tomllib.loads(text)
