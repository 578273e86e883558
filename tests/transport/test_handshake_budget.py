"""The pending-handshake budget and its wait queue (redisguard/transport/handshakes.py), on a real event loop with
real socket pairs standing in for accepted sockets and stand-in clients for pending handshakes:
sockets over a cap wait in turn per source, those that spoke go first, stalled ones give way only to
them, the queue and each wait are bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from redisguard.transport.handshakes import STALLED, HandshakeBudget, Waiting


class Gauge:
    def labels(self, *_: str) -> Gauge:
        return self

    def inc(self) -> None: ...

    def dec(self) -> None: ...


class Pending:
    """A pending handshake (as TLSServer._start makes one): holds a slot, silent since ``since``."""

    evicted_count = 0

    def __init__(self, budget: HandshakeBudget, source: str, since: float | None = None) -> None:
        self.budget, self.source, self.held = budget, source, True
        budget.acquire("tls", source)
        task: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        budget.silent[task] = (source, self, time.monotonic() if since is None else since)

    def evicted(self) -> None:
        Pending.evicted_count += 1

    def end_handshake(self) -> None:
        if self.held:
            self.held = False
            self.budget.release("tls", self.source)


class Harness:
    def __init__(self, budget: HandshakeBudget) -> None:
        self.b = budget
        self.started: list[str] = []
        self.closed: list[str] = []
        self.peers: list[socket.socket] = []

    def arrive(self, source: str, name: str = "", since: float | None = None,
               deadline: float = 30.0) -> tuple[bool, socket.socket]:  # fmt: skip
        """A socket from ``source`` over the cap: queue it; returns (queued, the client's end)."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.peers += [ours, theirs]
        label = name or source

        def start() -> None:
            self.started.append(label)
            Pending(self.b, source)

        w = Waiting("tls", source, ours, start, lambda why: self.closed.append(f"{label}:{why}"))
        if since is not None:
            w.since = since
        return self.b.wait(w, time.monotonic() + deadline), theirs

    def close(self) -> None:
        for s in self.peers:
            s.close()


def run(test: Callable[[Harness], Awaitable[None]], total: int, per_source: int) -> None:
    async def main() -> None:
        h = Harness(HandshakeBudget(total=total, per_source=per_source, gauge=Gauge()))
        try:
            await test(h)
        finally:
            h.close()

    asyncio.run(main())


async def _turn() -> None:
    await asyncio.sleep(0.02)  # the loop sees what became readable


def test_over_the_per_source_cap_sockets_wait_and_start_in_order() -> None:
    async def t(h: Harness) -> None:
        first = [Pending(h.b, "a"), Pending(h.b, "a")]
        assert h.b.refusal("a") == "handshake_limit_source" and h.b.refusal("b") == ""
        for name in ("a1", "a2", "a3"):
            assert h.arrive("a", name)[0]
        assert h.b.waiting == 3 and h.started == []
        first[0].end_handshake()  # a slot of "a" frees: the oldest waiting "a" takes it
        assert h.started == ["a1"] and h.b.waiting == 2

    run(t, total=10, per_source=2)


def test_a_socket_that_spoke_goes_first_and_a_stalled_one_gives_way_only_to_it() -> None:
    async def t(h: Harness) -> None:
        Pending.evicted_count = 0
        stalled = Pending(h.b, "a", since=time.monotonic() - STALLED - 0.1)
        for name in ("silent1", "silent2"):
            assert h.arrive("a", name)[0]
        h.b.make_room()
        await _turn()
        assert Pending.evicted_count == 0 and stalled.held  # only silent ones wait: nobody is better served
        ok, client = h.arrive("a", "real")
        client.sendall(b"\x16\x03\x01")  # its ClientHello
        await _turn()
        assert Pending.evicted_count == 1 and not stalled.held and h.started == ["real"]  # ahead of the silent

    run(t, total=10, per_source=1)


def test_a_fresh_pending_socket_is_never_evicted() -> None:
    async def t(h: Harness) -> None:
        Pending.evicted_count = 0
        fresh = Pending(h.b, "a")
        ok, client = h.arrive("a", "real")
        client.sendall(b"\x16")
        await _turn()
        assert fresh.held and Pending.evicted_count == 0 and h.b.waiting == 1  # it waits its turn
        fresh.end_handshake()
        assert h.started == ["real"]

    run(t, total=10, per_source=1)


def test_the_queue_is_bounded_and_a_wait_ends_at_its_deadline() -> None:
    async def t(h: Harness) -> None:
        Pending(h.b, "a")
        assert h.b.queue_cap == 4
        queued = [h.arrive("a", deadline=0.05)[0] for _ in range(5)]
        assert queued == [True] * 4 + [False]  # the fifth is refused: the queue is full (of young sockets)
        await asyncio.sleep(0.2)
        assert h.closed == ["a:handshake_wait_timeout"] * 4
        assert h.b.waiting == 0 and not h.b.queued and h.b.waiting_by_listener["tls"] == 0

    run(t, total=1, per_source=1)


def test_a_full_queue_drops_stalled_silent_sockets_for_a_newcomer() -> None:
    async def t(h: Harness) -> None:
        Pending(h.b, "a")
        long_ago = time.monotonic() - STALLED - 0.1
        for i in range(4):
            assert h.arrive("a", f"old{i}", since=long_ago)[0]
        assert h.arrive("a", "new")[0]  # room made: the silent, stalled ones go
        assert h.closed == [f"old{i}:handshake_evicted" for i in range(4)] and h.b.waiting == 1

    run(t, total=1, per_source=1)


def test_a_waiting_socket_closed_by_its_peer_leaves_the_queue() -> None:
    async def t(h: Harness) -> None:
        Pending(h.b, "a")
        ok, client = h.arrive("a", "gone")
        client.close()
        await _turn()
        assert h.closed == ["gone:handshake"] and h.b.waiting == 0

    run(t, total=1, per_source=1)


def test_sources_take_turns_when_the_global_budget_frees() -> None:
    async def t(h: Harness) -> None:
        holders = [Pending(h.b, "x"), Pending(h.b, "x")]
        for source, name in (("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1")):
            assert h.b.refusal(source) == "handshake_limit"
            assert h.arrive(source, name)[0]
        for p in holders:
            p.end_handshake()
        assert h.started == ["a1", "b1"]  # one of "a", then "b": not all of "a"'s backlog first

    run(t, total=2, per_source=2)
