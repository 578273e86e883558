"""Reload: SIGHUP re-reads the users file and the certificates; ACL SETUSER/DELUSER/LOAD change the
users. Either way a new :class:`~redisguard.policy.Policy` is put in force whole, and every connected
client is moved to its user's new rules or disconnected (``Session.rebind`` says which).
"""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import certs
from .acl import ACLError, ACLReplies, User, UsersFileError
from .acl.users_file import parse_users, parse_users_bytes
from .audit import get_logger
from .commands import CommandTable
from .config import Config, ListenerConfig
from .context import ConnectionContext
from .file_versions import read_now
from .least_privilege import breakage
from .metrics import Metrics
from .policy import Policy, Shared
from .profile import TrafficProfile
from .profile_store import snapshot
from .reconfigure import Reconfiguration, reread
from .tls import TLSConfigError, server_context
from .watch import watched_files

audit = get_logger("redisguard.audit")


def export_expiry(metrics: Metrics, lst: ListenerConfig, files: Mapping[Path, bytes]) -> None:
    """From the bytes the listener's context was built from (``files``, path -> bytes)."""
    assert lst.tls is not None
    metrics.cert_expiry.labels(f"{lst.name}:server").set(certs.not_after(lst.tls.cert_file, files[lst.tls.cert_file]))
    if lst.tls.ca_file:
        metrics.cert_expiry.labels(f"{lst.name}:ca").set(certs.not_after(lst.tls.ca_file, files[lst.tls.ca_file]))


def _release(users: dict[str, User]) -> None:
    """Drop the previous users one at a time (in a worker thread, so the loop gets turns between)."""
    while users:
        users.popitem()


