"""Accepting TLS connections: the pending-handshake budget, the first-byte wait, handshake failures."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .audit import get_logger
from .config import ListenerConfig
from .connection import ClientProtocol
from .context import from_proxy, peer_name, source_of
from .proxy_protocol import MAX_HEADER, ProxyHeader, ProxyHeaderError, parse

audit = get_logger("redisguard.audit")


if TYPE_CHECKING:
    from .context import ConnectionContext


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


# A pending socket silent this long (no ClientHello, no PROXY header) is stalled: a socket waiting for a
# slot may take its place. A real client speaks within a round trip of connecting; a burst of them (a
# pool warming up, everyone reconnecting after a failover) must wait its turn, not evict itself.
STALLED = 1.0
# Sockets that may wait for a handshake slot, per slot of the global budget (each costs a descriptor and
# a few hundred bytes: no TLS state until it starts).
QUEUE_PER_SLOT = 4


@dataclass(slots=True)
class Waiting:
    """An accepted socket waiting for a handshake slot (FIFO per source, sources served in turn)."""

    listener: str
    source: str
    start: Callable[[], None]  # begin its handshake (it takes its slot)
    expire: Callable[[], None]  # its handshake_timeout passed while it waited: close it
    timer: asyncio.TimerHandle | None = None


class HandshakeBudget:
    """TLS handshakes in progress, counted globally, per listener and per source address, and the sockets
    waiting for one.

    A pending handshake holds a socket and uvloop's TLS state (tens of KiB) before the peer has proved
    anything, so the accept loop asks :meth:`refusal` before spending any TLS work on a new socket.
    The per-source table only holds sources with a handshake in progress: at most ``total`` entries.

    Over a cap, a newcomer first takes the place of a *stalled* socket (silent for ``STALLED`` seconds:
    of its own source, for the per-source cap), else it **waits** in a bounded queue (``QUEUE_PER_SLOT``
    x ``total``, counted toward its listener's max_connections) until a slot of its source frees, and is
    refused only when that queue is full. Sources take turns, so one source's backlog never delays
    another's clients; while sockets wait, stalled ones are evicted for them. So a burst of 1,000 real
    clients from one address is served in order, while silent floods are still held to the caps."""

    def __init__(self, total: int, per_source: int, gauge: Any) -> None:
        self.total = total
        self.per_source = per_source
        self.gauge = gauge
        self.count = 0
        self.by_listener: dict[str, int] = {}
        self.by_source: dict[str, int] = {}
        # oldest first: task -> (source, client, when it was accepted)
        self.silent: OrderedDict[asyncio.Future[None], tuple[str, ClientProtocol, float]] = OrderedDict()
        self.queue_cap = QUEUE_PER_SLOT * total
        self.queued: OrderedDict[str, deque[Waiting]] = OrderedDict()  # source -> its waiting sockets, in turn
        self.waiting = 0
        self.waiting_by_listener: dict[str, int] = {}
        self._sweep: asyncio.TimerHandle | None = None

    def evict(self, source: str | None, now: float | None = None) -> bool:
        """Cancel the oldest stalled handshake (of ``source``, if given); False if there is none."""
        cutoff = (time.monotonic() if now is None else now) - STALLED
        for task, (src, client, since) in self.silent.items():
            if since > cutoff:
                break  # oldest first: the rest spoke or are younger still
            if source is None or src == source:
                del self.silent[task]
                client.ctx.metrics.connections_rejected.labels(client.listener.name, "handshake_evicted").inc()
                client.end_handshake()  # its slot is free now, not when the task unwinds
                task.cancel()
                return True
        return False

    def refusal(self, source: str) -> str:
        if self.count >= self.total:
            return "handshake_limit"
        if source and self.by_source.get(source, 0) >= self.per_source:  # "": a proxied client, not known yet
            return "handshake_limit_source"
        return ""

    def wait(self, w: Waiting, deadline: float) -> bool:
        """Queue ``w`` until a slot frees (its ``start`` is called then) or ``deadline``; False when full."""
        if self.waiting >= self.queue_cap:
            return False
        self.queued.setdefault(w.source, deque()).append(w)
        self.waiting += 1
        self.waiting_by_listener[w.listener] = self.waiting_by_listener.get(w.listener, 0) + 1
        loop = asyncio.get_running_loop()
        w.timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0.0), self._expired, w)
        self._arm()
        return True

    def _unqueue(self, w: Waiting) -> None:
        self.waiting -= 1
        self.waiting_by_listener[w.listener] -= 1
        if w.timer is not None:
            w.timer.cancel()

    def _expired(self, w: Waiting) -> None:
        q = self.queued.get(w.source)
        if q is not None and w in q:
            q.remove(w)
            if not q:
                del self.queued[w.source]
            self._unqueue(w)
            w.expire()

    def _drain(self) -> None:
        """Start waiting sockets while slots are free: one per source in turn, skipping sources at their cap."""
        while self.queued and self.count < self.total:
            for source in list(self.queued):
                if self.by_source.get(source, 0) < self.per_source:
                    break
            else:
                return  # every waiting source is at its own cap
            q = self.queued.pop(source)
            w = q.popleft()
            if q:
                self.queued[source] = q  # to the back: the next source's turn
            self._unqueue(w)
            w.start()

    def _arm(self) -> None:
        if self._sweep is None and self.queued:
            self._sweep = asyncio.get_running_loop().call_later(STALLED / 4, self._sweep_stalled)

    def _sweep_stalled(self) -> None:
        self._sweep = None
        self.make_room()
        self._arm()

    def make_room(self) -> None:
        """While sockets wait, stalled handshakes give them their places (their source's own stalled
        sockets for a source at its cap; any stalled one when the global budget is full)."""
        now = time.monotonic()
        progress = True
        while progress and self.queued:
            progress = False
            for source in list(self.queued):
                if source in self.queued:
                    at_cap = self.by_source.get(source, 0) >= self.per_source
                    if at_cap or self.count >= self.total:  # (its release() starts whoever is next)
                        progress = self.evict(source if at_cap else None, now) or progress
            self._drain()

    def move(self, listener: str, old: str, new: str) -> None:
        """A pending handshake's source became known (a PROXY header named the client)."""
        self.release(listener, old, drain=False)  # (the slot is not free: it changes hands)
        self.acquire(listener, new)

    def acquire(self, listener: str, source: str) -> None:
        self.count += 1
        self.by_listener[listener] = self.by_listener.get(listener, 0) + 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.gauge.labels(listener).inc()

    def release(self, listener: str, source: str, drain: bool = True) -> None:
        self.count -= 1
        self.by_listener[listener] -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]
        self.gauge.labels(listener).dec()
        if drain and self.queued:
            self._drain()


