"""Bounded work per event-loop turn: reads handed on a slice at a time."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

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