class Reloader:
    def __init__(self, config: Config, table: CommandTable, shared: Shared, ctx: ConnectionContext,
                 set_config: Callable[[Config], None]) -> None:  # fmt: skip
        self.config = config
        self.set_config = set_config  # the proxy's: every holder of the running config gets the new one
        self.table = table
        self.shared = shared
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.reloading: asyncio.Future[None] | None = None
        self.reload_again = False
        self.next_files: dict[Path, bytes] | None = None  # what the next reload parses (None: read them now)
        self.background: set[asyncio.Future[None]] = set()
        shared.on_users_changed = self.users_changed
        # With workers: told of the users changes made here by ACL SETUSER / DELUSER / LOAD (not of
        # reloads, nor of changes replicated from other workers) — see worker_link.
        self.on_local_change: Callable[[dict[str, User], set[str] | None, Sequence[str]], None] | None = None
        self._not_local = False  # set while this module swaps users itself
        self.deferred: list[tuple[dict[str, str], Sequence[str]]] = []  # replicated during a reload

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    def reload(self, files: dict[Path, bytes] | None = None) -> None:
        """Re-read the users file and every listener's certificates, off the event loop.

        ``files``: the watched files' bytes, as the file watcher found them stable (parsed as they
        are); None (SIGHUP): read each file now, once, re-read it, and refuse the reload if the two
        reads differ. A SIGHUP during a reload runs one more reload after it (the files may have
        changed again)."""
        self.next_files = files
        if self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            return
        self.reloading = asyncio.ensure_future(self._reload())

    async def _reload(self) -> None:
        """All or nothing: parse and build everything in a worker thread, then swap it in at once.

        New handshakes and logins use the new files; see _rebind_sessions for connected clients. A
        users file without an explicit `user default` line is refused: Redis would make `default`
        `on nopass +@all`, silently opening the proxy to anyone."""
        cfg = self.config
        tls = [lst for lst in cfg.listeners if lst.type == "tls"]

        def load(seen_data: dict[str, Any] | None, files: dict[Path, bytes] | None
                 ) -> tuple[dict[str, User], ACLReplies, dict[str, ssl.SSLContext], Reconfiguration,
                            dict[Path, bytes]]:  # fmt: skip
            # Every file read once (and checked); from here on only those bytes are parsed.
            files = read_now(watched_files(cfg)) if files is None else files
            # the TOML too: what changed is applied or logged as needing a restart
            changes = reread(cfg, files.get(cfg.source) if cfg.source else None)
            users = parse_users_bytes(files[cfg.acl.users_file], self.table, str(cfg.acl.users_file), require_default=True)
            if seen_data is not None:  # [acl] reload_guard: refuse a policy that breaks observed traffic
                breaks = breakage(TrafficProfile.from_json(seen_data), users, self.table)
                if breaks:
                    b = breaks[0]
                    raise ValueError(f"reload_guard: the new users file would deny {len(breaks)} observed "
                                     f"command(s), e.g. user {b.user}: {b.what}")  # fmt: skip
            contexts = {lst.name: server_context(lst, files) for lst in tls}
            return users, ACLReplies(users).prepare(), contexts, changes, files

        while True:
            self.reload_again = False
            files, self.next_files = self.next_files, None
            # A full garbage collection over 10,000 users' command sets holds the GIL for ~60 ms,
            # wherever it runs: none while loading, and what is loaded is frozen out of later ones.
            gc.disable()
            before = self.policy.users
            try:
                profile = self.shared.profile
                # a copy (made on the loop a slice at a time: the live profile changes meanwhile)
                seen = await snapshot(profile) if cfg.acl.reload_guard and profile else None
                users, acl_replies, contexts, changes, files = await asyncio.to_thread(load, seen, files)
            except (UsersFileError, ACLError, TLSConfigError, OSError, ValueError) as e:
                gc.enable()
                self.metrics.reload_result(False)
                audit.error("config_reload_failed", error=str(e), detail="kept the previous users and certificates")
            else:
                if self.policy.users is not before:
                    # ACL SETUSER/DELUSER/LOAD changed the users while the file was being read (and ACL
                    # SAVE may have rewritten it): what was read may be stale. Read it again.
                    gc.enable()
                    self.reload_again = True
                    continue
                for lst in tls:
                    export_expiry(self.metrics, lst, files)
                self.ctx.tls_contexts.update(contexts)
                old = self.policy.users
                new_cfg = changes.merged(cfg)
                self.set_config(new_cfg)
                self.shared.observer.audit_keys = new_cfg.log.audit_keys  # type: ignore[attr-defined]
                policy = replace(self.policy, users=users, disabled=frozenset(new_cfg.acl.disabled_commands))
                dropped = self._swap(policy, None, (), acl_replies)
                gc.freeze()
                gc.enable()
                # Freeing 10,000 users is ~20 ms: not on the loop, and on the decisions' own worker
                # thread, so no offloaded decision can be reading the old users meanwhile.
                await asyncio.get_running_loop().run_in_executor(self.ctx.executor, _release, old)
                del old
                self.metrics.reload_result(True)
                changes.log()
                audit.info("config_reloaded", users=len(users), listeners=sorted(contexts), disconnected=dropped,
                           applied=changes.applied, restart_required=changes.restart)  # fmt: skip
            if not self.reload_again:
                while self.deferred:
                    self._replicate(*self.deferred.pop(0))
                return

    def _swap(self, policy: Policy, changed: set[str] | None, deleted: Sequence[str],
              acl_replies: ACLReplies | None = None) -> int:  # fmt: skip
        """Put new users in force from here (a reload, a replicated change): not a local ACL change."""
        self._not_local = True
        try:
            return self.shared.swap(policy, changed, deleted, acl_replies)
        finally:
            self._not_local = False

    def replicate(self, lines: dict[str, str], deleted: Sequence[str]) -> None:
        """ACL SETUSER / DELUSER made on another worker (each changed user as its users-file line):
        put in force as they were there, as if run here (unchanged users are left alone). The
        supervisor sent them after any reload it asked for, so during a reload they wait for its end."""
        if self.reloading is not None and not self.reloading.done():
            self.deferred.append((lines, deleted))
        else:
            self._replicate(lines, deleted)

    def _replicate(self, lines: dict[str, str], deleted: Sequence[str]) -> None:
        users = dict(self.policy.users)
        try:
            parsed = parse_users("\n".join(lines.values()), self.table) if lines else {}
        except UsersFileError as e:  # cannot happen for lines another worker rendered; never crash on it
            audit.error("users_replication_failed", error=str(e))
            return
        changed = set()
        for name in lines:
            old = users.get(name)
            if old is None or old.fingerprint != parsed[name].fingerprint:
                users[name] = parsed[name]
                changed.add(name)
        gone = [n for n in deleted if users.pop(n, None) is not None]
        if changed or gone:
            self._swap(self.policy.with_users(users), changed | set(gone), gone)

    def users_changed(self, policy: Policy, changed: set[str] | None, deleted: Sequence[str]) -> int:
        """A reload or ACL SETUSER / DELUSER / LOAD changed the users: move or disconnect the other
        clients (how many were disconnected), and build the ACL replies off the loop if need be."""
        users = policy.users
        self.shared.observer.users = users  # type: ignore[attr-defined]
        if self.shared.profile is not None:  # the profile of users that are gone goes with them
            self.shared.profile.forget([name for name in self.shared.profile.users if name not in users])
        dropped = self._rebind_sessions(users, changed, deleted)
        audit.info("users_changed", users=len(users), changed=sorted(changed) if changed is not None else "all",
                   deleted=list(deleted), disconnected=dropped)  # fmt: skip
        if self.shared.acl_replies is None:

            async def rebuild() -> None:
                self.shared.offer_replies(await asyncio.to_thread(ACLReplies(users).prepare))

            self.background.add(task := asyncio.ensure_future(rebuild()))
            task.add_done_callback(self.background.discard)
        if self.on_local_change is not None and not self._not_local:
            self.on_local_change(users, changed, deleted)
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
