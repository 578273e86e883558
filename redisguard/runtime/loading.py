"""One load's work, and what any change of the users does to this process.

The sequence (:mod:`.reload`) decides when a load runs; :class:`Loader` does it: the files read and parsed
off the event loop (:func:`_read_all` for SIGHUP, :func:`_read_users` for ACL LOAD), the result swapped in
whole with the changes made meanwhile replayed on top, the old users freed off the loop. Then, for a load
or an ACL SETUSER / DELUSER alike, :meth:`Loader.users_changed` moves every connected client to its
user's new rules or disconnects it.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from redisguard.acl import ACLError, ACLReplies, User, UsersFileError, admin
from redisguard.acl.users_file import parse_users_bytes
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
from redisguard.runtime.changes import Load
from redisguard.runtime.housekeeping import malloc_trim
from redisguard.runtime.reconfigure import Reconfiguration, reread
from redisguard.runtime.watch import watched_files
from redisguard.transport.context import ConnectionContext
from redisguard.transport.tls import TLSConfigError, not_after, server_context

audit = get_logger("redisguard.audit")

_trim = malloc_trim()

# What a thread read for SIGHUP (users, their ACL replies, TLS contexts, the TOML's changes, the files) and
# for ACL LOAD (the users or None, the reply, their ACL replies)
Read = tuple[dict[str, User], ACLReplies, dict[str, ssl.SSLContext], Reconfiguration, dict[Path, bytes]]
ReadUsers = tuple[dict[str, User] | None, bytes, ACLReplies | None]


def export_expiry(metrics: Metrics, lst: ListenerConfig, files: Mapping[Path, bytes]) -> None:
    """From the bytes the listener's context was built from (``files``, path -> bytes)."""
    assert lst.tls is not None
    metrics.cert_expiry.labels(f"{lst.name}:server").set(not_after(lst.tls.cert_file, files[lst.tls.cert_file]))
    if lst.tls.ca_file:
        metrics.cert_expiry.labels(f"{lst.name}:ca").set(not_after(lst.tls.ca_file, files[lst.tls.ca_file]))


def _release(users: dict[str, User]) -> None:
    """Drop the previous users one at a time (in a worker thread, so the loop gets turns between),
    then hand the freed memory back to the system: the users were read in a worker thread, whose
    glibc arena keeps what it freed (each reload may read in another thread, so without this every
    thread's arena would keep a whole users table: RSS grew with each reload, levelling off only
    when every thread had done one)."""
    while users:
        users.popitem()
    if _trim is not None:
        _trim()


def _read_all(cfg: Config, table: CommandTable, seen: Callable[[], TrafficProfile] | None,
              files: dict[Path, bytes] | None) -> Read:  # fmt: skip
    """SIGHUP's reading, in a worker thread."""
    # Every file read once (and checked); from here on only those bytes are parsed.
    files = read_now(watched_files(cfg)) if files is None else files
    # the TOML too: what changed is applied or logged as needing a restart
    changes = reread(cfg, files.get(cfg.source) if cfg.source else None)
    users = parse_users_bytes(files[cfg.acl.users_file], table, str(cfg.acl.users_file), require_default=True)
    if seen is not None:  # [acl] reload_guard: refuse a policy that breaks observed traffic
        breaks = breakage(seen(), users, table)  # (every worker's and earlier run's: the file)
        if breaks:
            b = breaks[0]
            raise ValueError(f"reload_guard: the new users file would deny {len(breaks)} observed "
                             f"command(s), e.g. user {b.user}: {b.what}")  # fmt: skip
    contexts = {lst.name: server_context(lst, files) for lst in cfg.listeners if lst.type == "tls"}
    return users, ACLReplies(users).prepare(), contexts, changes, files


def _read_users(load: Load, users_file: str, table: CommandTable) -> ReadUsers:
    """ACL LOAD's reading, in a worker thread: Redis's all-or-nothing load."""
    if load.error:
        return None, error_format(load.error.encode("utf-8", "surrogateescape")), None
    data = next(iter(load.files.values())) if load.files else None
    users, reply = admin.acl_load(users_file or None, table, data=data)
    return users, reply, None if users is None else ACLReplies(users).prepare()


