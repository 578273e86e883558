"""What a client connection goes through at its edges: admission (refusals, the pending-handshake
slot, a PROXY header's client) and endings (the auth and idle timeouts, the drain). Parts that
:class:`~redisguard.transport.connection.ClientProtocol` holds, one per job, each with its own state."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from typing import Any, Protocol

from redisguard.config.model import ListenerConfig
from redisguard.observe.audit import get_logger
from redisguard.protocol.proxy_header import ProxyHeader, build_v2
from redisguard.session.machine import Session
from redisguard.transport.context import ConnectionContext, peer_name, source_of
from redisguard.transport.slicer import Slicer

audit = get_logger("redisguard.audit")
# A draining client is closed once it has been at rest and silent this long.
DRAIN_QUIET = 0.1
# A TLS close waits for the client's close_notify (uvloop: up to 30 s), which an idle client that is not
# reading never sends: once every byte we sent, our close_notify included, is acknowledged by its TCP
# stack (nothing left in the kernel's send queue) the connection is cut, checked this often.
DRAIN_LINGER = 0.2


class Admission:
    """A connection's way in: the pending-handshake slot it holds (a TLS handshake, or a PROXY header
    awaited), the client a PROXY header named, and its refusal. The handshake budget holds it for the
    connection (a :class:`~redisguard.transport.handshakes.PendingClient`)."""

    __slots__ = ("ctx", "listener", "proxied", "source")

    def __init__(self, ctx: ConnectionContext, listener: ListenerConfig) -> None:
        self.ctx = ctx
        self.listener = listener
        self.source: str | None = None  # set while this connection holds a pending-handshake slot
        self.proxied: ProxyHeader | None = None  # the PROXY header that named the client (proxy_protocol listeners)

    def refuse(self, transport: asyncio.Transport | socket.socket, peername: Any, reason: str) -> None:
        """Count, log (rate-limited) and close a refused connection: a transport, or an accepted socket
        that never got one (refused before its TLS handshake)."""
        lst = self.listener
        self.ctx.metrics.connections_rejected.labels(lst.name, reason).inc()
        self.ctx.events.log(audit.warning, "connection_rejected", listener=lst.name, peer=peer_name(peername), reason=reason)
        if isinstance(transport, socket.socket):
            transport.close()
        else:
            transport.abort()
        self.ctx.churn_since_trim += 1

    def start_handshake(self, peername: Any) -> None:
        """Take a pending-handshake slot (TLSServer, after the refusal check said yes)."""
        self.source = source_of(peername)
        self.ctx.handshakes.acquire(self.listener.name, self.source)

    def move_handshake(self, peername: Any) -> None:
        """The pending slot now counts for the client a PROXY header named (its per-source budget)."""
        if self.source is not None:
            source = source_of(peername)
            self.ctx.handshakes.move(self.listener.name, self.source, source)
            self.source = source

    def end_handshake(self) -> None:
        """Give the slot back: the handshake finished (connection_made) or failed; idempotent."""
        if self.source is not None:
            self.ctx.handshakes.release(self.listener.name, self.source)
            self.source = None

    def evicted(self) -> None:
        """Its handshake stalled (silent) while a client that spoke waited for the slot: counted."""
        self.ctx.metrics.connections_rejected.labels(self.listener.name, "handshake_evicted").inc()

    def proxy_header(self, transport: asyncio.BaseTransport | None) -> bytes:
        """The PROXY v2 header for this client's upstream connection ([upstream] proxy_protocol): its
        address and the one it connected to (a PROXY header's, when one named it); LOCAL for unix clients."""
        if self.proxied is not None:
            return build_v2(self.proxied.source, self.proxied.destination)
        if transport is None:
            return build_v2(None, None)
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        ok = isinstance(peer, tuple) and isinstance(local, tuple)
        return build_v2((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))) if ok else build_v2(None, None)


