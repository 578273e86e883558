"""One client connection and its own upstream connection: the byte pumps, flow control, timeouts.

Every protocol decision is in :mod:`redisguard.session.core`; this module moves bytes between the
transports and the session, bounds what each connection may make the event loop do per turn
(:class:`Slicer`), and has what the paused session waits for carried out (:class:`~.waits.Waits`)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

from redisguard.config.model import ListenerConfig
from redisguard.observe.audit import get_logger
from redisguard.session.machine import Session, take
from redisguard.transport.context import ConnectionContext, is_local, peer_name, redis_addr, source_of
from redisguard.transport.edges import Admission, Endings
from redisguard.transport.slicer import Slicer
from redisguard.transport.tls import certificate_identity
from redisguard.transport.upstream_link import HIGH_WATER, UpstreamLink
from redisguard.transport.waits import Waits

audit = get_logger("redisguard.audit")


# One read buffer for every client connection. uvloop fills it and calls buffer_updated() at once,
# one connection at a time (one thread, one loop), so sharing it is safe. A plain Protocol would make
# uvloop's TLS path allocate 256 KiB per read (SSLObject.read) and shrink it: an mmap, mremap and munmap
# per read with glibc, ~25 µs of CPU per request at pipeline depth 1.
READ_BUFFER = memoryview(bytearray(256 * 1024))


class ClientProtocol(asyncio.BufferedProtocol):
    __slots__ = (
        "admission", "closed", "counted", "ctx", "endings", "eof", "link", "listener", "paused_by", "session",
        "slicer", "transport", "waits",
    )  # fmt: skip

    def __init__(self, ctx: ConnectionContext, listener: ListenerConfig) -> None:
        self.ctx = ctx
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.link = UpstreamLink(self, ctx)
        # None only until connection_made admits the client, before any byte is read (context.Client may see it)
        self.session: Session = None  # type: ignore[assignment]
        self.closed = False
        self.counted = False
        self.admission = Admission(ctx, listener)
        self.endings = Endings(self)
        self.paused_by: set[str] = set()
        self.waits = Waits(self)
        self.slicer = Slicer(self._received, lambda: self.pause_reading("slice"), lambda: self.resume_reading("slice"),
                             ready=lambda: not self.session.backlog and not self.session.paused,
                             before=self._continue)  # fmt: skip
        self.eof = False  # the client half-closed: close once its requests are answered

    # -- lifecycle --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.admission.source is not None:
            self.ctx.churn_since_trim += 1  # a TLS handshake's buffers were just freed
        self.admission.end_handshake()
        if self.closed:
            return
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream protocol's transport
        self.ctx.clients.add(self)
        lst = self.listener
        m = self.ctx.metrics
        proxied = self.admission.proxied
        peername = transport.get_extra_info("peername") if proxied is None else proxied.source
        peer = peer_name(peername)
        reason = self.ctx.refusal(lst, peername)
        if reason:
            self.reject(transport, peername, reason)
            return
        self.counted = True
        self.ctx.active[lst.name] += 1
        m.connections.labels(lst.name).inc()
        m.connections_active.labels(lst.name).inc()
        transport.set_write_buffer_limits(high=HIGH_WATER)
        identity = certificate_identity(transport, lst)
        self.session = Session(self.ctx.shared, lst.name, peer, identity, local=is_local(peername),
                               source=source_of(peername) or peer)  # fmt: skip
        # As Redis would show this client: its address (a PROXY header's), the listener's that it reached.
        local = transport.get_extra_info("sockname") if proxied is None or proxied.destination is None \
            else proxied.destination  # fmt: skip
        self.session.state.addrs = (redis_addr(peername, lst.path), redis_addr(local, lst.path))
        self.session.core.peers = self.ctx.upstream_clients
        if lst.cert_user and (identity or transport.get_extra_info("peercert")):
            self.session.login_certificate(identity)
            if self.session.closing:  # unmapped_cert = "refuse": a verified certificate that names no user
                return self.close()
        via = {} if proxied is None else {"via": peer_name(transport.get_extra_info("peername"))}  # the load balancer
        self.ctx.events.log(audit.info, "connection_accepted", listener=lst.name, peer=peer, tls_identity=identity,
                              user=self.session.user.name if self.session.authenticated else "", **via)  # fmt: skip
        self.endings.start()

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        e = self.endings
        if e.draining:
            e.drain_seen = True
        if e.idle_timer is not None:
            e.last_active = time.monotonic()
        self.slicer.feed(data)

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        self.session.client_data(data)
        self.after_session()

    def after_session(self) -> None:
        """After the session ran: start what it waits for (a throttle delay, a decision off the loop), then move bytes."""
        s = self.session
        if s.authenticated and self.endings.auth_timer is not None:
            self.endings.authenticated()
        if (s.backlog or (self.slicer.queue and not s.paused)) and not self.closed:
            self.slicer.kick()  # the session decided a batch (or resumed): the rest on the next turn
        elif self.eof:
            self._finish_input()
        if s.paused and not self.waits.waiting and not self.closed:
            self.waits.start(s.effect)
        self.flush()

    def _continue(self) -> None:
        """A new turn: let the session decide its next batch of requests."""
        if self.session.backlog and not self.closed:
            self.session.resume()
            self.after_session()

    def flush(self) -> None:
        s = self.session
        if s.to_upstream:
            self.link.send(take(s.to_upstream))
        if s.to_client and self.transport is not None and not self.closed:
            self.transport.write(take(s.to_client))
        if s.closing:
            self.close()

    def upstream_received(self) -> None:
        """Redis's bytes were handled: a session held for one of its replies may go on now."""
        if self.waits.held_for_upstream():
            self.waits.resume()
        else:
            self.flush()

    def upstream_failed(self, message: str) -> None:
        """The upstream connection could not be made: the client is told so, and closed."""
        if not self.closed:
            self.session.upstream_failed(message)
            self.flush()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered first
        self.link.close()

    def abort(self) -> None:
        """The drain's time is up: cut the connection."""
        if self.transport is not None:
            self.transport.abort()
        self.link.close()

    def drain(self) -> None:
        self.endings.drain()

    def reject(self, transport: asyncio.Transport | socket.socket, peername: Any, reason: str) -> None:
        """Refuse this connection (counted, logged, closed: Admission.refuse)."""
        self.closed = True
        self.ctx.clients.discard(self)
        self.admission.refuse(transport, peername, reason)

    def proxy_header(self) -> bytes:
        return self.admission.proxy_header(self.transport)

    def upstream_lost(self) -> None:
        """Redis closed our connection (CLIENT KILL, `timeout`, a restart): the client sees its own
        connection close after the replies already relayed, as it would talking to Redis directly."""
        self.link.protocol = None
        if not self.closed:
            self.ctx.events.log(audit.info, "connection_closed", listener=self.listener.name, peer=self.session.peer,
                                  user=self.session.user.name, reason="upstream closed the connection")  # fmt: skip
            self.flush()
            self.close()

    def eof_received(self) -> bool | None:
        """The client half-closed (shutdown(SHUT_WR)): answer what it sent, then close, as Redis does.
        (asyncio's TLS transports cannot stay half-open: there the connection just closes.)"""
        if self.listener.type == "tls" or self.closed:
            return None
        self.eof = True
        self._finish_input()
        return True

    def _finish_input(self) -> None:
        s = self.session
        if self.eof and not self.closed and not self.slicer.queue and not s.backlog and not s.paused:
            s.end_of_input()
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.slicer.clear()
        self.session.kill()  # what it holds goes now, not when the GC finds this protocol's cycles
        self.endings.stop()
        self.waits.stop()
        self.link.close()
        if self.counted:
            self.ctx.active[self.listener.name] -= 1
            self.ctx.metrics.connections_active.labels(self.listener.name).dec()
        self.ctx.clients.discard(self)
        self.ctx.churn_since_trim += 1

    # -- backpressure -----------------------------------------------------------------------------
    # Reading from one side stops while the other side's write buffer is over HIGH_WATER, so memory
    # per connection stays bounded whatever the peers do: a client that does not read its replies
    # also stops being read (its refusals would otherwise pile up here), and Redis keeps the rest.
    def pause_writing(self) -> None:  # the client reads slowly
        self.link.pause("client")
        self.pause_reading("client")

    def resume_writing(self) -> None:
        self.link.resume("client")
        self.resume_reading("client")

    def pause_reading(self, why: str = "upstream") -> None:
        if self.transport is not None and not self.paused_by:
            self.transport.pause_reading()
        self.paused_by.add(why)

    def resume_reading(self, why: str = "upstream") -> None:
        self.paused_by.discard(why)
        if self.transport is not None and not self.paused_by and not self.closed:
            self.transport.resume_reading()