class Loader:
    """Loads put in force, and every change of the users carried to the connected clients."""

    def __init__(self, config: Config, table: CommandTable, shared: Shared, ctx: ConnectionContext,
                 set_config: Callable[[Config], None]) -> None:  # fmt: skip
        self.config = config
        self.set_config = set_config  # the proxy's: every holder of the running config gets the new one
        self.table = table
        self.shared = shared
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.background: set[asyncio.Future[None]] = set()
        self.in_force = shared.policy.users  # the users of the last change seen (what the next one changes)
        # With workers: told each reload's outcome, with the supervisor's number of it (worker_link)
        self.on_reload: Callable[[int, bool], None] | None = None
        shared.on_users_changed = self.users_changed

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    async def users(self, load: Load) -> bytes:
        """ACL LOAD's work: Redis's all-or-nothing load of the users file (its reply), the SIGHUP way:
        read, parsed and its ACL replies built off the loop, no GC pass over it, the old users freed
        off the loop."""
        gc.disable()
        try:
            users, reply, acl_replies = await asyncio.to_thread(_read_users, load, self.policy.users_file, self.table)
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
        users = load.replayed(read, self.table)
        dropped = self.shared.swap(policy_of(users), None, (), acl_replies if users is read else None)
        gc.freeze()
        gc.enable()
        # Freeing 10,000 users is ~20 ms: not on the loop, and on the decisions' own worker
        # thread, so no offloaded decision can be reading the old users meanwhile.
        await asyncio.get_running_loop().run_in_executor(self.ctx.executor, _release, old)
        return dropped

    async def full(self, asked: Load) -> None:
        """SIGHUP's work, all or nothing: parse and build everything in a worker thread, then swap it in
        at once.

        New handshakes and logins use the new files; see _rebind_sessions for connected clients. A
        users file without an explicit `user default` line is refused: Redis would make `default`
        `on nopass +@all`, silently opening the proxy to anyone."""
        cfg = self.config
        if asked.error:
            self._reload_result(asked, False)
            audit.error("config_reload_failed", error=asked.error, detail="kept the previous users and certificates")
            return
        # A full garbage collection over 10,000 users' command sets holds the GIL for ~60 ms,
        # wherever it runs: none while loading, and what is loaded is frozen out of later ones.
        gc.disable()
        try:
            profile, where, seen = self.shared.profile, cfg.profile.file, None
            if cfg.acl.reload_guard and isinstance(profile, TrafficProfile) and where is not None:
                seen = await observe(profile, where)  # a copy, made on the loop a slice at a time
            users, acl_replies, contexts, changes, files = await asyncio.to_thread(_read_all, cfg, self.table, seen,
                                                                                   asked.files)  # fmt: skip
        except (UsersFileError, ACLError, TLSConfigError, OSError, ValueError) as e:
            gc.enable()
            self._reload_result(asked, False)
            audit.error("config_reload_failed", error=str(e), detail="kept the previous users and certificates")
            return
        for lst in cfg.listeners:
            if lst.type == "tls":
                export_expiry(self.metrics, lst, files)
        self.ctx.tls_contexts.update(contexts)
        self.config = new_cfg = changes.merged(cfg)
        self.set_config(new_cfg)
        if isinstance(observer := self.shared.observer, Observer):
            observer.audit_keys = new_cfg.log.audit_keys
        disabled = frozenset(new_cfg.acl.disabled_commands)
        # ACL SETUSER/DELUSER applied while the files were read hold on top
        dropped = await self._put_in_force(users, acl_replies, asked,
                                           lambda u: replace(self.policy, users=u, disabled=disabled))  # fmt: skip
        users = self.policy.users
        self._reload_result(asked, True)
        changes.log()
        audit.info("config_reloaded", users=len(users), listeners=sorted(contexts), disconnected=dropped,
                   applied=changes.applied, restart_required=changes.restart)  # fmt: skip

    def _reload_result(self, asked: Load, ok: bool) -> None:
        self.metrics.reload_result(ok)
        if self.on_reload is not None:
            self.on_reload(asked.generation, ok)

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
        old, self.in_force = self.in_force, users
        if changed is None:  # a load: an unchanged line is read as the very same User (users_file._read_before)
            changed = {n for n, u in users.items() if old.get(n) is not u}
            deleted = [n for n in old if n not in users]
        audit.info("users_changed", users=len(users), changed=_some(changed), changed_count=len(changed),
                   deleted=_some(deleted), deleted_count=len(deleted), disconnected=dropped)  # fmt: skip
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


def _some(names: Iterable[str], most: int = 20) -> list[str]:
    """The first ``most`` of ``names`` in order, for a log line that stays short with 10,000 users."""
    return heapq.nsmallest(most, names)