class Connection(Protocol):
    """What the endings see of their connection (connection.py's ClientProtocol); waits.Waiter adds to it."""

    @property
    def ctx(self) -> ConnectionContext: ...
    @property
    def listener(self) -> ListenerConfig: ...
    @property
    def closed(self) -> bool: ...
    @property
    def session(self) -> Session: ...
    @property
    def slicer(self) -> Slicer: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Endings:
    """How an admitted connection is ended by us: the auth timeout, Redis's idle ``timeout``, the drain
    (its cut is :meth:`ClientProtocol.abort`)."""

    __slots__ = ("auth_timer", "conn", "drain_seen", "draining", "idle_timer", "last_active")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.auth_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.draining = False  # the proxy is stopping: close once answered and quiet (drain())
        self.drain_seen = False  # bytes arrived since the last drain check

    def start(self) -> None:
        """The connection was admitted: arm its timeouts (and drain it if the proxy is stopping already)."""
        ctx = self.conn.ctx
        if ctx.draining:  # admitted during the drain (a PROXY header or a handshake that just ended)
            self.drain()
        loop = asyncio.get_running_loop()
        timeout = ctx.config.limits.auth_timeout
        if timeout and not self.conn.session.authenticated:  # a client certificate (or nopass default) has logged in
            self.auth_timer = loop.call_later(timeout, self._auth_timeout)
        if ctx.config.limits.idle_timeout:
            self.last_active = time.monotonic()
            self.idle_timer = loop.call_later(ctx.config.limits.idle_timeout, self._check_idle)

    def authenticated(self) -> None:
        """The client logged in: no auth timeout any more."""
        if self.auth_timer is not None:
            self.auth_timer.cancel()
            self.auth_timer = None

    def stop(self) -> None:
        """The connection is gone: its timers with it."""
        for timer in (self.auth_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()

    def _check_idle(self) -> None:
        """Redis's `timeout`: close a client idle that long, unless blocked or subscribed."""
        conn = self.conn
        if conn.closed:
            return
        limit = conn.ctx.config.limits.idle_timeout
        quiet = time.monotonic() - self.last_active
        if quiet >= limit and conn.session.idle:
            conn.ctx.events.log(audit.info, "connection_timeout", listener=conn.listener.name, peer=conn.session.peer,
                                user=conn.session.user.name, reason="idle")  # fmt: skip
            conn.close()
            return
        self.idle_timer = asyncio.get_running_loop().call_later(max(limit - quiet, 0.1), self._check_idle)

    def _auth_timeout(self) -> None:
        self.auth_timer = None
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            conn.ctx.events.log(audit.info, "connection_timeout", listener=conn.listener.name, peer=conn.session.peer,
                                reason="no authenticated command in time")  # fmt: skip
            conn.transport.abort()

    def drain(self) -> None:
        """The proxy is stopping: answer what the client sends, and close it once nothing is in flight
        and it has sent nothing for DRAIN_QUIET seconds, so a pipeline still arriving is served whole.

        In flight: a request not yet answered (a blocked BLPOP included), a reply half sent, or an open
        MULTI (its EXEC is still to come). Subscribed and MONITOR clients are closed once quiet, as a
        Redis restart closes them (they resubscribe on reconnect)."""
        self.draining = True
        self.drain_seen = False
        asyncio.get_running_loop().call_later(DRAIN_QUIET, self._drain_check)

    def _drain_check(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        s = conn.session
        if s.at_rest and not s.state.in_multi and not self.drain_seen and not conn.slicer.queue and not s.to_client:
            conn.close()  # (what the transport still buffers is flushed before it closes)
            if conn.listener.type == "tls":
                asyncio.get_running_loop().call_later(DRAIN_LINGER, self._drain_linger)
            return
        self.drain_seen = False
        asyncio.get_running_loop().call_later(DRAIN_QUIET, self._drain_check)

    def _drain_linger(self) -> None:
        """A TLS client closed by the drain: cut once the peer has every byte (see DRAIN_LINGER)."""
        conn = self.conn
        if conn.closed or conn.transport is None:
            return
        if conn.transport.get_write_buffer_size() == 0 and _unsent(conn.transport) == 0:
            conn.abort()
            return
        asyncio.get_running_loop().call_later(DRAIN_LINGER, self._drain_linger)


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's kernel send queue not yet acknowledged by the peer (Linux SIOCOUTQ); -1 if
    unknown (the drain's deadline cuts the connection then)."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return -1
