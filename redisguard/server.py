"""asyncio transports: listeners, one upstream connection per client, backpressure, shutdown.

Thin by design: every protocol decision is in :mod:`redisguard.session`; this module moves bytes,
enforces connection-level guards (source networks, connection limits, timeouts) and reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import gc
import ipaddress
import os
import resource
import signal
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from . import certs
from .acl import ACLError, ACLReplies, User, UsersFileError, load_users
from .acl.users_file import missing_default_message
from .audit import EventLimiter, RateLimiter, get_logger
from .commands import CommandTable
from .config import Config, ListenerConfig
from .guards import AuthThrottle, source_allowed, source_key
from .metrics import Metrics, serve_http
from .resp import encode_command
from .session import Policy, Session
from .tls import TLSConfigError, peer_identity, server_context, upstream_context

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")

# Stop reading from one side when the other side's write buffer passes this (per connection).
HIGH_WATER = 1024 * 1024
# At most this many bytes of one read are handled per event-loop turn (see Slicer).
SLICE = 16 * 1024


class Slicer:
    """Hands reads to ``handle`` at most SLICE bytes per event-loop turn, pausing the transport meanwhile.

    libuv reads a socket up to 32 times per turn, 256 KiB at a time; parsing and deciding that many
    tiny requests (or scanning that many reply frames) would be seconds of Python. Sliced, the work one
    connection gets per turn is bounded by SLICE bytes (and the session's BATCH of decisions), whatever
    it sends, and every other connection gets its turn in between. ``ready`` says whether the consumer
    can take more (a session still working through a batch cannot); ``before`` runs at each turn."""

    __slots__ = ("handle", "pause", "resume", "ready", "before", "queue", "used", "scheduled", "drained")

    def __init__(self, handle: Callable[[bytes], None], pause: Callable[[], None], resume: Callable[[], None],
                 ready: Callable[[], bool] = lambda: True, before: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.handle = handle
        self.pause = pause
        self.resume = resume
        self.ready = ready
        self.before = before
        self.queue: deque[tuple[bytes, int]] = deque()
        self.used = 0  # bytes handled since the last turn began
        self.scheduled = False
        self.drained: Callable[[], None] | None = None  # called once the queue is empty

    def feed(self, data: bytes) -> None:
        if not self.queue and self.used + len(data) <= SLICE and not self.scheduled:
            self.used += len(data)  # the common case: a small read, handled at once
            self.handle(data)
            if self.used >= SLICE // 2:
                self.kick()
            return
        self.queue.append((data, 0))
        if not self.scheduled:
            self._pump()

    def kick(self) -> None:
        """Come back on the next turn (and read nothing new until the queue is done)."""
        if not self.scheduled:
            self.scheduled = True
            self.pause()
            asyncio.get_running_loop().call_soon(self._turn)

    def _pump(self) -> None:
        while self.queue and self.used < SLICE and self.ready():
            data, start = self.queue[0]
            end = min(len(data), start + SLICE - self.used)
            if end >= len(data):
                self.queue.popleft()
            else:
                self.queue[0] = (data, end)
            piece = data if start == 0 and end == len(data) else data[start:end]
            self.used += len(piece)
            self.handle(piece)
        if self.queue or not self.ready():
            self.kick()

    def _turn(self) -> None:
        self.scheduled = False
        self.used = 0
        self.before()
        self._pump()
        if not self.scheduled:
            self.resume()
        if not self.queue and self.drained is not None:
            done, self.drained = self.drained, None
            done()

    def clear(self) -> None:
        self.queue.clear()
# The housekeeping timer: event-loop lag is how late it fires; it also decides when to trim memory.
TICK = 0.25
# malloc_trim(0) only after at least this many connections closed since the last trim.
TRIM_AFTER_CLOSES = 64


class Observer:
    """Turns session events into metrics and audit-log lines."""

    def __init__(
        self,
        metrics: Metrics,
        users: dict[str, User],
        count: bool = True,
        audit_keys: bool = False,
        rate: float = 100.0,
    ) -> None:
        self.metrics = metrics
        self.users = users
        self.count = count  # false: no per-request metrics (to measure what they cost)
        self.audit_keys = audit_keys
        self.limiter = RateLimiter(per_second=rate, burst=int(rate * 2) + 1, on_suppressed=metrics.audit_suppressed.inc)
        self._allowed: dict[tuple[str, str], int] = {}
        metrics.before_render.append(self.flush)

    def flush(self) -> None:
        """Move the allowed-command tallies into redisguard_commands_total (called before a scrape)."""
        counts, self._allowed = self._allowed, {}
        for (user, cmd), n in counts.items():
            self.metrics.commands.labels(user, cmd, "allowed").inc(n)

    def reply_latency(self, seconds: float) -> None:
        if self.count:
            self.metrics.upstream_reply_seconds.observe(seconds)

    def _user(self, name: str) -> str:
        return name if name in self.users else "unknown"

    def command(self, session: Session, cmd: str, allowed: bool, reason: str) -> None:
        user = session.user.name
        if reason in _REQUEST_ERRORS:
            if self.count:
                self.metrics.request_errors.labels(reason).inc()
            return
        if not self.count:
            if not allowed:
                self.limiter.log(self._audit_denied, "command_denied", session=session, user=user, cmd=cmd, reason=reason)
            return
        if allowed:
            # The hot path: a plain dict increment, moved into the Prometheus counter at scrape time.
            key = (user, cmd)
            allowed_counts = self._allowed
            allowed_counts[key] = allowed_counts.get(key, 0) + 1
            return
        self.metrics.commands.labels(user, cmd, "denied").inc()
        self.metrics.denied.labels(user, cmd, reason).inc()
        self.limiter.log(self._audit_denied, "command_denied", session=session, user=user, cmd=cmd, reason=reason)

    def _audit_denied(self, event: str, session: Session, user: str, cmd: str, reason: str) -> None:
        extra = {"keys": session.last_keys()} if self.audit_keys else {}  # only for the lines that are written
        audit.warning(event, user=user, command=cmd, reason=reason, listener=session.listener,
                      peer=session.peer, tls_identity=session.tls_identity, **extra)  # fmt: skip

    def throttled(self, session: Session, delay: float) -> None:
        self.metrics.auth_throttled.labels(session.listener).inc()

    def auth(self, session: Session, ok: bool, username: str, reason: str, method: str) -> None:
        if ok:
            self.metrics.auth_successes.labels(session.listener, method).inc()
            audit.info("auth_success", user=username, method=method, listener=session.listener,
                       peer=session.peer, tls_identity=session.tls_identity)  # fmt: skip
        else:
            self.metrics.auth_failures.labels(session.listener, reason).inc()
            self.limiter.log(audit.warning, "auth_failure", user=self._user(username), reason=reason,
                             listener=session.listener, peer=session.peer,
                             tls_identity=session.tls_identity)  # fmt: skip


_REQUEST_ERRORS = frozenset({"unknown_command", "arity", "unsupported", "protocol", "context", "protected"})


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


class HandshakeBudget:
    """TLS handshakes in progress, counted globally, per listener and per source address.

    A pending handshake holds a socket and uvloop's TLS state (tens of KiB) before the peer has proved
    anything, so the accept loop asks :meth:`refusal` before spending any TLS work on a new socket.
    The per-source table only holds sources with a handshake in progress: at most ``total`` entries.

    Sockets that have not sent a byte yet are "silent": when a cap is full, a newcomer evicts the
    oldest silent socket (of its own source, for the per-source cap) instead of being refused, so
    holding the budget with idle sockets does not lock real clients out — a client's own silent
    window is one round trip, an attacker's sockets would have to be renewed faster than that."""

    def __init__(self, total: int, per_source: int, gauge: Any) -> None:
        self.total = total
        self.per_source = per_source
        self.gauge = gauge
        self.count = 0
        self.by_listener: dict[str, int] = {}
        self.by_source: dict[str, int] = {}
        # oldest first: task -> (source, client)
        self.silent: OrderedDict[asyncio.Future[None], tuple[str, ClientProtocol]] = OrderedDict()

    def evict(self, source: str | None) -> bool:
        """Cancel the oldest silent handshake (of ``source``, if given); False if there is none."""
        for task, (src, client) in self.silent.items():
            if source is None or src == source:
                del self.silent[task]
                client.end_handshake()  # its slot is free now, not when the task unwinds
                task.cancel()
                return True
        return False

    def refusal(self, source: str) -> str:
        if self.count >= self.total:
            return "handshake_limit"
        if self.by_source.get(source, 0) >= self.per_source:
            return "handshake_limit_source"
        return ""

    def acquire(self, listener: str, source: str) -> None:
        self.count += 1
        self.by_listener[listener] = self.by_listener.get(listener, 0) + 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.gauge.labels(listener).inc()

    def release(self, listener: str, source: str) -> None:
        self.count -= 1
        self.by_listener[listener] -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]
        self.gauge.labels(listener).dec()


