"""The pending-handshake budget's queue (listeners.HandshakeBudget), driven on a real event loop with
stand-in clients: sockets over a cap wait in turn per source, stalled ones give way, the queue and its
deadline are bounded."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from redisguard.listeners import STALLED, HandshakeBudget, Waiting


class Gauge:
    def labels(self, *_: str) -> Gauge:
        return self

    def inc(self) -> None: ...

    def dec(self) -> None: ...


class Client:
    """What the budget touches of a ClientProtocol: its slot and the eviction counter."""

    evicted = 0

    def __init__(self, budget: HandshakeBudget, source: str) -> None:
        self.budget, self.source, self.held = budget, source, False
        counter = SimpleNamespace(inc=lambda: setattr(Client, "evicted", Client.evicted + 1))
        self.ctx = SimpleNamespace(metrics=SimpleNamespace(connections_rejected=SimpleNamespace(labels=lambda *a: counter)))
        self.listener = SimpleNamespace(name="tls")

    def start(self, started: list[str], silent_since: float | None = None) -> None:
        """As TLSServer._start: take a slot; a stand-in task that stays silent."""
        self.budget.acquire("tls", self.source)
        self.held = True
        task: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.budget.silent[task] = (self.source, self, time.monotonic() if silent_since is None else silent_since)  # type: ignore[assignment]
        started.append(self.source)

    def end_handshake(self) -> None:
        if self.held:
            self.held = False
            self.budget.release("tls", self.source)


def _waiting(budget: HandshakeBudget, source: str, started: list[str], expired: list[str]) -> Waiting:
    c = Client(budget, source)
    return Waiting("tls", source, lambda: c.start(started), lambda: expired.append(source))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_over_the_per_source_cap_sockets_wait_and_start_in_turn() -> None:
    async def main() -> None:
        b = HandshakeBudget(total=10, per_source=2, gauge=Gauge())
        started: list[str] = []
        expired: list[str] = []
        first = [Client(b, "a") for _ in range(2)]
        for c in first:
            c.start(started)
        assert b.refusal("a") == "handshake_limit_source" and b.refusal("b") == ""
        for src in ["a", "a", "a", "b"]:
            if b.refusal(src):
                assert b.wait(_waiting(b, src, started, expired), time.monotonic() + 30)
            else:
                Client(b, src).start(started)
        assert started == ["a", "a", "b"] and b.waiting == 3  # "b" was under its cap: no wait
        first[0].end_handshake()  # a slot of "a" frees: the oldest waiting "a" takes it
        assert started == ["a", "a", "b", "a"] and b.waiting == 2

    run(main())


def test_stalled_sockets_give_their_slots_to_waiting_ones_and_only_they_do() -> None:
    async def main() -> None:
        b = HandshakeBudget(total=10, per_source=2, gauge=Gauge())
        started: list[str] = []
        expired: list[str] = []
        Client.evicted = 0
        old = Client(b, "a")
        old.start(started, silent_since=time.monotonic() - STALLED - 0.1)  # (silent is oldest first)
        fresh = Client(b, "a")
        fresh.start(started)
        assert b.wait(_waiting(b, "a", started, expired), time.monotonic() + 30)
        b.make_room()
        assert Client.evicted == 1 and not old.held and fresh.held and started[-1] == "a" and b.waiting == 0
        assert b.wait(_waiting(b, "a", started, expired), time.monotonic() + 30)
        b.make_room()  # nothing has been silent for STALLED seconds: no one is evicted, the newcomer waits
        assert Client.evicted == 1 and b.waiting == 1

    run(main())


def test_the_queue_is_bounded_and_a_waiting_socket_expires_at_its_deadline() -> None:
    async def main() -> None:
        b = HandshakeBudget(total=1, per_source=1, gauge=Gauge())
        started: list[str] = []
        expired: list[str] = []
        Client(b, "a").start(started)
        assert b.queue_cap == 4
        accepted = [b.wait(_waiting(b, "a", started, expired), time.monotonic() + 0.05) for _ in range(5)]
        assert accepted == [True] * 4 + [False]  # the fifth is refused: the queue is full
        await asyncio.sleep(0.2)
        assert expired == ["a"] * 4 and b.waiting == 0 and not b.queued and b.waiting_by_listener["tls"] == 0

    run(main())


def test_sources_take_turns_when_the_global_budget_frees() -> None:
    async def main() -> None:
        b = HandshakeBudget(total=2, per_source=2, gauge=Gauge())
        started: list[str] = []
        expired: list[str] = []
        holders = [Client(b, "x"), Client(b, "x")]
        for c in holders:
            c.start(started)
        for src in ["a", "a", "a", "b"]:
            assert b.refusal(src) == "handshake_limit"
            assert b.wait(_waiting(b, src, started, expired), time.monotonic() + 30)
        for c in holders:
            c.end_handshake()
        assert started[2:] == ["a", "b"]  # one of "a", then "b": not all of "a"'s backlog first

    run(main())
