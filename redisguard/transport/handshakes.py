"""The pending-handshake budget: TLS handshakes in progress, and the sockets waiting for one.

A pending handshake holds a socket and uvloop's TLS state (tens of KiB) before the peer has proved
anything, so the accept loop asks :meth:`HandshakeBudget.refusal` before spending any TLS work on a new
socket; the caps count globally (``max_pending_handshakes``), per listener and per source address
(``max_handshakes_per_source``). The per-source table only holds sources with a handshake in progress.

Over a cap a newcomer is not refused: it **waits** (no TLS work, no read of it) in a bounded queue
(``QUEUE_PER_SLOT`` x the global cap, counted toward its listener's max_connections and the descriptor
reserve) until a slot of its source frees. The rules:

1. Sources take turns, so one address's backlog never delays another's clients.
2. Within a source, a waiting socket that has spoken (the event loop saw it readable: its ClientHello
   or PROXY header waits in the kernel) goes before the silent ones, oldest first.
3. A pending socket whose ClientHello is not whole after ``STALLED`` seconds (silent, or a byte at a
   time), or whose TLS handshake has not finished ``STALLED_TLS`` seconds after its ClientHello, is
   stalled: it gives its slot to a waiting socket that has spoken, never to a silent one (nobody would
   be better served).
4. A waiting socket that the peer closed is dropped at once; when the queue fills up, waiting sockets
   silent for ``STALLED`` seconds are dropped to make room; a newcomer is refused only when the queue is
   still full. A socket still waiting at its handshake deadline is closed.

So 1,000 clients reconnecting at once from one address are served in turn, while a silent flood stays
held to the caps and cannot keep a real client, even one from its own address, out for long.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# A pending socket without a whole ClientHello (and PROXY header) this long is stalled. A real client
# sends it within a round trip of connecting; a burst of them must wait its turn, not evict itself.
STALLED = 1.0
# A TLS handshake not finished this long after its ClientHello is stalled too (a real one takes a
# round trip or two more; the cost of the server's part is already spent).
STALLED_TLS = 2.0
# Sockets that may wait for a handshake slot, per slot of the global budget (each costs a descriptor and
# a few hundred bytes: no TLS state until it starts).
QUEUE_PER_SLOT = 4
# Stalled waiting sockets dropped per sweep at most (the sweep runs every STALLED / 4 while any wait).
SWEEP_DROP = 4096


class PendingClient(Protocol):
    """What the budget needs of a connection whose handshake it may cut short."""

    def end_handshake(self) -> None: ...

    def evicted(self) -> None: ...  # counted (reason handshake_evicted)


@dataclass(slots=True, eq=False)
class Waiting:
    """An accepted socket waiting for a handshake slot."""

    listener: str
    source: str
    conn: socket.socket
    start: Callable[[], None]  # begin its handshake (it takes its slot)
    close: Callable[[str], None]  # refuse it, with the reason: its wait is over
    since: float = field(default_factory=time.monotonic)
    spoke: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class SourceQueue:
    spoke: deque[Waiting] = field(default_factory=deque)
    silent: deque[Waiting] = field(default_factory=deque)


class HandshakeBudget:
    def __init__(self, total: int, per_source: int, gauge: Any) -> None:
        self.total = total
        self.per_source = per_source
        self.gauge = gauge
        self.count = 0
        self.by_listener: dict[str, int] = {}
        self.by_source: dict[str, int] = {}
        # pending sockets, oldest first: task -> (source, client, since), before their whole ClientHello
        # is here (``silent``) and after, in the TLS handshake (``in_tls``)
        self.silent: OrderedDict[asyncio.Future[None], tuple[str, PendingClient, float]] = OrderedDict()
        self.in_tls: OrderedDict[asyncio.Future[None], tuple[str, PendingClient, float]] = OrderedDict()
        self.queue_cap = QUEUE_PER_SLOT * total
        self.queued: OrderedDict[str, SourceQueue] = OrderedDict()  # source -> its waiting sockets, in turn
        self.ready: OrderedDict[str, None] = OrderedDict()  # the sources of those that spoke, in turn
        self.waiting = 0
        self.waiting_by_listener: dict[str, int] = {}
        self._sweep: asyncio.TimerHandle | None = None

    # -- the pending handshakes ------------------------------------------------------------------
    def refusal(self, source: str) -> str:
        if self.count >= self.total:
            return "handshake_limit"
        if source and self.by_source.get(source, 0) >= self.per_source:  # "": a proxied client, not known yet
            return "handshake_limit_source"
        return ""

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

    def move(self, listener: str, old: str, new: str) -> None:
        """A pending handshake's source became known (a PROXY header named the client)."""
        self.release(listener, old, drain=False)  # (the slot is not free: it changes hands)
        self.acquire(listener, new)

    def hello_done(self, task: asyncio.Future[None]) -> None:
        """``task``'s whole ClientHello is here: its TLS handshake starts (stalled after STALLED_TLS)."""
        entry = self.silent.pop(task, None)
        if entry is not None:
            self.in_tls[task] = (entry[0], entry[1], time.monotonic())

    def forget(self, task: asyncio.Future[None]) -> None:
        self.silent.pop(task, None)
        self.in_tls.pop(task, None)

    def evict(self, source: str | None, now: float | None = None) -> bool:
        """Cancel the oldest stalled handshake (of ``source``, if given); False if there is none."""
        now = time.monotonic() if now is None else now
        for table, stall in ((self.silent, STALLED), (self.in_tls, STALLED_TLS)):
            cutoff = now - stall
            for task, (src, client, since) in table.items():
                if since > cutoff:
                    break  # oldest first: the rest are younger still
                if source is None or src == source:
                    del table[task]
                    client.evicted()
                    client.end_handshake()  # its slot is free now, not when the task unwinds
                    task.cancel()
                    return True
        return False

    # -- the waiting sockets ---------------------------------------------------------------------
    def wait(self, w: Waiting, deadline: float) -> bool:
        """Queue ``w`` until a slot frees (its ``start`` is called then) or ``deadline``; False when full."""
        if self.waiting >= self.queue_cap:
            self._drop_stalled(time.monotonic())
            if self.waiting >= self.queue_cap:
                return False
        self.queued.setdefault(w.source, SourceQueue()).silent.append(w)
        self.waiting += 1
        self.waiting_by_listener[w.listener] = self.waiting_by_listener.get(w.listener, 0) + 1
        loop = asyncio.get_running_loop()
        w.timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0.0), self._leave, w, "handshake_wait_timeout")
        loop.add_reader(w.conn.fileno(), self._readable, w)
        if self._sweep is None:
            self._sweep = loop.call_later(STALLED / 4, self._sweep_stalled)
        return True

    def _readable(self, w: Waiting) -> None:
        """It spoke (or closed): to its source's front line, or out."""
        asyncio.get_running_loop().remove_reader(w.conn.fileno())
        try:
            closed = not w.conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return  # (spurious: not readable after all; the next sweep or its deadline decides)
        except OSError:
            closed = True
        if closed:
            self._leave(w, "handshake")
            return
        q = self.queued[w.source]
        q.silent.remove(w)
        q.spoke.append(w)
        w.spoke = True
        self.ready.setdefault(w.source)
        self.make_room()

    def _take(self, w: Waiting, q: SourceQueue) -> None:
        """``w`` leaves the queue (it was removed from ``q``, its source's)."""
        self.waiting -= 1
        self.waiting_by_listener[w.listener] -= 1
        if w.timer is not None:
            w.timer.cancel()
        if not w.spoke:
            asyncio.get_running_loop().remove_reader(w.conn.fileno())
        if not q.spoke:
            self.ready.pop(w.source, None)
            if not q.silent:
                self.queued.pop(w.source, None)

    def _leave(self, w: Waiting, reason: str) -> None:
        q = self.queued.get(w.source)
        if q is None:
            return
        line = q.spoke if w.spoke else q.silent
        if w in line:
            line.remove(w)
            self._take(w, q)
            w.close(reason)

    def _drop_stalled(self, now: float) -> None:
        """Waiting sockets silent for STALLED seconds make room in a queue that fills up."""
        cutoff, budget = now - STALLED, SWEEP_DROP
        for source in list(self.queued):
            q = self.queued[source]
            while q.silent and budget > 0 and q.silent[0].since <= cutoff:
                w = q.silent.popleft()
                budget -= 1
                self._take(w, q)
                w.close("handshake_evicted")

    def _next_source(self) -> str | None:
        """The next source in turn with a socket that spoke, else with any, under its own cap (at most
        total / per_source sources are at their cap: a short search)."""
        for turns in (self.ready, self.queued):
            for source in turns:
                if self.by_source.get(source, 0) < self.per_source:
                    return source
        return None

    def _drain(self) -> None:
        """Start waiting sockets while slots are free: one per source in turn, those that spoke before
        silent ones, skipping sources at their own cap."""
        while self.queued and self.count < self.total:
            source = self._next_source()
            if source is None:
                return  # every waiting source is at its own cap
            q = self.queued.pop(source)
            w = (q.spoke or q.silent).popleft()
            if q.spoke or q.silent:
                self.queued[source] = q  # to the back: the next source's turn
            if source in self.ready:
                self.ready.move_to_end(source)
            self._take(w, q)
            w.start()

    def _sweep_stalled(self) -> None:
        self._sweep = None
        if self.waiting * 4 >= self.queue_cap * 3:  # a queue filling up: silent floods make way
            self._drop_stalled(time.monotonic())
        self.make_room()
        if self.queued:
            self._sweep = asyncio.get_running_loop().call_later(STALLED / 4, self._sweep_stalled)

    def make_room(self) -> None:
        """A stalled handshake gives its slot to a waiting socket that has spoken (its source's own
        stalled sockets for a source at its cap; any stalled one when the global budget is full)."""
        now = time.monotonic()
        progress = True
        while progress and self.queued:
            progress = False
            for source, q in list(self.queued.items()):
                if q.spoke:
                    at_cap = self.by_source.get(source, 0) >= self.per_source
                    if at_cap or self.count >= self.total:  # (its release() starts whoever is next)
                        progress = self.evict(source if at_cap else None, now) or progress
            self._drain()