class TLSServer:
    """A TLS listener that accepts sockets itself, so every failed handshake is seen with its peer.

    ``loop.connect_accepted_socket(..., ssl=...)`` returns only after the handshake and raises when it
    fails, which is what metrics and the audit log need (uvloop's own TLS servers drop handshake
    errors silently, and ``start_tls`` from ``connection_made`` races with uvloop's first read).

    Every accepted socket is checked before any TLS work (source networks, the listener's
    max_connections counting pending handshakes, the handshake budget, the file-descriptor reserve);
    a refused one is closed at once."""

    def __init__(self, proxy: Proxy, listener: ListenerConfig) -> None:
        self.proxy = proxy
        self.listener = listener
        sock = socket.create_server((listener.host, listener.port), family=_family(listener.host), backlog=1024,
                                    reuse_port=False)  # fmt: skip
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
                self.proxy.accept_failed(lst, e)
                await asyncio.sleep(0.1)
                continue
            client = ClientProtocol(self.proxy, lst)
            reason = client._refusal(addr, handshake=True)  # refuse before spending a handshake on it
            budget = self.proxy.handshakes
            source = _source(addr)
            if reason.startswith("handshake_limit") and budget.evict(source if reason.endswith("source") else None):
                self.proxy.metrics.connections_rejected.labels(lst.name, "handshake_evicted").inc()
                reason = ""  # an idle socket made room
            if reason:
                client.reject(conn, addr, reason)
                continue
            client.start_handshake(addr)
            task = asyncio.ensure_future(self._handshake(client, conn, addr))
            budget.silent[task] = (source, client)
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[None]) -> None:
        self.proxy.handshakes.silent.pop(task, None)

    async def _handshake(self, client: ClientProtocol, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        lst = self.listener
        proxy = self.proxy
        m = proxy.metrics
        timeout = proxy.config.limits.handshake_timeout
        deadline = time.monotonic() + timeout
        try:
            # No TLS state (tens of KiB in OpenSSL and uvloop) until the ClientHello starts to arrive:
            # a silent connection costs a socket and this task.
            await asyncio.wait_for(_first_bytes(loop, conn), timeout)
            current = asyncio.current_task()
            if current is not None:
                proxy.handshakes.silent.pop(current, None)  # it spoke: no longer evictable
            await loop.connect_accepted_socket(
                lambda: client, conn, ssl=proxy.tls_contexts[lst.name],
                ssl_handshake_timeout=max(deadline - time.monotonic(), 0.001),
            )  # fmt: skip
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            why = _handshake_reason(e)
            m.tls_handshake_failures.labels(lst.name, why).inc()
            m.connections_rejected.labels(lst.name, "handshake").inc()
            if why in ("no_client_cert", "bad_client_cert"):
                m.auth_failures.labels(lst.name, why).inc()
            proxy.events.log(audit.info, "tls_handshake_failed", listener=lst.name, peer=_peer(addr), reason=why,
                             detail=str(getattr(e, "reason", "") or type(e).__name__))  # fmt: skip
            conn.close()
            proxy.closed_since_trim += 1
        except asyncio.CancelledError:  # the listener is closing
            conn.close()  # a no-op if uvloop took the socket over (it detaches it)
            raise
        finally:
            client.end_handshake()  # a no-op when connection_made already ended it

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.pending):
            t.cancel()
        self.sockets[0].close()


