"""The slicer alone, on a real event loop: at most SLICE bytes of a read are handled per loop turn, the
transport is paused meanwhile, and the order is kept."""

from __future__ import annotations

import asyncio

from redisguard.transport.slicer import SLICE, Slicer


def test_a_big_read_is_handled_a_slice_per_turn_in_order() -> None:
    async def main() -> None:
        handled: list[bytes] = []
        turns: list[int] = []
        events: list[str] = []
        s = Slicer(handled.append, lambda: events.append("pause"), lambda: events.append("resume"),
                   before=lambda: turns.append(len(handled)))  # fmt: skip
        data = bytes(range(256)) * (5 * SLICE // 256 + 1)
        s.feed(data)
        assert sum(map(len, handled)) == SLICE and events == ["pause"]  # one slice now, the rest later
        while s.queue or s.scheduled:
            await asyncio.sleep(0)
        assert b"".join(handled) == data and all(len(h) <= SLICE for h in handled)
        assert len(turns) >= len(data) // SLICE and events[-1] == "resume"

    asyncio.run(main())


def test_small_reads_go_straight_through() -> None:
    async def main() -> None:
        handled: list[bytes] = []
        s = Slicer(handled.append, lambda: None, lambda: None)
        for i in range(10):
            s.feed(b"x%d" % i)
        assert handled == [b"x%d" % i for i in range(10)] and not s.scheduled

    asyncio.run(main())


def test_a_consumer_not_ready_holds_the_rest() -> None:
    async def main() -> None:
        handled: list[bytes] = []
        ready = [False]
        s = Slicer(handled.append, lambda: None, lambda: None, ready=lambda: ready[0])
        s.feed(b"a" * (SLICE + 1))  # over a slice: queued, and the consumer is busy
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert handled == []
        ready[0] = True
        while s.queue or s.scheduled:
            await asyncio.sleep(0)
        assert b"".join(handled) == b"a" * (SLICE + 1)

    asyncio.run(main())
