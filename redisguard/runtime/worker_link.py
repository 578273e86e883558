"""The private channel between the supervisor and one worker, and the worker's end of it.

A socketpair made before the fork carries length-prefixed JSON messages both ways:

| from → to | message | what for |
|---|---|---|
| supervisor → worker | ``{"op": "metrics", "id": n}`` → ``{"id": n, "text": ...}`` | the aggregated /metrics |
| supervisor → worker | ``{"op": "ready", "id": n}`` → ``{"id": n, "ok": bool, "why": str}`` | /readyz |
| worker → supervisor | ``{"op": "sync"}`` → ``{"op": "synced"}`` | caught up: the worker may listen now |
| worker → supervisor | ``{"op": "started"}`` | listeners up |
| worker → supervisor | ``{"op": "reload_request"}`` | SIGHUP to a worker, its file watch: reload them all |
| supervisor → every worker | ``{"op": "reload", "generation": g}`` | SIGHUP: every worker reloads |
| worker → supervisor | ``{"op": "reloaded", "generation": g, "ok": bool}`` | its outcome: each reload counted once |
| worker → supervisor | ``{"op": "change", "id": n, "change": [cmd, arg...]}`` | ACL SETUSER / DELUSER / LOAD here |
| supervisor → every worker | ``{"op": "apply", "seq": s, "origin": i, "pid": p, "id": n, "change": [...]}`` | in the one order |
| worker → supervisor | ``{"op": "applied", "seq": s, "set": {name: line}, "deleted": [...]}`` | in force here |
| supervisor → origin | ``{"op": "committed", "id": n}`` | in force in every worker: answer the client |

**ACL SETUSER / DELUSER / LOAD** are ordered by the supervisor, with its reloads, into one stream
that every worker applies in the same order (:mod:`.reload` states the ordering rule): the worker
that took the command does not apply it when it takes it but when it comes back in the stream, like
every other worker, so two workers changing one user at once end with the same result everywhere. A
change travels as the client sent it (arguments as latin-1 strings, exact for any bytes); each
worker applies it (its clients keep their connection with the new rules, a deleted user's are
disconnected: ``Session.rebind``) and says so; the supervisor tells the origin once every worker
has, and only then does the client get its reply. A worker that does not say so within a bound is
killed (and restarted: it loads the files and the journal afresh), never left serving old rights.

The supervisor keeps a journal of the changes since the last reload, as users-file lines (``user
<name> <rules>``, what ACL SAVE writes, rendered by the origin after it applied the change), for the
workers it forks later; a new worker applies it, then asks to ``sync`` and applies what the stream
holds before that answer, and only then listens.

If the supervisor goes away, the channel reaches end of file and the worker drains and stops (it also
gets SIGTERM from the kernel: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from redisguard.acl import User
from redisguard.acl.admin import render_acl_file
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import Policy
from redisguard.protocol.resp import error_format
from redisguard.runtime.changes import Change, mirror_reply
from redisguard.runtime.reload import Reloader

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


def encode_files(files: Mapping[Path, bytes] | None) -> dict[str, str] | None:
    """Files' bytes for a message (path -> base64): read once, by one process, parsed by every worker."""
    return None if files is None else {str(p): base64.b64encode(data).decode() for p, data in files.items()}


def decode_files(files: Mapping[str, str] | None) -> dict[Path, bytes] | None:
    return None if files is None else {Path(p): base64.b64decode(data) for p, data in files.items()}


def user_lines(users: dict[str, User], names: Sequence[str]) -> dict[str, str]:
    return {n: render_acl_file({n: users[n]}).decode("utf-8", "surrogateescape") for n in names if n in users}



class Worker(Protocol):
    """The worker process's proxy as its link to the supervisor drives it (server.py's Proxy)."""

    @property
    def reloader(self) -> Reloader: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def policy(self) -> Policy: ...
    async def ready(self) -> tuple[bool, str]: ...

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


def encode_change(command: str, args: Sequence[bytes]) -> list[str]:
    return [command, *(bytes(a).decode("latin-1") for a in args)]


def decode_change(change: list[str]) -> tuple[str, tuple[bytes, ...]]:
    return change[0], tuple(a.encode("latin-1") for a in change[1:])


COMMIT_TIMEOUT = 120.0  # the supervisor answers well before (its own bounds are shorter): a safety net
GONE = b"-ERR redisguard: the change was not applied: the supervisor did not put it in order\r\n"


@dataclass(eq=False)
class Submitted:
    """An ACL change this worker's client sent, on its way: its reply once applied here, and once
    committed (applied everywhere)."""

    applied: asyncio.Future[tuple[bytes, set[str] | None, list[str]]]
    committed: asyncio.Future[str]


