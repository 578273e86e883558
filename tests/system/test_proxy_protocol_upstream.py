"""[upstream] proxy_protocol, end to end: redisguard sends a PROXY v2 header to a proxy in front of Redis
(a relay that, like HAProxy with accept-proxy, requires one) naming the client behind a load balancer,
a direct client, or none for its own connections (LOCAL)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

from tests.helpers import USERS_ACL, RedisProc, free_port, read_until, start_proxy, wait_port
from tests.system.conftest import PING, SIG, TLSOverRaw, auth, connect, tcp_call, v1


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
