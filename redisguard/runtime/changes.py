"""What the sequence of users changes (:mod:`.reload`) holds: a change as the client sent it, a load
asked for with the changes to replay onto its result, and the mirror users' part of a reply."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redisguard.acl import User, admin
from redisguard.commands.table import CommandTable
from redisguard.observe.audit import get_logger
from redisguard.protocol.resp import error_format
from redisguard.upstream.mirror_sync import MirrorError

audit = get_logger("redisguard.audit")


@dataclass(frozen=True)
class Change:
    """One ACL SETUSER or DELUSER as the client sent it (``args``: after the subcommand)."""

    command: str  # "setuser" | "deluser"
    args: tuple[bytes, ...]

    def run(self, users: dict[str, User], table: CommandTable) -> tuple[dict[str, User] | None, bytes, list[str]]:
        """(new users or None, the reply, the deleted names) — admin.setuser / deluser on ``users``."""
        if self.command == "setuser":
            new, reply = admin.setuser(users, table, self.args)
            return new, reply, []
        return admin.deluser(users, self.args)


@dataclass(eq=False)
class Load:
    """A load asked for: ``full`` (users file, certificates, TOML: SIGHUP) or users only (ACL LOAD,
    whose reply ``done`` gets). ``replay``: the changes applied since it was asked for. ``files``: the
    watched files' bytes as the file watcher found them stable (None: read them when the load starts)."""

    full: bool
    done: asyncio.Future[bytes] | None = None
    replay: list[Change] = field(default_factory=list)
    files: dict[Path, bytes] | None = None
    error: str = ""  # the files could not be read (by the supervisor, for every worker): refused
    generation: int = 0  # with workers: the supervisor's number of the reload (its outcome is reported with it)

    def replayed(self, users: dict[str, User], table: CommandTable) -> dict[str, User]:
        """``users`` just loaded, with the changes made since the load was asked for applied, in order."""
        for change in self.replay:
            new = change.run(users, table)[0]
            if new is not None:
                users = new
        if self.replay:
            audit.info("users_changes_replayed", changes=len(self.replay), detail="applied since the load was asked for")
        return users


class ChangeOrder(Protocol):
    """Where a worker sends its ACL changes to be put in order (worker_link.WorkerLink)."""

    def submit(self, command: str, args: Sequence[bytes]) -> Awaitable[bytes]: ...


async def mirror_reply(mirror: Any, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str],
                       reply: bytes) -> bytes:  # fmt: skip
    """``reply`` once Redis has the mirror users of a change, or an error that says Redis does not."""
    try:
        await mirror.apply(users, changed, deleted)
    except MirrorError as e:
        return error_format(f"redisguard: the change is in force here, but Redis did not take the mirror "
                            f"user change ({e}); clients may fail to log in upstream until it does".encode())  # fmt: skip
    return reply