class WorkerLink(Endpoint):
    """A worker's end: answers the supervisor, applies the stream of users changes, relays this
    worker's ACL changes."""

    def __init__(self, sock: socket.socket, index: int, journal: Journal, inherited: dict[str, socket.socket]) -> None:
        self.sock = sock
        self.index = index
        self.journal = dict(journal)  # the supervisor's at fork time: applied before the listeners start
        self.inherited = inherited  # unix listeners bound by the supervisor, by listener name
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[dict[str, Any]] = []
        self.proxy: Worker | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.submitted: dict[int, Submitted] = {}
        self.next_id = 0
        self.stop = asyncio.Event()
        self.reader: asyncio.Future[None] | None = None
        self.synced: asyncio.Future[None] | None = None

    def attach(self, proxy: Worker) -> None:
        """The policy is loaded: catch up with the changes made since the last reload."""
        self.proxy = proxy
        proxy.reloader.link = self
        proxy.reloader.loader.on_reload = self._reloaded
        if self.journal:
            proxy.reloader.put_lines({n: line for n, line in self.journal.items() if line is not None},
                                     [n for n, line in self.journal.items() if line is None])  # fmt: skip

    async def open(self) -> None:
        """Before the listeners: read the channel from now on, and apply what the stream holds so far."""
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self.synced = asyncio.get_running_loop().create_future()
        self.reader = asyncio.ensure_future(self._read(reader))
        self.send({"op": "sync"})
        await self.synced

    def _reloaded(self, generation: int, ok: bool) -> None:
        """A reload's outcome: the supervisor counts each reload of the instance once (aggregate.py)."""
        self.send({"op": "reloaded", "generation": generation, "ok": ok})

    def started(self) -> None:
        self.send({"op": "started"})

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Serve the supervisor's requests until the channel closes (then ``stop``)."""
        try:
            while (msg := await read_message(reader)) is not None:
                self._handle(msg)
        finally:
            if not self.stop.is_set():
                log.warning("supervisor_gone", detail="the supervisor's channel closed: draining and stopping")
            self.stop.set()
            for sub in self.submitted.values():
                if not sub.applied.done():
                    sub.applied.set_result((GONE, None, []))
                if not sub.committed.done():
                    sub.committed.set_result("the supervisor is gone")

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "apply":
            self._apply(msg)
        elif op == "committed":
            sub = self.submitted.get(msg["id"])
            if sub is not None and not sub.committed.done():
                sub.committed.set_result(msg.get("error", ""))
        elif op == "synced" and self.synced is not None and not self.synced.done():
            self.synced.set_result(None)
        elif op == "reload" and self.proxy is not None:  # (the files as the supervisor read them, once)
            self.proxy.reloader.reload(decode_files(msg.get("files")), msg.get("error", ""), msg.get("generation", 0))
        elif op in ("metrics", "ready"):
            self._spawn(self._answer(msg))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
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

    def request_reload(self, files: Mapping[Path, bytes] | None = None) -> None:
        """SIGHUP to this worker, or its file watch (``files``: the bytes it found stable): every worker
        reloads, in the stream's order, from the same bytes."""
        self.send({"op": "reload_request", "files": encode_files(files)})

    # -- ACL changes -------------------------------------------------------------------------------
    def submit(self, command: str, args: Sequence[bytes]) -> Awaitable[bytes]:
        """ACL SETUSER / DELUSER / LOAD from a client here: to the supervisor, which orders it; the reply
        once every worker has applied it (and, in mirror mode, Redis has the mirror users)."""
        self.next_id += 1
        loop = asyncio.get_running_loop()
        sub = self.submitted[self.next_id] = Submitted(loop.create_future(), loop.create_future())
        self.send({"op": "change", "id": self.next_id, "change": encode_change(command, args)})
        return self._outcome(self.next_id, sub)

    async def _outcome(self, rid: int, sub: Submitted) -> bytes:
        try:
            try:
                reply, changed, deleted = await asyncio.wait_for(asyncio.shield(sub.applied), COMMIT_TIMEOUT)
            except TimeoutError:
                return GONE
            mirror = None
            if self.proxy is not None and self.proxy.policy.mirror is not None and reply[:1] != b"-":
                mirror = asyncio.ensure_future(mirror_reply(self.proxy.policy.mirror, self.proxy.policy.users, changed,
                                                            deleted, reply))  # fmt: skip
            try:
                error = await asyncio.wait_for(asyncio.shield(sub.committed), COMMIT_TIMEOUT)
            except TimeoutError:
                error = f"no answer from the supervisor in {COMMIT_TIMEOUT:g} s"
            if mirror is not None:
                reply = await mirror
            if error:
                return error_format(f"redisguard: the change may not be in force in every worker ({error})".encode())
            return reply
        finally:
            self.submitted.pop(rid, None)

    def _apply(self, msg: dict[str, Any]) -> None:
        """The next change of the stream: apply it here now (a load: in its turn), then say so."""
        assert self.proxy is not None
        reloader = self.proxy.reloader
        command, args = decode_change(msg["change"])
        # (ids are this process's: a worker restarted in the same slot is not the origin of what it catches up on)
        sub = self.submitted.get(msg["id"]) if msg.get("origin") == self.index and msg.get("pid") == os.getpid() else None
        if command == "load":  # (the users file as the supervisor read it, once, for every worker)
            data = base64.b64decode(msg["data"]) if "data" in msg else None
            self._spawn(self._loaded(msg["seq"], reloader.acl_load(data, msg.get("error", "")), sub))
            return
        reply, changed, deleted = reloader.change(Change(command, args))
        users = self.proxy.policy.users
        self.send({"op": "applied", "seq": msg["seq"], "set": user_lines(users, sorted(changed - set(deleted))),
                   "deleted": deleted})  # fmt: skip
        if sub is not None and not sub.applied.done():
            sub.applied.set_result((reply, changed, deleted))

    async def _loaded(self, seq: int, done: asyncio.Future[bytes], sub: Submitted | None) -> None:
        reply = await done
        self.send({"op": "applied", "seq": seq})
        if sub is not None and not sub.applied.done():
            sub.applied.set_result((reply, None, []))
