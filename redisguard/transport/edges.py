"""What a client connection goes through at its edges: admission (refusals, the pending-handshake
slot, a PROXY header's client) and endings (the auth and idle timeouts, the drain, the cut). Mixins of
:class:`~redisguard.transport.connection.ClientProtocol`, split out by job; the state is the connection's."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from typing import Any

from redisguard.observe.audit import get_logger
from redisguard.protocol.proxy_header import build_v2
from redisguard.transport.context import peer_name, source_of

audit = get_logger("redisguard.audit")
# A draining client is closed once it has been at rest and silent this long.
DRAIN_QUIET = 0.1
# A TLS close waits for the client's close_notify (uvloop: up to 30 s), which an idle client that is not
# reading never sends: once every byte we sent, our close_notify included, is acknowledged by its TCP
# stack (nothing left in the kernel's send queue) the connection is cut, checked this often.
DRAIN_LINGER = 0.2


class Admission:
    __slots__ = ()

    def reject(self, transport: asyncio.BaseTransport | socket.socket, peername: Any, reason: str) -> None:
        """Count, log (rate-limited) and close a refused connection: a transport, or an accepted socket
        that never got one (refused before its TLS handshake)."""
        lst = self.listener
        self.ctx.metrics.connections_rejected.labels(lst.name, reason).inc()
        self.ctx.events.log(audit.warning, "connection_rejected", listener=lst.name, peer=peer_name(peername), reason=reason)
        self.closed = True
        self.ctx.clients.discard(self)
        if isinstance(transport, socket.socket):
            transport.close()
        else:
            transport.abort()
        self.ctx.churn_since_trim += 1

    def start_handshake(self, peername: Any) -> None:
        """Take a pending-handshake slot (TLSServer, after _refusal said yes)."""
        self.handshake_source = source_of(peername)
        self.ctx.handshakes.acquire(self.listener.name, self.handshake_source)

    def proxy_header(self) -> bytes:
        """The PROXY v2 header for this client's upstream connection ([upstream] proxy_protocol): its
        address and the one it connected to (a PROXY header's, when one named it); LOCAL for unix clients."""
        t = self.transport
        if self.proxied is not None:
            return build_v2(self.proxied.source, self.proxied.destination)
        if t is None:
            return build_v2(None, None)
        peer, local = t.get_extra_info("peername"), t.get_extra_info("sockname")
        ok = isinstance(peer, tuple) and isinstance(local, tuple)
        return build_v2((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))) if ok else build_v2(None, None)

    def evicted(self) -> None:
        """Its handshake stalled (silent) while a client that spoke waited for the slot: counted."""
        self.ctx.metrics.connections_rejected.labels(self.listener.name, "handshake_evicted").inc()

    def move_handshake(self, peername: Any) -> None:
        """The pending slot now counts for the client a PROXY header named (its per-source budget)."""
        if self.handshake_source is not None:
            source = source_of(peername)
            self.ctx.handshakes.move(self.listener.name, self.handshake_source, source)
            self.handshake_source = source

    def end_handshake(self) -> None:
        """Give the slot back: the handshake finished (connection_made) or failed; idempotent."""
        if self.handshake_source is not None:
            self.ctx.handshakes.release(self.listener.name, self.handshake_source)
            self.handshake_source = None


class Endings:
    __slots__ = ()

    def _check_idle(self) -> None:
        """Redis's `timeout`: close a client idle that long, unless blocked or subscribed."""
        if self.closed:
            return
        limit = self.ctx.config.limits.idle_timeout
        quiet = time.monotonic() - self.last_active
        if quiet >= limit and self.session.idle:
            self.ctx.events.log(audit.info, "connection_timeout", listener=self.listener.name, peer=self.session.peer,
                                  user=self.session.user.name, reason="idle")  # fmt: skip
            self.close()
            return
        self.idle_timer = asyncio.get_running_loop().call_later(max(limit - quiet, 0.1), self._check_idle)

    def _auth_timeout(self) -> None:
        self.timer = None
        if not self.closed:
            self.ctx.events.log(audit.info, "connection_timeout", listener=self.listener.name, peer=self.session.peer,
                                  reason="no authenticated command in time")  # fmt: skip
            self.transport.abort()  # type: ignore[union-attr]

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
        if self.closed:
            return
        s = self.session
        if s.at_rest and not s.state.in_multi and not self.drain_seen and not self.slicer.queue and not s.to_client:
            self.close()  # (what the transport still buffers is flushed before it closes)
            if self.listener.type == "tls":
                asyncio.get_running_loop().call_later(DRAIN_LINGER, self._drain_linger)
            return
        self.drain_seen = False
        asyncio.get_running_loop().call_later(DRAIN_QUIET, self._drain_check)

    def _drain_linger(self) -> None:
        """A TLS client closed by the drain: cut once the peer has every byte (see DRAIN_LINGER)."""
        if self.closed or self.transport is None:
            return
        if self.transport.get_write_buffer_size() == 0 and _unsent(self.transport) == 0:
            self.abort()
            return
        asyncio.get_running_loop().call_later(DRAIN_LINGER, self._drain_linger)

    def abort(self) -> None:
        """The drain's time is up: cut the connection."""
        if self.transport is not None:
            self.transport.abort()
        self.link.close()


def _unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's kernel send queue not yet acknowledged by the peer (Linux SIOCOUTQ); -1 if
    unknown (the drain's deadline cuts the connection then)."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return -1
