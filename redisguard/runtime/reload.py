"""Reload: SIGHUP re-reads the users file and the certificates; ACL SETUSER/DELUSER/LOAD change the
users. Either way a new :class:`~redisguard.policy.decide.Policy` is put in force whole, and every connected
client is moved to its user's new rules or disconnected (``Session.rebind`` says which).

**One sequence for every change to the users** (:class:`Reloader` is it, one per process). Its
ordering rule:

- a *load* (SIGHUP, the file watch, the supervisor's reload, ACL LOAD) stands for the files as they
  are when it is asked for; loads run one at a time, in the order asked (a SIGHUP while a reload is
  already queued is that one);
- an *ACL SETUSER / DELUSER* takes effect when it is applied, at once, on the users in force;
- a change applied after a load was asked for is recorded with that load and **replayed, as the
  client sent it, onto the load's result before that result is put in force**. So a change is never
  undone by a load asked for before it, and is undone only by a load asked for after it (SIGHUP and
  ACL LOAD mean "the file is the truth now", as Redis's ACL LOAD drops unsaved ACL SETUSERs).

With ``[server] workers`` the supervisor orders the changes (see :mod:`.worker_link`): every worker
applies the same loads and changes in the same order, so every worker ends with the same users, and
the client that sent a change gets its reply only once every worker has applied it (and, in mirror
mode, Redis has the mirror users). An acknowledged change of rights is final.

This module is the sequence alone; a load's reading and putting in force, and what a change of users
does to the connected clients, are :mod:`.loading`'s; the records it keeps are :mod:`.changes`'s.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from redisguard.acl import UsersFileError
from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.observe.audit import get_logger
from redisguard.policy.decide import Policy, Shared
from redisguard.runtime.changes import Change, ChangeOrder, Load, mirror_reply
from redisguard.runtime.loading import Loader
from redisguard.transport.context import ConnectionContext

audit = get_logger("redisguard.audit")


class Reloader:
    def __init__(self, config: Config, table: CommandTable, shared: Shared, ctx: ConnectionContext,
                 set_config: Callable[[Config], None]) -> None:  # fmt: skip
        self.table = table
        self.shared = shared
        self.loader = Loader(config, table, shared, ctx, set_config)  # a load's work; clients follow every change
        self.loads: deque[Load] = deque()  # asked for, not started
        self.current: Load | None = None  # the one reading files now
        self.reloading: asyncio.Future[None] | None = None  # the task that runs the loads
        shared.sequencer = self
        # With [server] workers: the supervisor orders this process's changes (worker_link.WorkerLink)
        self.link: ChangeOrder | None = None

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    def _loads(self) -> list[Load]:
        return ([self.current] if self.current is not None else []) + list(self.loads)

    # -- changes: ACL SETUSER / DELUSER / LOAD -----------------------------------------------------
    def submit(self, command: str, args: Sequence[bytes], computed: Any = None) -> bytes | Awaitable[bytes]:
        """ACL SETUSER / DELUSER / LOAD (``command``) from a client of this process: its reply, or what
        to await for it (the session holds its later requests meanwhile). ``computed``: (users, result)
        made off the loop, used if still of the users in force."""
        if self.link is not None:  # the supervisor puts it in order; every worker applies it
            return self.link.submit(command, args)
        if command == "load":
            return self._mirrored(self.acl_load(), None, ())
        reply, changed, deleted = self.change(Change(command, tuple(args)), computed)
        if self.policy.mirror is None or not (changed or deleted):
            return reply
        return self._mirrored(_done(reply), changed, deleted)

    def change(self, change: Change, computed: Any = None) -> tuple[bytes, set[str], list[str]]:
        """Apply an ACL SETUSER / DELUSER now, on the users in force (and record it for the loads asked
        for: replayed onto their results). The reply, the changed and the deleted user names."""
        users = self.policy.users
        if computed is not None and computed[0] is users:
            new, reply, *rest = computed[1]
            deleted = list(rest[0]) if rest else []
        else:
            new, reply, deleted = change.run(users, self.table)
        if new is None:
            return reply, set(), []
        for load in self._loads():
            load.replay.append(change)
        changed = {change.args[0].decode("utf-8", "surrogateescape")} if change.command == "setuser" else set(deleted)
        self.shared.swap(self.policy.with_users(new), changed, deleted)
        return reply, changed, deleted

    async def _mirrored(self, reply: Awaitable[bytes], changed: set[str] | None, deleted: Sequence[str]) -> bytes:
        """``reply``, once Redis has the mirror users of the change (mirror mode), or an error saying it does not."""
        out = await reply
        mirror = self.policy.mirror
        if mirror is None or out[:1] == b"-":
            return out
        return await mirror_reply(mirror, self.policy.users, changed, deleted, out)

    def acl_load(self, data: bytes | None = None, error: str = "") -> asyncio.Future[bytes]:
        """ACL LOAD: a users-only load in the sequence; its reply when its result is in force. With
        workers the supervisor read the file once for all of them: ``data`` its bytes, or ``error``
        why it could not be read (every worker then answers the same)."""
        users_file = self.policy.users_file
        files = None if data is None or not users_file else {Path(users_file): data}
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.loads.append(Load(False, done, files=files, error=error))
        self._start()
        return done

    def put_lines(self, lines: dict[str, str], deleted: Sequence[str]) -> None:
        """Users as another worker made them (users-file lines; the supervisor's journal of changes since
        the last reload, applied by a worker it forks): put in force as they are."""
        users = dict(self.policy.users)
        try:
            parsed = parse_users("\n".join(lines.values()), self.table) if lines else {}
        except UsersFileError as e:  # cannot happen for lines another worker rendered; never crash on it
            audit.error("users_replication_failed", error=str(e))
            return
        # only the users the lines name: a text without a `user default` line parses with Redis's implicit,
        # open `default` user, which must never replace the real one (a restarted worker would let anyone in)
        parsed = {name: user for name, user in parsed.items() if name in lines}
        users.update(parsed)
        gone = [n for n in deleted if users.pop(n, None) is not None]
        if parsed or gone:
            self.shared.swap(self.policy.with_users(users), set(parsed) | set(gone), gone)

    def reload(self, files: dict[Path, bytes] | None = None, error: str = "", generation: int = 0) -> None:
        """Re-read the users file and every listener's certificates, off the event loop.

        ``files``: the watched files' bytes, as the file watcher found them stable (parsed as they are);
        None (SIGHUP): read each file once when the load starts, re-read it, and refuse the reload if the
        two reads differ. A SIGHUP during a reload runs one more reload after it (the files may have
        changed again); one while that one is still waiting is that one, asked for again (its record of
        changes starts over, and it parses the newest files). With workers the supervisor read the
        files once for all of them: ``files`` their bytes, or ``error`` why they could not be read;
        ``generation`` its number of the reload, which the outcome is reported with."""
        queued = next((load for load in self.loads if load.full), None)
        if queued is not None:
            queued.replay.clear()
            queued.files, queued.error, queued.generation = files, error, generation
            return
        self.loads.append(Load(True, files=files, error=error, generation=generation))
        self._start()

    def _start(self) -> None:
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.ensure_future(self._run_loads())

    async def _run_loads(self) -> None:
        while self.loads:
            self.current = load = self.loads.popleft()
            try:
                if load.full:
                    await self.loader.full(load)
                else:
                    reply = await self.loader.users(load)
                    assert load.done is not None
                    if not load.done.done():
                        load.done.set_result(reply)
            except Exception as e:  # a bug: said, and the loads after it still run
                audit.error("users_load_failed", error=repr(e), exc_info=True)
                if load.done is not None and not load.done.done():
                    load.done.set_result(b"-ERR redisguard: internal error while loading the users\r\n")
            finally:
                self.current = None


async def _done(reply: bytes) -> bytes:
    return reply
