"""One client connection and its own upstream connection: the byte pumps, flow control, timeouts.

Every protocol decision is in :mod:`redisguard.session`; this module moves bytes between the
transports and the session, bounds what each connection may make the event loop do per turn
(:class:`Slicer`), and runs what the session asks off the loop (throttle waits, huge decisions)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from .audit import get_logger
from .config import ListenerConfig
from .guards import source_allowed, source_key
from .session import Session
from .slicer import Slicer
from .tls import peer_identity

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")

if TYPE_CHECKING:
    from .server import Proxy


# Stop reading from one side when the other side's write buffer passes this (per connection).
HIGH_WATER = 1024 * 1024
class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.paused_by: set[str] = set()
        self.slicer = Slicer(self._received, lambda: self.pause("slice"), lambda: self.resume("slice"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.slicer.feed(data)

    def _received(self, data: bytes) -> None:
        if self.client.upstream is not self:
            return
        self.client.session.upstream_data(data)
        self.client.flush()

    def pause(self, why: str) -> None:
        if self.transport is not None and not self.paused_by:
            self.transport.pause_reading()
        self.paused_by.add(why)

    def resume(self, why: str) -> None:
        self.paused_by.discard(why)
        if self.transport is not None and not self.paused_by and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slicer.queue:  # relay what Redis sent before it closed, then mirror the close
            self.slicer.drained = self.client.upstream_lost
        else:
            self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()


def _peer(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"


def _source(peername: Any) -> str:
    """The source a per-source limit counts: the address (an IPv6 client by its /64)."""
    return source_key(str(peername[0])) if isinstance(peername, tuple) else ""


def _is_local(peername: Any) -> bool:
    """A unix-socket or loopback client: what Redis calls local (for DEBUG and MODULE LOAD)."""
    if not isinstance(peername, tuple):
        return True
    try:
        addr = ipaddress.ip_address(str(peername[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class ClientProtocol(asyncio.Protocol):
    def __init__(self, proxy: Proxy, listener: ListenerConfig) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamProtocol | None = None
        self.session: Session = None  # type: ignore[assignment]
        self.pending_upstream: list[bytes] = []
        self.closed = False
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.connect_task: asyncio.Task[None] | None = None
        self.paused_by: set[str] = set()
        self.waiting = False  # the session is paused: a throttle timer or an offloaded decision runs
        self.wake: asyncio.TimerHandle | None = None
        self.pending_bytes = 0  # bytes for the upstream held while it is being connected
        self.slicer = Slicer(self._received, lambda: self.pause_reading("slice"), lambda: self.resume_reading("slice"),
                             ready=lambda: not self.session.backlog and not self.session.paused,
                             before=self._continue)  # fmt: skip
        self.handshake_source: str | None = None  # set while this connection holds a pending-handshake slot
        self.eof = False  # the client half-closed: close once its requests are answered

    # -- lifecycle --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.end_handshake()
        if self.closed:
            return
        self.transport = transport  # type: ignore[assignment]
        self.proxy.clients.add(self)
        lst = self.listener
        m = self.proxy.metrics
        peername = transport.get_extra_info("peername")
        peer = _peer(peername)
        reason = self._refusal(peername)
        if reason:
            self.reject(transport, peername, reason)
            return
        self.counted = True
        self.proxy.active[lst.name] += 1
        m.connections.labels(lst.name).inc()
        m.connections_active.labels(lst.name).inc()
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]
        identity = self._certificate_identity(transport)
        self.session = Session(self.proxy.policy, lst.name, peer, identity, local=_is_local(peername))
        if identity and lst.cert_user:
            self.session.login_certificate(identity)
        self.proxy.events.log(audit.info, "connection_accepted", listener=lst.name, peer=peer, tls_identity=identity,
                              user=self.session.user.name if self.session.authenticated else "")  # fmt: skip
        timeout = self.proxy.config.limits.auth_timeout
        if timeout and not self.session.authenticated:  # a client certificate (or nopass default) has logged in
            self.timer = asyncio.get_running_loop().call_later(timeout, self._auth_timeout)
        if self.proxy.config.limits.idle_timeout:
            self.last_active = time.monotonic()
            self.idle_timer = asyncio.get_running_loop().call_later(self.proxy.config.limits.idle_timeout, self._check_idle)

    def reject(self, transport: asyncio.BaseTransport | socket.socket, peername: Any, reason: str) -> None:
        """Count, log (rate-limited) and close a refused connection: a transport, or an accepted socket
        that never got one (refused before its TLS handshake)."""
        lst = self.listener
        self.proxy.metrics.connections_rejected.labels(lst.name, reason).inc()
        self.proxy.events.log(audit.warning, "connection_rejected", listener=lst.name, peer=_peer(peername), reason=reason)
        self.closed = True
        self.proxy.clients.discard(self)
        if isinstance(transport, socket.socket):
            transport.close()
        else:
            transport.abort()
        self.proxy.closed_since_trim += 1

    def _refusal(self, peername: Any, handshake: bool = False) -> str:
        """Why this connection must be refused ("" = accept). ``handshake``: a TLS socket about to start
        its handshake, which must also fit the pending-handshake budget."""
        lst = self.listener
        proxy = self.proxy
        if lst.allowed_sources and isinstance(peername, tuple) and not source_allowed(peername[0], lst.allowed_sources):
            return "source_not_allowed"
        if proxy.active[lst.name] + proxy.handshakes.by_listener.get(lst.name, 0) >= lst.max_connections:
            return "limit"
        if proxy.fds_left() < proxy.config.limits.fd_reserve:
            return "fd_reserve"
        if handshake:
            return proxy.handshakes.refusal(_source(peername))
        return ""

    def start_handshake(self, peername: Any) -> None:
        """Take a pending-handshake slot (TLSServer, after _refusal said yes)."""
        self.handshake_source = _source(peername)
        self.proxy.handshakes.acquire(self.listener.name, self.handshake_source)

    def end_handshake(self) -> None:
        """Give the slot back: the handshake finished (connection_made) or failed; idempotent."""
        if self.handshake_source is not None:
            self.proxy.handshakes.release(self.listener.name, self.handshake_source)
            self.handshake_source = None

    def _certificate_identity(self, transport: asyncio.BaseTransport) -> str:
        """The name a verified client certificate gives (per the listener's cert_user), or ""."""
        lst = self.listener
        if lst.type != "tls":
            return ""
        sslobj = transport.get_extra_info("ssl_object")
        cert = sslobj.getpeercert() if sslobj is not None else None
        return peer_identity(cert, lst.cert_user or "cn") if cert else ""

    async def _connect_upstream(self) -> None:
        up = self.proxy.config.upstream
        loop = asyncio.get_running_loop()
        m = self.proxy.metrics
        start = time.perf_counter()
        try:
            if up.path:
                coro = loop.create_unix_connection(lambda: UpstreamProtocol(self), str(up.path))
            else:
                coro = loop.create_connection(
                    lambda: UpstreamProtocol(self), up.host, up.port, ssl=self.proxy.upstream_ssl,
                    server_hostname=(up.tls_server_name or up.host) if self.proxy.upstream_ssl else None,
                )  # fmt: skip
            _, proto = await asyncio.wait_for(coro, up.connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            m.upstream_connect_failures.inc()
            m.upstream_up.set(0)
            self.proxy.note_upstream_error(e)
            if not self.closed:
                self.session.upstream_failed(f"redisguard: upstream Redis at {up.where} is unavailable")
                self.flush()
            return
        m.upstream_connect_seconds.observe(time.perf_counter() - start)
        m.upstream_up.set(1)
        if self.closed:
            proto.transport.close()  # type: ignore[union-attr]
            return
        with contextlib.suppress(OSError):
            sock = proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = proto  # type: ignore[assignment]
        self.flush()

    def _check_idle(self) -> None:
        """Redis's `timeout`: close a client idle that long, unless blocked or subscribed."""
        if self.closed:
            return
        limit = self.proxy.config.limits.idle_timeout
        quiet = time.monotonic() - self.last_active
        if quiet >= limit and self.session.idle:
            self.proxy.events.log(audit.info, "connection_timeout", listener=self.listener.name, peer=self.session.peer,
                                  user=self.session.user.name, reason="idle")  # fmt: skip
            self.close()
            return
        self.idle_timer = asyncio.get_running_loop().call_later(max(limit - quiet, 0.1), self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        self.slicer.feed(data)

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        self.session.client_data(data)
        self._after_session()

    def _after_session(self) -> None:
        """After the session ran: start what it waits for (a throttle delay, a decision off the loop),
        not reading from the client meanwhile; then move the bytes."""
        s = self.session
        if self.timer is not None and s.authenticated:
            self.timer.cancel()
            self.timer = None
        if (s.backlog or (self.slicer.queue and not s.paused)) and not self.closed:
            self.slicer.kick()  # the session decided a batch (or resumed): the rest on the next turn
        elif self.eof:
            self._finish_input()
        if s.paused and not self.waiting and not self.closed:
            self.waiting = True
            self.pause_reading("session")
            loop = asyncio.get_running_loop()
            if s.offload is not None:
                job = loop.run_in_executor(self.proxy.executor, s.decide_offloaded, s.offload)
                job.add_done_callback(self._offload_done)
            else:
                self.wake = loop.call_later(s.wait, self._resume)
        self.flush()

    def _continue(self) -> None:
        """A new turn: let the session decide its next batch of requests."""
        if self.session.backlog and not self.closed:
            self.session.resume()
            self._after_session()

    def _resume(self) -> None:
        self.wake = None
        self.waiting = False
        if self.closed:
            return
        self.resume_reading("session")
        self.session.resume()
        self._after_session()

    def _offload_done(self, job: asyncio.Future[Any]) -> None:
        self.waiting = False
        if self.closed or job.cancelled():
            return
        if job.exception() is not None:
            log.error("internal_error", message="deciding a large request failed", error=repr(job.exception()))
            self.close()
            return
        self.resume_reading("session")
        self.session.offloaded(*job.result())
        self._after_session()

    def flush(self) -> None:
        s = self.session
        if s.to_upstream and self.connect_task is None:
            # The first request to forward: only now does this client cost Redis a connection.
            self.connect_task = asyncio.ensure_future(self._connect_upstream())
        if s.to_upstream:
            if self.upstream is not None and self.upstream.transport is not None:
                if self.pending_upstream:
                    s.to_upstream[:0] = self.pending_upstream
                    self.pending_upstream = []
                self.upstream.transport.write(b"".join(s.to_upstream))
            else:
                self.pending_upstream.extend(s.to_upstream)
                self.pending_bytes += sum(map(len, s.to_upstream))
                if self.pending_bytes > HIGH_WATER:  # hold no more than that while Redis is connecting
                    self.pause_reading("connect")
            s.to_upstream.clear()
        elif self.pending_upstream and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(b"".join(self.pending_upstream))
            self.pending_upstream = []
        if self.pending_bytes and not self.pending_upstream:
            self.pending_bytes = 0
            self.resume_reading("connect")
        if s.to_client and self.transport is not None and not self.closed:
            self.transport.write(b"".join(s.to_client))
            s.to_client.clear()
        if s.closing:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # flushes what is buffered first
        self._close_upstream()

    def _close_upstream(self) -> None:
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.upstream = None

    def _auth_timeout(self) -> None:
        self.timer = None
        if not self.closed:
            self.proxy.events.log(audit.info, "connection_timeout", listener=self.listener.name, peer=self.session.peer,
                                  reason="no authenticated command in time")  # fmt: skip
            self.transport.abort()  # type: ignore[union-attr]

    def upstream_lost(self) -> None:
        """Redis closed our connection (CLIENT KILL, `timeout`, a restart): the client sees its own
        connection close after the replies already relayed, as it would talking to Redis directly."""
        self.upstream = None
        if not self.closed:
            self.proxy.events.log(audit.info, "connection_closed", listener=self.listener.name, peer=self.session.peer,
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
        for timer in (self.timer, self.idle_timer, self.wake):
            if timer is not None:
                timer.cancel()
        self._close_upstream()
        if self.counted:
            self.proxy.active[self.listener.name] -= 1
            self.proxy.metrics.connections_active.labels(self.listener.name).dec()
        self.proxy.clients.discard(self)
        self.proxy.closed_since_trim += 1

    # -- backpressure -----------------------------------------------------------------------------
    # Reading from one side stops while the other side's write buffer is over HIGH_WATER, so memory
    # per connection stays bounded whatever the peers do: a client that does not read its replies
    # also stops being read (its refusals would otherwise pile up here), and Redis keeps the rest.
    def pause_writing(self) -> None:  # the client reads slowly
        if self.upstream is not None:
            self.upstream.pause("client")
        self.pause_reading("client")

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume("client")
        self.resume_reading("client")

    def pause_reading(self, why: str = "upstream") -> None:
        if self.transport is not None and not self.paused_by:
            self.transport.pause_reading()
        self.paused_by.add(why)

    def resume_reading(self, why: str = "upstream") -> None:
        self.paused_by.discard(why)
        if self.transport is not None and not self.paused_by and not self.closed:
            self.transport.resume_reading()
