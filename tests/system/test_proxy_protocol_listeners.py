"""PROXY protocol v1/v2 on TLS, tcp and unix listeners, end to end: the peer is the header's, and so is
the source allowed_sources, [acl] user_sources, the AUTH throttle and the handshake budget see; bad,
slow and unlisted headers are refused and counted, and stall no one.

Real redis-server and redisguard; the PROXY headers are built byte by byte (conftest), as HAProxy, an
AWS NLB or Envoy would send them. Loopback addresses 127.0.0.x stand for load balancers (127.0.0.1, the
listed proxy_sources) and strangers (127.0.0.2). Counts come from /metrics, peers from the audit log."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard.observe.metrics import parse_samples
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, free_port, read_until, start_proxy, wait_port
from tests.system.conftest import PING, SIG, TLSOverRaw, auth, connect, tcp_call, v1, v2


def scrape(p: ProxyProc) -> dict[str, float]:
    return parse_samples(urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode())


def metric(s: dict[str, float], name: str, **labels: str) -> float:
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return s.get(key, 0.0)


def wait_for(p: ProxyProc, name: str, at_least: float, timeout: float = 5.0, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = metric(scrape(p), name, **labels)
        if v >= at_least or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def events(p: ProxyProc, event: str) -> list[dict[str, object]]:
    out = []
    for line in p.log.read_text().splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_event(p: ProxyProc, event: str, **fields: object) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for e in events(p, event):
            if all(e.get(k) == v for k, v in fields.items()):
                return e
        time.sleep(0.05)
    raise AssertionError(f"no {event} with {fields} in the audit log")


class Ports:
    pp = 0
    unix = ""


@pytest.fixture(scope="module")
def pproxy(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    d = tmp_path_factory.mktemp("pp")
    users = d / "users.acl"
    users.write_text(USERS_ACL)
    Ports.pp = free_port()
    Ports.unix = str(d / "pp.sock")
    sources = '["203.0.113.0/24", "192.0.2.0/24", "2001:db8::/32", "127.0.0.1/32"]'
    pp = f'proxy_protocol = true\nproxy_sources = ["127.0.0.1/32"]\nallowed_sources = {sources}\n'
    extra = (f'\n[[listener]]\nname = "pp"\ntype = "tcp"\naddress = "127.0.0.1:{Ports.pp}"\n{pp}'
             f'\n[[listener]]\nname = "ppunix"\ntype = "unix"\npath = "{Ports.unix}"\nproxy_protocol = true\n'
             'proxy_sources = ["unix"]\n')  # fmt: skip
    p = start_proxy(d, certs, users, redis_server.port, tls_listener=pp, extra=extra,
                    acl='user_sources = { bob = ["203.0.113.0/24"] }',
                    limits="handshake_timeout = 2.0\nauth_failures_per_minute = 4.0\nmax_handshakes_per_source = 2")  # fmt: skip
    wait_port(Ports.pp, p.proc)
    yield p
    p.stop()


def test_tls_peer_is_the_headers(pproxy: ProxyProc, certs: Path) -> None:
    for header, peer, together in ((v1("203.0.113.7", 41001), "203.0.113.7:41001", True),
                                   (v2("203.0.113.8", 41002), "203.0.113.8:41002", True),
                                   (v2("2001:db8::7", 41003, "2001:db8::1"), "2001:db8::7:41003", False),
                                   (v1("2001:db8::8", 41004, "2001:db8::1"), "2001:db8::8:41004", False)):  # fmt: skip
        c = TLSOverRaw(pproxy.tls_port, certs / "ca.pem", header, together=together)
        assert c.call(auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
        c.close()
        e = wait_event(pproxy, "connection_accepted", listener="tls", peer=peer)
        assert str(e["via"]).startswith("127.0.0.1:")  # the load balancer, for the record


def test_tcp_and_unix_peer_and_bytes_after_the_header(pproxy: ProxyProc) -> None:
    # header, AUTH and PING in one segment: the session sees only what follows the header
    assert tcp_call(Ports.pp, v1("203.0.113.9", 42001) + auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
    wait_event(pproxy, "connection_accepted", listener="pp", peer="203.0.113.9:42001")
    assert tcp_call(Ports.pp, v2("2001:db8::9", 42002, "2001:db8::1") + PING, 1) == b"-NOAUTH Authentication required.\r\n"
    wait_event(pproxy, "connection_accepted", listener="pp", peer="2001:db8::9:42002")
    # the header split over several segments, then the request
    with connect(Ports.pp) as s:
        h = v2("203.0.113.10", 42003)
        for i in range(0, len(h), 5):
            s.sendall(h[i:i + 5])
            time.sleep(0.01)
        s.sendall(auth("alice", "alice-pw") + PING)
        assert read_until(s, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
    wait_event(pproxy, "connection_accepted", listener="pp", peer="203.0.113.10:42003")
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(5)
        u.connect(Ports.unix)
        u.sendall(v1("203.0.113.11", 42004) + auth("alice", "alice-pw") + PING)
        assert read_until(u, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
    wait_event(pproxy, "connection_accepted", listener="ppunix", peer="203.0.113.11:42004")


def test_v2_local_keeps_the_socket_peer(pproxy: ProxyProc, certs: Path) -> None:
    with connect(Ports.pp) as s:
        port = s.getsockname()[1]
        s.sendall(v2("", 0, local=True) + auth("alice", "alice-pw") + PING)
        assert read_until(s, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
    wait_event(pproxy, "connection_accepted", listener="pp", peer=f"127.0.0.1:{port}")
    c = TLSOverRaw(pproxy.tls_port, certs / "ca.pem", v2("", 0, local=True))
    port = c.sock.getsockname()[1]
    assert c.call(PING, 1) == b"-NOAUTH Authentication required.\r\n"
    c.close()
    wait_event(pproxy, "connection_accepted", listener="tls", peer=f"127.0.0.1:{port}")
    assert tcp_call(Ports.pp, b"PROXY UNKNOWN\r\n" + PING, 1) == b"-NOAUTH Authentication required.\r\n"


def test_allowed_sources_and_user_sources_see_the_header(pproxy: ProxyProc, certs: Path) -> None:
    before = scrape(pproxy)
    # 198.51.100.0/24 is not in allowed_sources: refused before the session (tcp) or any TLS work (tls)
    assert tcp_call(Ports.pp, v1("198.51.100.1", 43001) + PING, 1) == b""
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        TLSOverRaw(pproxy.tls_port, certs / "ca.pem", v2("198.51.100.2", 43002))
    for lst in ("pp", "tls"):
        want = metric(before, "redisguard_connections_rejected_total", listener=lst, reason="source_not_allowed") + 1
        assert wait_for(pproxy, "redisguard_connections_rejected_total", want, listener=lst, reason="source_not_allowed") == want
    wait_event(pproxy, "connection_rejected", listener="tls", peer="198.51.100.2:43002", reason="source_not_allowed")
    # [acl] user_sources: bob only from 203.0.113.0/24, as the header says
    assert tcp_call(Ports.pp, v1("203.0.113.12", 43003) + auth("bob", "bob-pw"), 1) == b"+OK\r\n"
    refused = tcp_call(Ports.pp, v1("192.0.2.12", 43004) + auth("bob", "bob-pw"), 1)
    assert refused.startswith(b"-WRONGPASS")


def test_auth_throttle_counts_the_headers_source(pproxy: ProxyProc) -> None:
    # auth_failures_per_minute = 4: past 4 failures from one source every AUTH from it waits (and is counted)
    throttled = "redisguard_auth_throttled_total"
    for i in range(5):
        assert tcp_call(Ports.pp, v1("192.0.2.50", 44000 + i) + auth(f"nobody{i}", "x"), 1).startswith(b"-WRONGPASS")
    start = metric(scrape(pproxy), throttled, listener="pp")
    assert tcp_call(Ports.pp, v1("192.0.2.51", 44100) + auth("alice", "alice-pw"), 1) == b"+OK\r\n"  # another client
    assert metric(scrape(pproxy), throttled, listener="pp") == start
    assert tcp_call(Ports.pp, v1("192.0.2.50", 44101) + auth("alice", "alice-pw"), 1) == b"+OK\r\n"  # delayed, not refused
    assert metric(scrape(pproxy), throttled, listener="pp") == start + 1


def test_header_from_an_unlisted_peer_is_refused(pproxy: ProxyProc, certs: Path) -> None:
    before = scrape(pproxy)
    assert tcp_call(Ports.pp, v1("203.0.113.13", 45001) + PING, 1, source="127.0.0.2") == b""
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        TLSOverRaw(pproxy.tls_port, certs / "ca.pem", v1("203.0.113.14", 45002), source="127.0.0.2")
    for lst in ("pp", "tls"):
        want = metric(before, "redisguard_connections_rejected_total", listener=lst, reason="proxy_source_not_allowed") + 1
        got = wait_for(pproxy, "redisguard_connections_rejected_total", want, listener=lst, reason="proxy_source_not_allowed")
        assert got == want
    e = wait_event(pproxy, "connection_rejected", listener="tls", reason="proxy_source_not_allowed")
    assert str(e["peer"]).startswith("127.0.0.2:")  # the socket's peer: its header was never read


def test_handshake_budget_per_source_is_the_headers(pproxy: ProxyProc, certs: Path) -> None:
    # max_handshakes_per_source = 2: two clients from 203.0.113.40 (per their headers) that never send a
    # ClientHello hold their source's budget; a third is refused, another source is not
    before = scrape(pproxy)
    held = []
    for i in range(2):
        s = connect(pproxy.tls_port)
        s.sendall(v1("203.0.113.40", 48000 + i))
        held.append(s)
    time.sleep(0.2)
    with connect(pproxy.tls_port) as s:
        s.sendall(v1("203.0.113.40", 48002))
        assert read_until(s, lambda b: False, timeout=3) == b""
    name, labels = "redisguard_connections_rejected_total", {"listener": "tls", "reason": "handshake_limit_source"}
    want = metric(before, name, **labels) + 1
    assert wait_for(pproxy, name, want, 5.0, **labels) == want
    c = TLSOverRaw(pproxy.tls_port, certs / "ca.pem", v1("203.0.113.41", 48003))  # the balancer's other clients go on
    assert c.call(auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
    c.close()
    for s in held:
        s.close()


BAD = {
    "missing": PING,
    "malformed": b"PROXY TCP4 203.0.113.1 10.0.0.1 99999 6380\r\n" + PING,
    "too_long": b"PROXY " + b"A" * 150 + b"\r\n",
    "unsupported": SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12,  # UDP
}


def test_bad_headers_are_refused_and_counted_without_stalling_others(pproxy: ProxyProc, certs: Path) -> None:
    fail = "redisguard_proxy_header_failures_total"
    before = scrape(pproxy)
    # slow (never completes) and truncated (closes mid-header) headers, on both listeners
    slow = [connect(port) for port in (Ports.pp, pproxy.tls_port)]
    for s in slow:
        s.sendall(b"PROXY TCP4 203.0.")
    for port in (Ports.pp, pproxy.tls_port):
        with connect(port) as s:
            s.sendall(SIG + b"\x21\x11\x00")
    for data in BAD.values():
        for port in (Ports.pp, pproxy.tls_port):
            with connect(port) as s:
                s.sendall(data)
                assert read_until(s, lambda b: False, timeout=3) == b""  # closed, nothing answered
    # meanwhile a proxied client is answered at once
    t0 = time.monotonic()
    assert tcp_call(Ports.pp, v1("203.0.113.20", 46001) + auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
    c = TLSOverRaw(pproxy.tls_port, certs / "ca.pem", v1("203.0.113.21", 46002))
    assert c.call(auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
    c.close()
    assert time.monotonic() - t0 < 1.5  # the slow headers (handshake_timeout = 2 s) are still pending
    for s in slow:  # cut at handshake_timeout
        assert read_until(s, lambda b: False, timeout=5) == b""
        s.close()
    for lst in ("pp", "tls"):
        for reason in (*BAD, "timeout", "closed"):
            want = metric(before, fail, listener=lst, reason=reason) + 1
            assert wait_for(pproxy, fail, want, listener=lst, reason=reason) >= want, (lst, reason)
    e = wait_event(pproxy, "proxy_header_failed", listener="tls", reason="timeout")
    assert str(e["peer"]).startswith("127.0.0.1:")
    now = scrape(pproxy)
    assert metric(now, "redisguard_tls_handshakes_pending", listener="pp") == 0  # every slot was given back
    assert metric(now, "redisguard_tls_handshakes_pending", listener="tls") == 0


def test_client_info_shows_the_headers_addresses(pproxy: ProxyProc) -> None:
    """CLIENT INFO / LIST name the client the header names (addr) and the address it connected to (laddr),
    formatted as Redis formats them; without a header naming one (v2 LOCAL), the socket's own."""
    info = b"*2\r\n$6\r\nCLIENT\r\n$4\r\nINFO\r\n"
    login = auth("admin", "admin-pw")
    for header, addr, laddr in ((v1("203.0.113.12", 42005), "203.0.113.12:42005", "10.0.0.1:6380"),
                                (v2("2001:db8::12", 42006, "2001:db8::1", 7000), "[2001:db8::12]:42006",
                                 "[2001:db8::1]:7000")):  # fmt: skip
        out = tcp_call(Ports.pp, header + login + info, 3)
        assert f" addr={addr} laddr={laddr} ".encode() in out and b" user=admin " in out, out
    with connect(Ports.pp) as s:
        s.sendall(v2("", 0, local=True) + login + info)
        out = read_until(s, lambda b: b.count(b"\r\n") >= 3)
        addr = "%s:%d" % s.getsockname()
        assert f" addr={addr} laddr=127.0.0.1:{Ports.pp} ".encode() in out, out
    with socket.socket(socket.AF_UNIX) as u:
        u.settimeout(5)
        u.connect(Ports.unix)
        u.sendall(v2("", 0, local=True) + login + info)
        out = read_until(u, lambda b: b.count(b"\r\n") >= 3)
        assert f" addr={Ports.unix}:0 laddr={Ports.unix}:0 ".encode() in out, out  # as Redis shows a unix client