class TLSServer:
    """A TLS listener that accepts sockets itself, so every failed handshake is seen with its peer.

    ``loop.connect_accepted_socket(..., ssl=...)`` returns only after the handshake and raises when it
    fails, which is what metrics and the audit log need (uvloop's own TLS servers drop handshake
    errors silently, and ``start_tls`` from ``connection_made`` races with uvloop's first read).

    Every accepted socket is checked before any TLS work (source networks, the listener's
    max_connections counting pending handshakes, the handshake budget, the file-descriptor reserve);
    a refused one is closed at once."""

    def __init__(self, ctx: ConnectionContext, listener: ListenerConfig, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.listener = listener
        # reuse_port: each of [server] workers binds its own socket; the kernel spreads connections over them
        sock = socket.create_server((listener.host, listener.port), family=_family(listener.host), backlog=1024,
                                    reuse_port=reuse_port)  # fmt: skip
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
                w = Waiting(lst.name, source, partial(self._start, client, conn, addr, accepted),
                            partial(client.reject, conn, addr, "handshake_wait_timeout"))  # fmt: skip
                if budget.wait(w, accepted + self.ctx.config.limits.handshake_timeout):
                    budget.make_room()
                    continue
            if reason:
                client.reject(conn, addr, reason)
                continue
            self._start(client, conn, addr, time.monotonic())

    def _start(self, client: ClientProtocol, conn: socket.socket, addr: Any, accepted: float) -> None:
        """Take a handshake slot and begin: the first bytes (or the PROXY header), then TLS."""
        proxied = self.listener.proxy_protocol
        client.start_handshake(None if proxied else addr)
        task = asyncio.ensure_future(self._handshake(client, conn, addr, accepted))
        self.ctx.handshakes.silent[task] = ("" if proxied else source_of(addr), client, time.monotonic())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[None]) -> None:
        self.ctx.handshakes.silent.pop(task, None)

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
            else:
                # No TLS state (tens of KiB in OpenSSL and uvloop) until the ClientHello starts to arrive:
                # a silent connection costs a socket and this task.
                await asyncio.wait_for(_first_bytes(loop, conn), max(deadline - time.monotonic(), 0.001))
                self._spoke()
            await loop.connect_accepted_socket(
                lambda: client, conn, ssl=ctx.tls_contexts[lst.name],
                ssl_handshake_timeout=max(deadline - time.monotonic(), 0.001),
            )  # fmt: skip
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            # (uvloop reports its own handshake timeout as ConnectionAbortedError: the deadline says which)
            why = "timeout" if isinstance(e, ConnectionAbortedError) and time.monotonic() >= deadline else _handshake_reason(e)
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
            client.end_handshake()  # a no-op when connection_made already ended it

    def _spoke(self) -> None:
        current = asyncio.current_task()
        if current is not None:
            self.ctx.handshakes.silent.pop(current, None)  # it spoke: no longer evictable

    async def _proxy_header(self, client: ClientProtocol, conn: socket.socket, addr: Any, deadline: float) -> Any:
        """Read the PROXY header off the raw socket (exactly its bytes: the ClientHello stays there for
        TLS); the client's address, or the socket's peer for LOCAL/UNKNOWN; None when refused."""
        ctx, lst = self.ctx, self.listener
        try:
            header = await asyncio.wait_for(read_header(conn, self._spoke), max(deadline - time.monotonic(), 0.001))
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
                client.proxied = header
                client.move_handshake(real)
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


async def _first_bytes(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Wait until the peer sends something (its ClientHello); ConnectionResetError if it closes first,
    so a flood that disconnects never costs TLS state either."""
    if not await _peek(loop, conn, 1):
        raise ConnectionResetError("closed before the TLS handshake")


async def read_header(conn: socket.socket, spoke: Any = None) -> ProxyHeader:
    """Read exactly one PROXY header from a non-blocking socket (ProxyHeaderError if it is not one).

    Peeks at most MAX_HEADER bytes, consumes only bytes the parser says are inside the header, so what
    follows (the TLS ClientHello) is left in the socket; ``spoke()`` is called at the first byte. The
    caller bounds the time (a slow peer costs one wake-up per segment)."""
    loop = asyncio.get_running_loop()
    got = b""
    while True:
        peek = await _peek(loop, conn, MAX_HEADER - len(got))
        if not peek:
            raise ConnectionResetError("closed in the PROXY header")
        if not got and spoke is not None:
            spoke()
        header = parse(got + peek)
        got += conn.recv(len(peek) if header is None else header.length - len(got))
        if header is not None and len(got) == header.length:
            return header


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
