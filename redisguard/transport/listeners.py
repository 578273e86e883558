"""Accepting TLS connections: the pending-handshake budget, the first-byte wait, handshake failures."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import ssl
import struct
import termios
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from redisguard.config.model import ListenerConfig
from redisguard.observe.audit import get_logger
from redisguard.protocol.proxy_header import MAX_HEADER, ProxyHeader, ProxyHeaderError, parse
from redisguard.transport.connection import ClientProtocol
from redisguard.transport.context import from_proxy, peer_name, source_of
from redisguard.transport.handshakes import Waiting

audit = get_logger("redisguard.audit")
# Every TCP and TLS listener (and the metrics port) binds with SO_REUSEPORT: [server] workers each bind
# their own socket, and a replacement process can bind while the one it replaces still listens or drains
# (docs/operations.md: a restart with no refused connection). Linux lets only a process of the same
# effective uid join a port bound this way, so no other user can take a share of the connections.
REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
# How early uvloop's handshake timer may fire against time.monotonic() (libuv's loop clock is cached
# per iteration and counts whole milliseconds).
HANDSHAKE_TIMER_SLACK = 0.05


if TYPE_CHECKING:
    from redisguard.transport.context import ConnectionContext


def _handshake_reason(exc: BaseException) -> str:
    """A bounded label for why a TLS handshake failed."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_client_cert"
    reason = str(getattr(exc, "reason", "") or "").upper()
    if "CERTIFICATE" in reason or "PEER_DID_NOT_RETURN" in reason:
        return "no_client_cert" if "PEER_DID_NOT_RETURN" in reason or "REQUIRED" in reason else "bad_client_cert"
    if isinstance(exc, ssl.SSLError):
        return "protocol"
    if isinstance(exc, ConnectionError | OSError):
        return "reset"
    return "other"


class TLSServer:
    """A TLS listener that accepts sockets itself, so every failed handshake is seen with its peer.

    ``loop.connect_accepted_socket(..., ssl=...)`` returns only after the handshake and raises when it
    fails, which is what metrics and the audit log need (uvloop's own TLS servers drop handshake
    errors silently, and ``start_tls`` from ``connection_made`` races with uvloop's first read).

    Every accepted socket is checked before any TLS work (source networks, the listener's
    max_connections counting pending handshakes, the handshake budget, the file-descriptor reserve);
    a refused one is closed at once."""

    def __init__(self, ctx: ConnectionContext, listener: ListenerConfig) -> None:
        self.ctx = ctx
        self.listener = listener
        sock = socket.create_server((listener.host, listener.port), family=_family(listener.host), backlog=1024,
                                    reuse_port=REUSE_PORT)  # fmt: skip
        sock.setblocking(False)
        self.sockets = [sock]
        self.pending: set[asyncio.Task[None]] = set()
        self.task = asyncio.ensure_future(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sockets[0]
        lst = self.listener
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                self.ctx.accept_failed(lst, e)
                await asyncio.sleep(0.1)
                continue
            client = ClientProtocol(self.ctx, lst)
            proxied = lst.proxy_protocol
            if proxied and not from_proxy(lst, addr):  # a PROXY header is trusted only from proxy_sources
                client.reject(conn, addr, "proxy_source_not_allowed")
                continue
            # refuse before spending a handshake on it (by the client's address once a PROXY header names it)
            reason = self.ctx.refusal(lst, addr, handshake=True, proxied=proxied)
            budget = self.ctx.handshakes
            source = "" if proxied else source_of(addr)
            if reason.startswith("handshake_limit"):
                # over a cap: wait for a slot (behind this source's earlier sockets), unless the queue is full
                accepted = time.monotonic()
                w = Waiting(lst.name, source, conn, partial(self._start, client, conn, addr, accepted),
                            partial(client.reject, conn, addr))  # fmt: skip
                if budget.wait(w, accepted + self.ctx.config.limits.handshake_timeout):
                    continue  # (the budget's sweep makes room for it once it has spoken)
            if reason:
                client.reject(conn, addr, reason)
                continue
            self._start(client, conn, addr, time.monotonic())

    def _start(self, client: ClientProtocol, conn: socket.socket, addr: Any, accepted: float) -> None:
        """Take a handshake slot and begin: the first bytes (or the PROXY header), then TLS."""
        proxied = self.listener.proxy_protocol
        client.admission.start_handshake(None if proxied else addr)
        task = asyncio.ensure_future(self._handshake(client, conn, addr, accepted))
        self.ctx.handshakes.silent[task] = ("" if proxied else source_of(addr), client.admission, time.monotonic())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[None]) -> None:
        self.ctx.handshakes.forget(task)

    async def _handshake(self, client: ClientProtocol, conn: socket.socket, addr: Any, accepted: float) -> None:
        loop = asyncio.get_running_loop()
        lst = self.listener
        ctx = self.ctx
        m = ctx.metrics
        deadline = accepted + ctx.config.limits.handshake_timeout  # (time spent waiting for a slot included)
        try:
            if lst.proxy_protocol:  # the PROXY header comes first, in cleartext, before the ClientHello
                real = await self._proxy_header(client, conn, addr, deadline)
                if real is None:
                    return  # refused, counted and logged
                addr = real
            # No TLS state (tens of KiB in OpenSSL and uvloop) until the whole ClientHello is here: till then
            # a connection costs a socket and this task, and stalls it can be evicted for (handshakes.py).
            await asyncio.wait_for(_client_hello(loop, conn), max(deadline - time.monotonic(), 0.001))
            current = asyncio.current_task()
            if current is not None:
                ctx.handshakes.hello_done(current)
            await loop.connect_accepted_socket(
                lambda: client, conn, ssl=ctx.tls_contexts[lst.name],
                ssl_handshake_timeout=max(deadline - time.monotonic(), 0.001),
            )  # fmt: skip
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            # (uvloop reports its own handshake timeout as ConnectionAbortedError: the deadline says which;
            # its timer runs on libuv's millisecond clock, so it may fire a little before our deadline)
            timed_out = isinstance(e, ConnectionAbortedError) and time.monotonic() >= deadline - HANDSHAKE_TIMER_SLACK
            why = "timeout" if timed_out else _handshake_reason(e)
            m.tls_handshake_failures.labels(lst.name, why).inc()
            m.connections_rejected.labels(lst.name, "handshake").inc()
            if why in ("no_client_cert", "bad_client_cert"):
                m.auth_failures.labels(lst.name, why).inc()
            ctx.events.log(audit.info, "tls_handshake_failed", listener=lst.name, peer=peer_name(addr), reason=why,
                             detail=str(getattr(e, "reason", "") or type(e).__name__))  # fmt: skip
            conn.close()
            ctx.churn_since_trim += 1
        except asyncio.CancelledError:  # the listener is closing
            conn.close()  # a no-op if uvloop took the socket over (it detaches it)
            raise
        finally:
            client.admission.end_handshake()  # a no-op when connection_made already ended it

    async def _proxy_header(self, client: ClientProtocol, conn: socket.socket, addr: Any, deadline: float) -> Any:
        """Read the PROXY header off the raw socket (exactly its bytes: the ClientHello stays there for
        TLS); the client's address, or the socket's peer for LOCAL/UNKNOWN; None when refused."""
        ctx, lst = self.ctx, self.listener
        try:
            header = await asyncio.wait_for(read_header(conn), max(deadline - time.monotonic(), 0.001))
        except ProxyHeaderError as e:
            reason, detail = e.reason, str(e)
        except TimeoutError:
            reason, detail = "timeout", "no complete PROXY header within handshake_timeout"
        except OSError as e:  # ConnectionResetError included: closed before the header ended
            reason, detail = "closed", f"closed before the end of the PROXY header ({type(e).__name__})"
        else:
            real = header.source or addr
            why = ctx.client_refusal(lst, real)
            if why:
                client.reject(conn, real, why)
                return None
            if header.source is not None:
                client.admission.proxied = header
                client.admission.move_handshake(real)
            return real
        ctx.proxy_header_failed(lst, addr, reason, detail)
        conn.close()
        client.closed = True
        return None

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.pending):
            t.cancel()
        self.sockets[0].close()


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    """Wait until the socket is readable, then peek at up to ``n`` bytes (b"": the peer closed)."""
    fd = conn.fileno()
    while True:
        ready = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            return conn.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue


