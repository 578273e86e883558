"""With ``[server] workers``: the supervisor's one stream of users changes, which every worker applies.

ACL administration (ACL SETUSER / DELUSER / LOAD) is ordered here, with the reloads, into one stream;
the client is answered once every worker has applied its change, and a worker that does not within
ACK_TIMEOUT (LOAD_ACK_TIMEOUT for an ACL LOAD) is killed and restarted rather than left serving the old
rights: see :mod:`.worker_link`. A worker forked later catches up from the journal of changes since the
last reload and the stream, before it listens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from redisguard.acl import UsersFileError
from redisguard.acl.users_file import read_users_file
from redisguard.config.model import Config
from redisguard.files.versions import FileChanged, FileUnreadable, read_now
from redisguard.observe.audit import get_logger
from redisguard.runtime.slots import Channel, Message, Slot
from redisguard.runtime.watch import watched_files
from redisguard.runtime.worker_link import Journal, encode_files

log = get_logger("redisguard")

# A worker applies an ACL SETUSER / DELUSER at once (on the loop, well under a second even with 10,000
# users); an ACL LOAD reads the users file in its turn, after any reload in flight.
ACK_TIMEOUT = 10.0
LOAD_ACK_TIMEOUT = 60.0


@dataclass(eq=False)
class Pending:
    """A change sent to every worker, not yet applied by all of them."""

    msg: Message
    origin: int
    generation: int  # reloads before it: its journal lines are stale after another reload
    waiting: set[int]  # the slots that must say they applied it
    lines: dict[str, str | None] = field(default_factory=dict)  # the users it made, for the journal


class ChangeStream:
    """The order of users changes and reloads, over the supervisor's ``slots`` (the same list)."""

    def __init__(self, config: Config, slots: Sequence[Slot],
                 task: Callable[[Coroutine[Any, Any, None]], None]) -> None:  # fmt: skip
        self.config = config
        self.slots = slots
        self.task = task  # the supervisor's: it keeps the deadlines alive
        self.journal: Journal = {}  # ACL SETUSER / DELUSER since the last reload, for new workers
        self.seq = 0  # the last sequence number given
        self.generation = 0  # reloads so far
        self.pending: dict[int, Pending] = {}  # changes sent, by sequence number, not yet applied everywhere

    def catch_up(self, channel: Channel) -> None:
        """A worker just forked: the changes in flight (its journal copy has the committed ones)."""
        for change in self.pending.values():
            channel.send(change.msg)

    def change(self, origin: Slot, msg: Message) -> None:
        """ACL SETUSER / DELUSER / LOAD on one worker: the next in the stream, sent to every worker."""
        self.seq += 1
        out = {"op": "apply", "seq": self.seq, "origin": origin.index, "pid": origin.pid, "id": msg["id"],
               "change": msg["change"]}  # fmt: skip
        load = msg["change"][0] == "load"
        if load:
            self.journal.clear()  # the file is the truth again
            self.generation += 1
            try:  # read once, here, for every worker: they cannot load different versions of it
                out["data"] = base64.b64encode(read_users_file(self.config.acl.users_file)).decode()
            except UsersFileError as e:
                out["error"] = str(e)
        waiting = {s.index for s in self.slots if s.channel is not None and s.channel.synced}
        change = self.pending[self.seq] = Pending(out, origin.index, self.generation, waiting)
        self._broadcast(out)
        self.task(self._deadline(self.seq, change, LOAD_ACK_TIMEOUT if load else ACK_TIMEOUT))

    def applied(self, slot: Slot, msg: Message) -> None:
        change = self.pending.get(msg["seq"])
        if change is None:
            return
        if not change.lines:  # (every worker renders the same lines; the origin may be gone)
            change.lines = {**msg.get("set", {}), **dict.fromkeys(msg.get("deleted", []))}
        change.waiting.discard(slot.index)
        self._committed(msg["seq"])

    def gone(self, slot: Slot) -> None:
        """The worker in ``slot`` exited: a worker that is gone serves no one, so nothing waits for it."""
        for seq, change in list(self.pending.items()):
            change.waiting.discard(slot.index)
            self._committed(seq)

    def _committed(self, seq: int) -> None:
        """Once every worker has applied change ``seq`` (or is gone): journal it, tell its origin."""
        change = self.pending[seq]
        if change.waiting:
            return
        del self.pending[seq]
        if change.generation == self.generation:
            self.journal.update(change.lines)
        origin = self.slots[change.origin]
        if origin.channel is not None and origin.pid == change.msg["pid"]:  # (not a restarted worker in its slot)
            origin.channel.send({"op": "committed", "id": change.msg["id"]})

    async def _deadline(self, seq: int, change: Pending, timeout: float) -> None:
        """A worker that has not applied a change in time is killed, never left with the old rights."""
        await asyncio.sleep(timeout)
        if seq not in self.pending:
            return
        for index in sorted(change.waiting):
            slot = self.slots[index]
            log.error("worker_killed", worker=index, detail=f"did not apply an ACL change within {timeout:g} s")
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        # (its exit is reaped: gone() then commits the change)

    def reload(self, why: str, files: dict[str, str] | None = None) -> None:
        """Every worker reloads (users file, certificates, TOML) from the same bytes — ``files``
        (encoded), as the file watch found them stable, or read here now, once and re-read (read_now) —
        so no two workers can load different versions."""
        self.journal.clear()  # the files are the truth again
        self.generation += 1
        log.info("reload_workers", reason=why, workers=len(self.slots))
        msg: Message = {"op": "reload", "files": files, "generation": self.generation}
        if files is None:
            try:  # (a few MiB at most, on the supervisor's loop: it carries no client traffic)
                msg["files"] = encode_files(read_now(watched_files(self.config)))
            except (FileChanged, FileUnreadable) as e:
                msg = {"op": "reload", "error": str(e), "generation": self.generation}
        self._broadcast(msg)

    def _broadcast(self, msg: Message) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send(msg)