async def _first_bytes(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Wait until the peer sends something (its ClientHello); ConnectionResetError if it closes first,
    so a flood that disconnects never costs TLS state either."""
    fd = conn.fileno()
    while True:
        ready = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            if conn.recv(1, socket.MSG_PEEK):
                return
        except (BlockingIOError, InterruptedError):
            continue
        raise ConnectionResetError("closed before the TLS handshake")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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
        identity, cert_user = self._certificate_user(transport, peer)
        if self.closed:
            return
        self.session = Session(self.proxy.policy, lst.name, peer, cert_user, identity, local=_is_local(peername))
        self.proxy.events.log(audit.info, "connection_accepted", listener=lst.name, peer=peer, tls_identity=identity,
                              user=cert_user.name if cert_user else "")  # fmt: skip
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

    def _certificate_user(self, transport: asyncio.BaseTransport, peer: str) -> tuple[str, User | None]:
        lst = self.listener
        if lst.type != "tls":
            return "", None
        sslobj = transport.get_extra_info("ssl_object")
        cert = sslobj.getpeercert() if sslobj is not None else None
        identity = peer_identity(cert, lst.cert_user or "cn") if cert else ""
        if not lst.cert_user or not identity:
            return identity, None
        user = self.proxy.policy.users.get(identity)
        m = self.proxy.metrics
        if user is None or not user.enabled:
            m.auth_failures.labels(lst.name, "bad_client_cert").inc()
            audit.warning("auth_failure", user="unknown" if user is None else user.name,
                          reason="bad_client_cert", method="client_cert", listener=lst.name, peer=peer,
                          tls_identity=identity)  # fmt: skip
            return identity, None
        m.auth_successes.labels(lst.name, "client_cert").inc()
        audit.info("auth_success", user=user.name, method="client_cert", listener=lst.name, peer=peer,
                   tls_identity=identity)  # fmt: skip
        return identity, user

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


def _release(users: dict[str, User]) -> None:
    """Drop the previous users one at a time (in a worker thread, so the loop gets turns between)."""
    while users:
        users.popitem()


async def upstream_request(config: Config, commands: list[list[bytes]], timeout: float) -> list[Any]:
    """Open a connection to the upstream as the service user, run ``commands``, return the replies."""
    up = config.upstream
    ctx = upstream_context(up)
    if up.path:
        opening = asyncio.open_unix_connection(str(up.path))
    else:
        opening = asyncio.open_connection(
            up.host, up.port, ssl=ctx, server_hostname=(up.tls_server_name or up.host) if ctx else None
        )
    reader, writer = await asyncio.wait_for(opening, up.connect_timeout)
    try:
        auth = Policy.auth_command(up.username, up.password)
        writer.write(auth + b"".join(encode_command(c) for c in commands))
        want = len(commands) + (1 if auth else 0)
        rd = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < want:
            data = await asyncio.wait_for(reader.read(1 << 20), timeout)
            if not data:
                raise ConnectionError("upstream closed the connection")
            rd.feed(data)
            while (r := rd.gets()) is not False:
                replies.append(r)
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise ConnectionError(str(r))
        return replies[-len(commands) :]
    finally:
        writer.close()


async def fetch_command_table(config: Config) -> CommandTable:
    """COMMAND INFO, ACL CAT and the version from the upstream itself."""
    info, cats, server = await upstream_request(
        config, [[b"COMMAND", b"INFO"], [b"ACL", b"CAT"], [b"INFO", b"server"]], config.upstream.connect_timeout * 5
    )
    version = "unknown"
    for line in server.decode().splitlines():
        if line.startswith("redis_version:"):
            version = line.split(":", 1)[1]
    return CommandTable(info, [c.decode() for c in cats], version)


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.servers: list[asyncio.AbstractServer | TLSServer] = []
        self.clients: set[ClientProtocol] = set()
        self.active = {lst.name: 0 for lst in config.listeners}
        self.upstream_ssl = upstream_context(config.upstream)
        self.policy: Policy = None  # type: ignore[assignment]
        self.table: CommandTable = None  # type: ignore[assignment]
        self.last_upstream_error = ""
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self.reloading: asyncio.Future[None] | None = None
        self.background: set[asyncio.Future[None]] = set()
        self.reload_again = False
        # Decisions on huge requests run here, one at a time, so they never stall the event loop.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="redisguard-decide")
        lim = config.limits
        self.handshakes = HandshakeBudget(lim.max_pending_handshakes, lim.max_handshakes_per_source,
                                          self.metrics.tls_handshakes_pending)  # fmt: skip
        # Connection events are rate-limited per event name; what is dropped is counted.
        self.events = EventLimiter(config.log.audit_connections_per_second, self.metrics.audit_suppressed.inc)
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_base = 0  # descriptors open before the first client: listeners, logs, the loop's own
        self.metrics.fd_accounted.set_function(lambda: self.fd_limit - self.fds_left())
        self.closed_since_trim = 0
        self.trim = _malloc_trim()
        self.next_trim = 0.0
        self.tick_due = 0.0
        self.tick_handle: asyncio.TimerHandle | None = None

    def fds_left(self) -> int:
        """File descriptors not yet used or promised. Each client counts two, its own and the upstream
        connection it may open at its first command, so logged-in clients never find the table full."""
        return self.fd_limit - self.fd_base - 2 * len(self.clients) - self.handshakes.count

    def accept_failed(self, lst: ListenerConfig, e: OSError) -> None:
        self.metrics.accept_failures.labels(lst.name, errno.errorcode.get(e.errno or 0, "other")).inc()
        self.events.log(log.warning, "accept_failed", listener=lst.name, error=str(e))

    def _tick(self) -> None:
        """Every TICK seconds: observe how late this timer fired (event-loop lag); now and then, give
        memory freed by closed connections back to the OS (glibc keeps it otherwise)."""
        now = time.monotonic()
        self.metrics.event_loop_lag.observe(max(0.0, now - self.tick_due))
        self.tick_due = now + TICK
        self.tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)
        interval = self.config.limits.memory_trim_interval
        if interval and self.trim is not None and now >= self.next_trim and self.closed_since_trim >= TRIM_AFTER_CLOSES:
            self.next_trim = now + interval
            closed, self.closed_since_trim = self.closed_since_trim, 0
            self.trim()
            self.metrics.malloc_trims.inc()
            log.debug("malloc_trim", closed=closed, seconds=round(time.monotonic() - now, 4))

    def note_upstream_error(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last_upstream_error:
            log.warning("upstream_unavailable", upstream=self.config.upstream.where, error=msg)
        self.last_upstream_error = msg

    async def load_policy(self) -> None:
        cfg = self.config
        table = None
        if cfg.upstream.fetch_command_table:
            try:
                table = await fetch_command_table(cfg)
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                log.warning("command_table_fallback", reason=str(e) or type(e).__name__,
                            detail="using the shipped Redis 7.0 snapshot")  # fmt: skip
        self.table = table or CommandTable.snapshot()
        users = load_users(cfg.acl.users_file, self.table)
        if users["default"].implicit:  # Redis's open default; a reload would refuse this file
            log.warning("users_file_implicit_default", detail=missing_default_message(str(cfg.acl.users_file)))
        observer = Observer(self.metrics, users, cfg.metrics.enabled, cfg.log.audit_keys, cfg.log.audit_denied_per_second)
        self.policy = Policy(
            self.table, users, frozenset(cfg.acl.disabled_commands), cfg.upstream.username,
            cfg.upstream.password, cfg.limits.max_request_bytes, observer,
            AuthThrottle(cfg.limits.auth_failures_per_minute), ACLReplies(users).prepare(),
            cfg.acl.enable_debug_command, cfg.acl.enable_module_command, str(cfg.acl.users_file),
        )  # fmt: skip
        self.policy.on_users_changed = self._users_changed
        self.metrics.set_build_info(self.table.redis_version)

    async def start(self) -> None:
        self.fd_limit = _raise_fd_limit()
        self.metrics.fd_limit.set(self.fd_limit)
        await self.load_policy()
        gc.collect()
        gc.freeze()  # the users and the command table live as long as the process: keep them out of GC passes
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._exception_handler)
        for lst in self.config.listeners:
            factory = self._factory(lst)
            if lst.type == "unix":
                assert lst.path is not None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lst.path)
                srv = await loop.create_unix_server(factory, str(lst.path))
                os.chmod(lst.path, lst.socket_mode)
            elif lst.type == "tls":
                self._load_certificates(lst)
                srv = TLSServer(self, lst)  # type: ignore[assignment]
            else:
                srv = await loop.create_server(factory, lst.host, lst.port, reuse_address=True, backlog=1024)
            self.servers.append(srv)
        if self.config.metrics.enabled:
            m = self.config.metrics
            self.servers.append(await serve_http(self.metrics, m.host, m.port, self.ready))
        self.fd_base = _open_fds()
        self.tick_due = time.monotonic() + TICK
        self.tick_handle = loop.call_later(TICK, self._tick)
        log.info(
            "redisguard_started",
            listeners=[f"{lst.name}={lst.type}://{self.bound(i)}" for i, lst in enumerate(self.config.listeners)],
            upstream=self.config.upstream.where,
            redis_version=self.table.redis_version,
            users=sorted(self.policy.users),
            metrics=f"http://{self.config.metrics.host}:{self.metrics_port()}/metrics"
            if self.config.metrics.enabled else "off",
            fd_limit=self.fd_limit, malloc_trim=self.trim is not None,
        )  # fmt: skip

    def bound(self, index: int) -> str:
        lst = self.config.listeners[index]
        if lst.type == "unix":
            return str(lst.path)
        sock = self.servers[index].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    def metrics_port(self) -> int:
        if not self.config.metrics.enabled:
            return 0
        return int(self.servers[len(self.config.listeners)].sockets[0].getsockname()[1])

    def _factory(self, lst: ListenerConfig) -> Any:
        return lambda: ClientProtocol(self, lst)

    def _load_certificates(self, lst: ListenerConfig) -> None:
        """Build the listener's TLS context (new handshakes use it) and export expiry times."""
        self.tls_contexts[lst.name] = server_context(lst)
        self._export_expiry(lst)

    def _export_expiry(self, lst: ListenerConfig) -> None:
        assert lst.tls is not None
        self.metrics.cert_expiry.labels(f"{lst.name}:server").set(certs.not_after(lst.tls.cert_file))
        if lst.tls.ca_file:
            self.metrics.cert_expiry.labels(f"{lst.name}:ca").set(certs.not_after(lst.tls.ca_file))

    def reload(self) -> None:
        """SIGHUP: re-read the users file and every listener's certificates, off the event loop.

        A SIGHUP during a reload runs one more reload after it (the files may have changed again)."""
        if self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            return
        self.reloading = asyncio.ensure_future(self._reload())

    async def _reload(self) -> None:
        """All or nothing: parse and build everything in a worker thread, then swap it in at once.

        New handshakes and logins use the new files; see _rebind_sessions for connected clients. A
        users file without an explicit `user default` line is refused: Redis would make `default`
        `on nopass +@all`, silently opening the proxy to anyone."""
        cfg = self.config
        tls = [lst for lst in cfg.listeners if lst.type == "tls"]

        def load() -> tuple[dict[str, User], ACLReplies, dict[str, ssl.SSLContext]]:
            users = load_users(cfg.acl.users_file, self.table, require_default=True)
            return users, ACLReplies(users).prepare(), {lst.name: server_context(lst) for lst in tls}

        while True:
            self.reload_again = False
            # A full garbage collection over 10,000 users' command sets holds the GIL for ~60 ms,
            # wherever it runs: none while loading, and what is loaded is frozen out of later ones.
            gc.disable()
            try:
                users, acl_replies, contexts = await asyncio.to_thread(load)
            except (UsersFileError, ACLError, TLSConfigError, OSError, ValueError) as e:
                gc.enable()
                self.metrics.config_reloads.labels("failure").inc()
                audit.error("config_reload_failed", error=str(e), detail="kept the previous users and certificates")
            else:
                for lst in tls:
                    self._export_expiry(lst)
                self.tls_contexts.update(contexts)
                old = (self.policy.users, self.policy.acl_replies)
                self.policy.users = users
                self.policy.acl_replies = acl_replies
                self.policy.observer.users = users  # type: ignore[attr-defined]
                dropped = self._rebind_sessions(users)
                gc.freeze()
                gc.enable()
                # Freeing 10,000 users is ~20 ms: not on the loop, and on the decisions' own worker
                # thread, so no offloaded decision can be reading the old users meanwhile.
                await asyncio.get_running_loop().run_in_executor(self.executor, _release, old[0])
                del old
                self.metrics.config_reloads.labels("success").inc()
                audit.info("config_reloaded", users=len(users), listeners=sorted(contexts), disconnected=dropped)
            if not self.reload_again:
                return

    def _users_changed(self, users: dict[str, User], changed: set[str] | None, deleted: list[str]) -> None:
        """ACL SETUSER / DELUSER / LOAD changed the users: move or disconnect the other clients, and
        rebuild the ACL replies off the loop."""
        self.policy.observer.users = users  # type: ignore[attr-defined]
        dropped = self._rebind_sessions(users, changed, deleted)
        audit.info("users_changed", users=len(users), changed=sorted(changed) if changed is not None else "all",
                   deleted=deleted, disconnected=dropped)  # fmt: skip

        async def rebuild() -> None:
            acl_replies = await asyncio.to_thread(ACLReplies(users).prepare)
            if self.policy.users is users and self.policy.acl_replies is None:
                self.policy.acl_replies = acl_replies

        self.background.add(task := asyncio.ensure_future(rebuild()))
        task.add_done_callback(self.background.discard)

    def _rebind_sessions(self, users: dict[str, User], changed: set[str] | None = None, deleted: Sequence[str] = ()) -> int:
        """Move logged-in clients to their new user; disconnect those whose user went, and (ACL LOAD,
        SIGHUP: ``changed`` None) those whose rules or passwords changed, as Redis's ACL LOAD does.
        After ACL SETUSER a client keeps its connection with the new rules, as in Redis, unless it is
        subscribed and its channel rules changed (Redis 7.0 kills such pub/sub clients)."""
        dropped = 0
        for client in list(self.clients):
            session = client.session
            if session is None or client.closed:
                continue
            name = session.user.name
            new = users.get(name)
            if changed is not None and name not in changed and name not in deleted:
                continue
            if new is None:
                why = "user deleted"
            elif changed is None:
                if new.fingerprint == session.user.fingerprint:
                    session.user = new
                    continue
                why = "user changed by reload"
            elif session.subscribed and new.root.channel_rules() != session.user.root.channel_rules():
                why = "channel permissions changed"
            else:
                session.user = new
                continue
            dropped += 1
            self.events.log(audit.info, "connection_closed", listener=client.listener.name, peer=session.peer,
                            user=name, reason=why)  # fmt: skip
            client.close()
        return dropped

    async def ready(self) -> tuple[bool, str]:
        """Listeners up, certificates loaded, and the upstream answers PING as the service user."""
        if len(self.servers) < len(self.config.listeners):
            return False, "listeners not started"
        missing = [lst.name for lst in self.config.listeners if lst.type == "tls" and lst.name not in self.tls_contexts]
        if missing:
            return False, f"certificates not loaded for {', '.join(missing)}"
        try:
            (pong,) = await upstream_request(self.config, [[b"PING"]], 2.0)
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self.metrics.upstream_up.set(0)
            return False, f"upstream {self.config.upstream.where} unavailable: {e or type(e).__name__}"
        self.metrics.upstream_up.set(1)
        return (pong == b"PONG"), f"ready: upstream answered {pong!r}"

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError):
            # A TLS connection torn down mid-stream: the client is gone, the proxy is fine.
            log.debug("connection_error", message=context.get("message", ""), error=repr(exc))
            return
        log.error("internal_error", message=context.get("message", ""), error=repr(exc))

    async def stop(self, grace: float = 5.0) -> None:
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None
        for srv in self.servers:
            srv.close()
        deadline = time.monotonic() + grace
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.clients):
            c.close()
        for lst in self.config.listeners:
            if lst.type == "unix" and lst.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lst.path)


def _raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (if allowed) and return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def _open_fds() -> int:
    """File descriptors open now (Linux /proc; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 32


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), which hands free heap pages back to the OS; None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))


async def run(config: Config) -> None:
    proxy = Proxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    await stop.wait()
    log.info("redisguard_stopping", clients=len(proxy.clients))
    await proxy.stop()
    log.info("redisguard_stopped")
