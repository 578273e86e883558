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
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from redisguard.acl import ACLError, ACLReplies, User, UsersFileError, admin
from redisguard.acl.users_file import parse_users, parse_users_bytes
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config, ListenerConfig
from redisguard.files.versions import read_now
from redisguard.observe.audit import get_logger
from redisguard.observe.events import Observer
from redisguard.observe.least_privilege import breakage
from redisguard.observe.metrics import Metrics
from redisguard.observe.profile import TrafficProfile
from redisguard.observe.profile_store import observe
from redisguard.policy.decide import Policy, Shared
from redisguard.protocol.resp import error_format
from redisguard.runtime.reconfigure import Reconfiguration, reread
from redisguard.runtime.watch import watched_files
from redisguard.transport.context import ConnectionContext
from redisguard.transport.tls import TLSConfigError, not_after, server_context
from redisguard.upstream.mirror_sync import MirrorError

audit = get_logger("redisguard.audit")


def export_expiry(metrics: Metrics, lst: ListenerConfig, files: Mapping[Path, bytes]) -> None:
    """From the bytes the listener's context was built from (``files``, path -> bytes)."""
    assert lst.tls is not None
    metrics.cert_expiry.labels(f"{lst.name}:server").set(not_after(lst.tls.cert_file, files[lst.tls.cert_file]))
    if lst.tls.ca_file:
        metrics.cert_expiry.labels(f"{lst.name}:ca").set(not_after(lst.tls.ca_file, files[lst.tls.ca_file]))


def _libc_malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_malloc_trim = _libc_malloc_trim()


def _release(users: dict[str, User]) -> None:
    """Drop the previous users one at a time (in a worker thread, so the loop gets turns between),
    then hand the freed memory back to the system: the users were read in a worker thread, whose
    glibc arena keeps what it freed (each reload may read in another thread, so without this every
    thread's arena would keep a whole users table: RSS grew with each reload, levelling off only
    when every thread had done one)."""
    while users:
        users.popitem()
    _malloc_trim()


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


class ChangeOrder(Protocol):
    """Where a worker sends its ACL changes to be put in order (worker_link.WorkerLink)."""

    def submit(self, command: str, args: Sequence[bytes]) -> Awaitable[bytes]: ...


