"""A worker slot and the supervisor's end of its channel (the worker's end is :mod:`.worker_link`).

A slot outlives the processes forked into it: a restarted worker gets the same slot (its index, its
count of early exits) and a new channel. The channel answers what is the channel's own business (the
answers to :meth:`Channel.ask`, ``started``, ``sync``) and hands every other message to the supervisor.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redisguard.observe import metrics_merge
from redisguard.observe.audit import get_logger
from redisguard.runtime.worker_link import Endpoint, read_message

log = get_logger("redisguard")

ASK_TIMEOUT = 5.0  # a worker's answer to a metrics or readiness request

Message = dict[str, Any]


class Channel(Endpoint):
    """One worker process's end of the channel, seen from the supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[Message] = []  # sent before the stream was open
        self.waiting: dict[int, asyncio.Future[Message | None]] = {}
        self.next_id = 0  # (ids need only be unique on this channel: answers come back on it)
        self.up = False  # the worker said its listeners are up
        self.synced = False  # the worker applies the stream of changes from here on (it asked to sync)

    async def serve(self, slot: Slot, handle: Callable[[Slot, Message], None]) -> None:
        """Read the worker's messages until the channel closes; ``handle`` gets its requests."""
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        for queued in self.backlog:
            self.send(queued)
        self.backlog.clear()
        try:
            while (msg := await read_message(reader)) is not None:
                if "op" not in msg:  # an answer to ask()
                    fut = self.waiting.get(msg.get("id", -1))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif msg.get("op") == "started":
                    self.up = True
                    log.info("worker_started", worker=slot.index, pid=slot.pid)
                elif msg.get("op") == "sync":
                    self.synced = True  # every change from here on waits for its word
                    self.send({"op": "synced"})
                else:
                    handle(slot, msg)
        finally:
            self.up = False
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_result(None)
            self.writer.close()

    async def ask(self, msg: Message) -> Message | None:
        """The worker's answer to a request, or None (it exited, or did not answer in time)."""
        self.next_id += 1
        rid = self.next_id
        fut = self.waiting[rid] = asyncio.get_running_loop().create_future()
        self.send({**msg, "id": rid})
        try:
            return await asyncio.wait_for(fut, ASK_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            self.waiting.pop(rid, None)


@dataclass
class Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    early_exits: int = 0
    channel: Channel | None = None
    last: metrics_merge.Families = field(default_factory=dict)  # the worker's last scrape

    @property
    def up(self) -> bool:
        return self.channel is not None and self.channel.up

    async def ask(self, msg: Message) -> Message | None:
        """The worker's answer, or None (no worker, it is not up, it exited, or it did not answer in time)."""
        if self.channel is None or not self.channel.up:
            return None
        return await self.channel.ask(msg)
