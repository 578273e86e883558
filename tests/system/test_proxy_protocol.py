"""PROXY protocol v1/v2 on TLS, tcp and unix listeners, and PROXY v2 sent upstream, end to end.

Real redis-server and redisguard; the PROXY headers are built here byte by byte, as HAProxy, an AWS
NLB or Envoy would send them. Loopback addresses 127.0.0.x stand for load balancers (127.0.0.1, the
listed proxy_sources) and strangers (127.0.0.2). Counts come from /metrics, peers from the audit log."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard.observe.metrics import parse_samples
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, free_port, read_until, start_proxy, wait_port

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PING = b"*1\r\n$4\r\nPING\r\n"


def auth(user: str, pw: str) -> bytes:
    return b"*3\r\n$4\r\nAUTH\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (user.encode(), pw.encode()))


def v1(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 6380) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 6380, local: bool = False) -> bytes:
    if local:
        return SIG + b"\x20\x00\x00\x00"
    if ":" in src:
        body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst or "::1")
        fam = 0x21
    else:
        body = socket.inet_aton(src) + socket.inet_aton(dst)
        fam = 0x11
    body += struct.pack("!HH", sport, dport) + b"\x04\x00\x03abc"  # and a TLV (NOOP), skipped
    return SIG + bytes((0x21, fam)) + struct.pack("!H", len(body)) + body


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class TLSOverRaw:
    """A TLS client over a raw socket through memory BIOs, so the PROXY header goes first in cleartext
    (in the same segment as the ClientHello when ``together``)."""

    def __init__(self, port: int, cafile: Path, header: bytes, together: bool = True, source: str = "127.0.0.1") -> None:
        self.sock = connect(port, source)
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.check_hostname = False
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out)
        if not together:
            self.sock.sendall(header)
            time.sleep(0.05)
            header = b""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(header + self.out.read())
                header = b""
                self._pull()
        self.sock.sendall(self.out.read())

    def _pull(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed")
        self.inc.write(chunk)

    def call(self, data: bytes, want: int) -> bytes:
        self.obj.write(data)
        self.sock.sendall(self.out.read())
        got = b""
        while got.count(b"\r\n") < want:
            try:
                got += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._pull()
        return got

    def close(self) -> None:
        self.sock.close()


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


def tcp_call(port: int, data: bytes, want: int, source: str = "127.0.0.1") -> bytes:
    with connect(port, source) as s:
        s.sendall(data)
        return read_until(s, lambda b: b.count(b"\r\n") >= want, timeout=5)


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


# -- [upstream] proxy_protocol: a PROXY v2 header to a proxy in front of Redis ---------------------------------


class V2Relay:
    """A tiny TCP relay that, like HAProxy with accept-proxy, requires and parses a PROXY v2 header,
    records it, and relays the rest to Redis."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.headers: list[tuple[str, str, int, str, int]] = []  # (command, src, sport, dst, dport)
        self.errors: list[str] = []
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _exact(self, c: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = c.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _one(self, c: socket.socket) -> None:
        c.settimeout(10)
        try:
            fixed = self._exact(c, 16)
            if fixed[:12] != SIG or fixed[12] >> 4 != 2:
                self.errors.append(f"not a PROXY v2 header: {fixed!r}")
                c.close()
                return
            body = self._exact(c, struct.unpack("!H", fixed[14:16])[0])
            if fixed[12] & 0xF == 0:
                self.headers.append(("LOCAL", "", 0, "", 0))
            elif fixed[13] == 0x11:
                sport, dport = struct.unpack("!HH", body[8:12])
                self.headers.append(("PROXY", socket.inet_ntoa(body[:4]), sport, socket.inet_ntoa(body[4:8]), dport))
            elif fixed[13] == 0x21:
                sport, dport = struct.unpack("!HH", body[32:36])
                self.headers.append(("PROXY", socket.inet_ntop(socket.AF_INET6, body[:16]), sport,
                                     socket.inet_ntop(socket.AF_INET6, body[16:32]), dport))  # fmt: skip
            else:
                self.errors.append(f"family {fixed[13]:#x}")
        except (OSError, ConnectionError) as e:
            self.errors.append(repr(e))
            c.close()
            return
        up = socket.create_connection(("127.0.0.1", self.redis_port))
        c.settimeout(None)
        threading.Thread(target=self._pump, args=(c, up), daemon=True).start()
        self._pump(up, c)

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.lsock.close()


def test_upstream_proxy_v2_to_an_intermediate_proxy(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    relay = V2Relay(redis_server.port)
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    pp_port = free_port()
    extra = (f'\n[[listener]]\nname = "pp"\ntype = "tcp"\naddress = "127.0.0.1:{pp_port}"\nproxy_protocol = true\n'
             'proxy_sources = ["127.0.0.0/8"]\n')  # fmt: skip
    p = start_proxy(tmp_path, certs, users, relay.port, extra=extra, upstream_extra="proxy_protocol = true")
    try:
        wait_port(pp_port, p.proc)
        assert ("LOCAL", "", 0, "", 0) in relay.headers  # redisguard's own connection (the command table)
        reply = tcp_call(pp_port, v1("203.0.113.30", 47001, "10.1.2.3", 6380) + auth("alice", "alice-pw") +
                         b"*3\r\n$3\r\nSET\r\n$7\r\ncache:p\r\n$2\r\nhi\r\n*2\r\n$3\r\nGET\r\n$7\r\ncache:p\r\n", 4)  # fmt: skip
        assert reply == b"+OK\r\n+OK\r\n$2\r\nhi\r\n"
        assert ("PROXY", "203.0.113.30", 47001, "10.1.2.3", 6380) in relay.headers  # the client behind the balancer
        with connect(p.plain_port) as s:  # a direct client: its own address and the listener's
            port = s.getsockname()[1]
            s.sendall(auth("alice", "alice-pw") + PING)
            assert read_until(s, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
        assert ("PROXY", "127.0.0.1", port, "127.0.0.1", p.plain_port) in relay.headers
        c = TLSOverRaw(p.tls_port, certs / "ca.pem", b"")  # a direct TLS client
        port = c.sock.getsockname()[1]
        assert c.call(auth("alice", "alice-pw") + PING, 2) == b"+OK\r\n+PONG\r\n"
        c.close()
        assert ("PROXY", "127.0.0.1", port, "127.0.0.1", p.tls_port) in relay.headers
        assert not relay.errors
    finally:
        p.stop()
        relay.close()


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