class Reloader:
    def __init__(self, config: Config, table: CommandTable, shared: Shared, ctx: ConnectionContext,
                 set_config: Callable[[Config], None]) -> None:  # fmt: skip
        self.config = config
        self.set_config = set_config  # the proxy's: every holder of the running config gets the new one
        self.table = table
        self.shared = shared
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.loads: deque[Load] = deque()  # asked for, not started
        self.current: Load | None = None  # the one reading files now
        self.reloading: asyncio.Future[None] | None = None  # the task that runs the loads
        self.background: set[asyncio.Future[None]] = set()
        shared.on_users_changed = self.users_changed
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

    def _replayed(self, users: dict[str, User], load: Load) -> dict[str, User]:
        """``users`` just loaded, with the changes made since the load was asked for applied, in order."""
        for change in load.replay:
            new = change.run(users, self.table)[0]
            if new is not None:
                users = new
        if load.replay:
            audit.info("users_changes_replayed", changes=len(load.replay), detail="applied since the load was asked for")
        return users

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

    def reload(self, files: dict[Path, bytes] | None = None, error: str = "") -> None:
        """Re-read the users file and every listener's certificates, off the event loop.

        ``files``: the watched files' bytes, as the file watcher found them stable (parsed as they are);
        None (SIGHUP): read each file once when the load starts, re-read it, and refuse the reload if the
        two reads differ. A SIGHUP during a reload runs one more reload after it (the files may have
        changed again); one while that one is still waiting is that one, asked for again (its record of
        changes starts over, and it parses the newest files). With workers the supervisor read the
        files once for all of them: ``files`` their bytes, or ``error`` why they could not be read."""
        queued = next((load for load in self.loads if load.full), None)
        if queued is not None:
            queued.replay.clear()
            queued.files, queued.error = files, error
            return
        self.loads.append(Load(True, files=files, error=error))
        self._start()

    def _start(self) -> None:
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.ensure_future(self._run_loads())

    async def _run_loads(self) -> None:
        while self.loads:
            self.current = load = self.loads.popleft()
            try:
                if load.full:
                    await self._reload(load)
                else:
                    reply = await self._load_users(load)
                    assert load.done is not None
                    if not load.done.done():
                        load.done.set_result(reply)
            except Exception as e:  # a bug: said, and the loads after it still run
                audit.error("users_load_failed", error=repr(e), exc_info=True)
                if load.done is not None and not load.done.done():
                    load.done.set_result(b"-ERR redisguard: internal error while loading the users\r\n")
            finally:
                self.current = None

    async def _load_users(self, load: Load) -> bytes:
        """ACL LOAD's work: Redis's all-or-nothing load of the users file (its reply), the SIGHUP way:
        read, parsed and its ACL replies built off the loop, no GC pass over it, the old users freed
        off the loop."""

        def read() -> tuple[dict[str, User] | None, bytes, ACLReplies | None]:
            if load.error:
                return None, error_format(load.error.encode("utf-8", "surrogateescape")), None
            data = next(iter(load.files.values())) if load.files else None
            users, reply = admin.acl_load(self.policy.users_file or None, self.table, data=data)
            return users, reply, None if users is None else ACLReplies(users).prepare()

        gc.disable()
        try:
            users, reply, acl_replies = await asyncio.to_thread(read)
        except BaseException:
            gc.enable()
            raise
        if users is None:
            gc.enable()
            return reply
        await self._put_in_force(users, acl_replies, load, self.policy.with_users)
        return reply

    async def _put_in_force(self, read: dict[str, User], acl_replies: ACLReplies | None, load: Load,
                            policy_of: Callable[[dict[str, User]], Policy]) -> int:  # fmt: skip
        """Swap in the users a load read (gc disabled by the caller), with the changes made since it was
        asked for replayed on top (the ACL replies built off the loop are then of other users: rebuilt);
        how many clients were disconnected."""
        old = self.policy.users
        users = self._replayed(read, load)
        dropped = self.shared.swap(policy_of(users), None, (), acl_replies if users is read else None)
        gc.freeze()
        gc.enable()
        # Freeing 10,000 users is ~20 ms: not on the loop, and on the decisions' own worker
        # thread, so no offloaded decision can be reading the old users meanwhile.
        await asyncio.get_running_loop().run_in_executor(self.ctx.executor, _release, old)
        return dropped

    async def _reload(self, asked: Load) -> None:
        """All or nothing: parse and build everything in a worker thread, then swap it in at once.

        New handshakes and logins use the new files; see _rebind_sessions for connected clients. A
        users file without an explicit `user default` line is refused: Redis would make `default`
        `on nopass +@all`, silently opening the proxy to anyone."""
        cfg = self.config
        tls = [lst for lst in cfg.listeners if lst.type == "tls"]
        if asked.error:
            self.metrics.reload_result(False)
            audit.error("config_reload_failed", error=asked.error, detail="kept the previous users and certificates")
            return

        def load(seen: Callable[[], TrafficProfile] | None, files: dict[Path, bytes] | None
                 ) -> tuple[dict[str, User], ACLReplies, dict[str, ssl.SSLContext], Reconfiguration,
                            dict[Path, bytes]]:  # fmt: skip
            # Every file read once (and checked); from here on only those bytes are parsed.
            files = read_now(watched_files(cfg)) if files is None else files
            # the TOML too: what changed is applied or logged as needing a restart
            changes = reread(cfg, files.get(cfg.source) if cfg.source else None)
            users = parse_users_bytes(files[cfg.acl.users_file], self.table, str(cfg.acl.users_file), require_default=True)
            if seen is not None:  # [acl] reload_guard: refuse a policy that breaks observed traffic
                breaks = breakage(seen(), users, self.table)  # (every worker's and earlier run's: the file)
                if breaks:
                    b = breaks[0]
                    raise ValueError(f"reload_guard: the new users file would deny {len(breaks)} observed "
                                     f"command(s), e.g. user {b.user}: {b.what}")  # fmt: skip
            contexts = {lst.name: server_context(lst, files) for lst in tls}
            return users, ACLReplies(users).prepare(), contexts, changes, files

        # A full garbage collection over 10,000 users' command sets holds the GIL for ~60 ms,
        # wherever it runs: none while loading, and what is loaded is frozen out of later ones.
        gc.disable()
        try:
            profile, where, seen = self.shared.profile, cfg.profile.file, None
            if cfg.acl.reload_guard and isinstance(profile, TrafficProfile) and where is not None:
                seen = await observe(profile, where)  # a copy, made on the loop a slice at a time
            users, acl_replies, contexts, changes, files = await asyncio.to_thread(load, seen, asked.files)
        except (UsersFileError, ACLError, TLSConfigError, OSError, ValueError) as e:
            gc.enable()
            self.metrics.reload_result(False)
            audit.error("config_reload_failed", error=str(e), detail="kept the previous users and certificates")
            return
        for lst in tls:
            export_expiry(self.metrics, lst, files)
        self.ctx.tls_contexts.update(contexts)
        new_cfg = changes.merged(cfg)
        self.set_config(new_cfg)
        if isinstance(observer := self.shared.observer, Observer):
            observer.audit_keys = new_cfg.log.audit_keys
        disabled = frozenset(new_cfg.acl.disabled_commands)
        # ACL SETUSER/DELUSER applied while the files were read hold on top
        dropped = await self._put_in_force(users, acl_replies, asked,
                                           lambda u: replace(self.policy, users=u, disabled=disabled))  # fmt: skip
        users = self.policy.users
        self.metrics.reload_result(True)
        changes.log()
        audit.info("config_reloaded", users=len(users), listeners=sorted(contexts), disconnected=dropped,
                   applied=changes.applied, restart_required=changes.restart)  # fmt: skip

    def users_changed(self, policy: Policy, changed: set[str] | None, deleted: Sequence[str]) -> int:
        """A reload or ACL SETUSER / DELUSER / LOAD changed the users: move or disconnect the other
        clients (how many were disconnected), and build the ACL replies off the loop if need be."""
        users = policy.users
        observer = self.shared.observer
        before = observer.users if isinstance(observer, Observer) else {}
        if isinstance(observer, Observer):
            observer.users = users
        if self.shared.profile is not None:  # the profile of users that are gone goes with them (file too)
            self.shared.profile.forget([name for name in before if name not in users])
        dropped = self._rebind_sessions(users, changed, deleted)
        audit.info("users_changed", users=len(users), changed=sorted(changed) if changed is not None else "all",
                   deleted=list(deleted), disconnected=dropped)  # fmt: skip
        if self.shared.acl_replies is None:

            async def rebuild() -> None:
                try:
                    replies = await asyncio.to_thread(ACLReplies(users).prepare)
                except (RuntimeError, KeyError):
                    if users is self.shared.policy.users:
                        raise
                    return  # a later load replaced these users and is freeing them (_release): no longer wanted
                self.shared.offer_replies(replies)

            self.background.add(task := asyncio.ensure_future(rebuild()))
            task.add_done_callback(self.background.discard)
        return dropped

    def _rebind_sessions(self, users: dict[str, User], changed: set[str] | None = None, deleted: Sequence[str] = ()) -> int:
        """Move logged-in clients to their new user, or disconnect them (Session.rebind says which)."""
        dropped = 0
        for client in list(self.ctx.clients):
            session = client.session
            if session is None or client.closed:
                continue
            why = session.rebind(users, changed, deleted)
            if why:
                session.kill()  # not one more request under the old rules, even before the close completes
                dropped += 1
                self.ctx.events.log(audit.info, "connection_closed", listener=client.listener.name, peer=session.peer,
                                user=session.user.name, reason=why)  # fmt: skip
                client.close()
        return dropped


async def _done(reply: bytes) -> bytes:
    return reply


async def mirror_reply(mirror: Any, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str],
                       reply: bytes) -> bytes:  # fmt: skip
    """``reply`` once Redis has the mirror users of a change, or an error that says Redis does not."""
    try:
        await mirror.apply(users, changed, deleted)
    except MirrorError as e:
        return error_format(f"redisguard: the change is in force here, but Redis did not take the mirror "
                            f"user change ({e}); clients may fail to log in upstream until it does".encode())  # fmt: skip
    return reply