# While a TLS record is partly in the socket it stays readable: its rest is polled for, this often at
# first, backing off (a ClientHello split over segments takes a round trip or two).
HELLO_POLL = (0.005, 0.1)


async def _client_hello(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Wait until the first TLS record (the ClientHello) is wholly in the socket, unread; return at the
    first byte of anything that is not a TLS handshake record (the TLS layer refuses it at once).
    ConnectionResetError if the peer closes first, so a flood that disconnects never costs TLS state."""
    head = await _peek(loop, conn, 5)
    delay = HELLO_POLL[0]
    while head and head[0] == 0x16 and len(head) < 5:
        await asyncio.sleep(delay)
        delay = min(delay * 2, HELLO_POLL[1])
        head = conn.recv(5, socket.MSG_PEEK)
    if not head:
        raise ConnectionResetError("closed before the TLS handshake")
    if head[0] != 0x16:
        return
    need = 5 + int.from_bytes(head[3:5], "big")
    while _queued(conn) < need:
        await asyncio.sleep(delay)
        delay = min(delay * 2, HELLO_POLL[1])
        if not conn.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("closed in the ClientHello")


def _queued(conn: socket.socket) -> int:
    """Bytes waiting in the socket, without copying them (FIONREAD)."""
    queued: int = struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    return queued


async def read_header(conn: socket.socket) -> ProxyHeader:
    """Read exactly one PROXY header from a non-blocking socket (ProxyHeaderError if it is not one).

    Peeks at most MAX_HEADER bytes, consumes only bytes the parser says are inside the header, so what
    follows (the TLS ClientHello) is left in the socket. The caller bounds the time (a slow peer costs
    one wake-up per segment)."""
    loop = asyncio.get_running_loop()
    got = b""
    while True:
        peek = await _peek(loop, conn, MAX_HEADER - len(got))
        if not peek:
            raise ConnectionResetError("closed in the PROXY header")
        header = parse(got + peek)
        got += conn.recv(len(peek) if header is None else header.length - len(got))
        if header is not None and len(got) == header.length:
            return header


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
