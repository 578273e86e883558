"""The private channel between the supervisor and one worker, and the worker's end of it.

A socketpair made before the fork carries length-prefixed JSON messages both ways:

| from → to | message | what for |
|---|---|---|
| supervisor → worker | ``{"op": "metrics", "id": n}`` → ``{"id": n, "text": ...}`` | the aggregated /metrics |
| supervisor → worker | ``{"op": "ready", "id": n}`` → ``{"id": n, "ok": bool, "why": str}`` | /readyz |
| worker → supervisor | ``{"op": "started"}`` | listeners up |
| worker → supervisor | ``{"op": "users", "set": {name: line}, "deleted": [...], "origin": i}`` | ACL SETUSER / DELUSER here |
| supervisor → every worker | the same ``users`` message | replicated (the origin gets it too) |
| worker → supervisor | ``{"op": "acl_load"}`` | ACL LOAD here: the supervisor reloads every worker (SIGHUP) |

**ACL SETUSER/DELUSER replication.** A changed user travels as its users-file line (``user <name>
<rules>``, what ACL SAVE writes and ACL LOAD reads, so it round-trips exactly); a deleted one as its
name. The supervisor puts the changes in one order and sends each to every worker, the origin
included, and keeps them (a journal since the last reload) for workers it forks later. A worker skips
a user while one of its own changes to that user is still on its way back (``pending``), so two
workers changing one user at once end with the same result everywhere: the change the supervisor
received last. Each worker applies a change as ACL SETUSER does locally (clients keep their
connection with the new rules; a deleted user's clients are disconnected).

If the supervisor goes away, the channel reaches end of file and the worker drains and stops (it also
gets SIGTERM from the kernel: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .acl import User
from .acl.admin import render_acl_file
from .audit import get_logger

if TYPE_CHECKING:
    from .server import Proxy

log = get_logger("redisguard")

HEADER = struct.Struct("!I")
MAX_MESSAGE = 1 << 30  # a metrics exposition for many users and commands can be tens of MiB

Journal = dict[str, str | None]  # user name -> its users-file line, or None: deleted


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of file."""
    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes")
        msg: dict[str, Any] = json.loads(await reader.readexactly(size))
        return msg
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def write_message(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    data = json.dumps(msg).encode()  # ASCII: names with any bytes (surrogate-escaped) travel as \\udcXX
    writer.write(HEADER.pack(len(data)) + data)


def user_lines(users: dict[str, User], names: Sequence[str]) -> dict[str, str]:
    return {n: render_acl_file({n: users[n]}).decode("utf-8", "surrogateescape") for n in names if n in users}


class Endpoint:
    """One end of a supervisor-worker channel: messages queue until its stream is open."""

    writer: asyncio.StreamWriter | None
    backlog: list[dict[str, Any]]

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer is None:
            self.backlog.append(msg)
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            write_message(self.writer, msg)


class WorkerLink(Endpoint):
    """A worker's end: answers the supervisor and relays this worker's ACL changes."""

    def __init__(self, sock: socket.socket, index: int, journal: Journal, inherited: dict[str, socket.socket]) -> None:
        self.sock = sock
        self.index = index
        self.journal = dict(journal)  # the supervisor's at fork time: applied before the listeners start
        self.inherited = inherited  # unix listeners bound by the supervisor, by listener name
        self.pending: dict[str, int] = {}  # own changes per user not yet back from the supervisor
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[dict[str, Any]] = [{"op": "started"}]  # sent once the stream is open
        self.proxy: Proxy | None = None
        self.tasks: set[asyncio.Future[None]] = set()

    def attach(self, proxy: Proxy) -> None:
        """The policy is loaded: catch up with the changes made since the last reload, then relay ours."""
        self.proxy = proxy
        if self.journal:
            self.apply({n: line for n, line in self.journal.items() if line is not None},
                       [n for n, line in self.journal.items() if line is None])  # fmt: skip
        proxy.reloader.on_local_change = self.local_change

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the supervisor's requests until the channel closes (then ``stop``)."""
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        for queued in self.backlog:
            self.send(queued)
        self.backlog.clear()
        try:
            while (msg := await read_message(reader)) is not None:
                self._handle(msg)
        finally:
            if not stop.is_set():
                log.warning("supervisor_gone", detail="the supervisor's channel closed: draining and stopping")
            stop.set()

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "users":
            self.replicated(msg)
        elif op == "reload" and self.proxy is not None:
            self.proxy.reload()
        elif op in ("metrics", "ready"):
            task = asyncio.ensure_future(self._answer(msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, msg: dict[str, Any]) -> None:
        proxy = self.proxy
        assert proxy is not None
        if msg["op"] == "metrics":
            reply: dict[str, Any] = {"text": proxy.metrics.render().decode()}
        else:
            ok, why = await proxy.ready()
            reply = {"ok": ok, "why": why}
        self.send({"id": msg["id"], **reply})

    def local_change(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> None:
        """ACL SETUSER / DELUSER / LOAD on one of this worker's clients: tell the supervisor."""
        if changed is None:
            self.send({"op": "acl_load"})
            return
        names = sorted(changed | set(deleted))
        for n in names:
            self.pending[n] = self.pending.get(n, 0) + 1
        self.send({"op": "users", "set": user_lines(users, names), "deleted": [n for n in names if n not in users],
                   "origin": self.index})  # fmt: skip

    def replicated(self, msg: dict[str, Any]) -> None:
        """A change the supervisor sent to every worker: apply what no own change in flight supersedes."""
        own = msg.get("origin") == self.index
        lines: dict[str, str] = msg.get("set", {})
        deleted: list[str] = msg.get("deleted", [])
        skip = set()
        for n in [*lines, *deleted]:
            if own:
                self.pending[n] -= 1
            if self.pending.get(n):
                skip.add(n)
            else:
                self.pending.pop(n, None)
        self.apply({n: line for n, line in lines.items() if n not in skip}, [n for n in deleted if n not in skip])

    def apply(self, lines: dict[str, str], deleted: list[str]) -> None:
        if self.proxy is not None and (lines or deleted):
            self.proxy.reloader.replicate(lines, deleted)
