"""Keeping Redis in step with the mirror users (mirror mode).

:class:`MirrorSync` pushes the users to Redis with ``ACL SETUSER <mirror> reset on #<hash> <rules>``
and ``ACL DELUSER`` through its own connection as the upstream user: all of them at start (stale
``<prefix>*`` users are deleted), then — in the background, coalesced, bounded by a timeout — whatever
changed each time the users change (a reload, ACL SETUSER/DELUSER/LOAD through redisguard:
``Shared.swap`` tells it). A user whose rules did not change costs nothing. If Redis cannot be
reached, or refuses a push (-BUSY while a script runs, say), the mirror is left marked not pushed and
retried with a growing delay until Redis has it. Every push goes through one lock: Redis hears one
conversation at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any

import hiredis

from redisguard.acl import User
from redisguard.acl.user import printable_name
from redisguard.config.model import Config
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics
from redisguard.upstream.client import TIMEOUT, upstream_replies
from redisguard.upstream.mirror_users import MirrorUsers

log = get_logger("redisguard")

# Commands per pipelined batch on the admin connection (each has TIMEOUT), and the longest retry delay.
BATCH = 500
RETRY_MAX = 30.0
# At most this many mirror names in one log line (the counts are always whole).
LOG_NAMES = 5
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MirrorError(Exception):
    """Redis did not take a mirror user change: its error, or why it could not be reached (redacted)."""


class MirrorSync:
    """What Redis has of the mirrors (``synced``) and the pushes that bring it in step, one at a time (``lock``)."""

    def __init__(self, config: Config, mirrors: MirrorUsers, metrics: Metrics | None = None) -> None:
        self.config = config
        self.mirrors = mirrors
        self.metrics = metrics
        self.synced: dict[str, str] = {}  # mirror name → the rules Redis has for it (absent: not known to)
        self.pushed_at: dict[str, float] = {}  # mirror name → when we last pushed it (monotonic)
        self._wake = asyncio.Event()  # a retry waiting out its delay goes at once when the users change
        self.pending: list[tuple[str, User]] | None = None  # the users to push next (None: nothing to do)
        self.task: asyncio.Task[None] | None = None
        self.failing = ""
        self.current: list[tuple[str, User]] = []  # the users Redis should have the mirrors of
        self.lock = asyncio.Lock()  # one conversation with Redis about the mirrors at a time

    async def start(self, users: dict[str, User]) -> None:
        """Push every user now (stale mirrors deleted); if Redis is not there, keep trying in the background."""
        self.pending = self.current = list(users.items())
        try:
            async with self.lock:
                log_synced(await asyncio.wait_for(self.push(stale=True), TIMEOUT * 3))
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self.failed(e)
            self.task = asyncio.ensure_future(self._run(retry=True))

    def users_changed(self, users: dict[str, User]) -> None:
        """The users changed (on the event loop): push the difference in the background."""
        self.pending = self.current = list(users.items())  # a snapshot: the dict may be released while we read it
        self._wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    def retry(self) -> None:
        """Redis did not take (all of) a push: push the newest users again in the background, with a
        growing delay, until it does."""
        if self.pending is None:
            self.pending = self.current
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run(retry=True))

    async def _run(self, retry: bool = False) -> None:
        delay = 1.0
        if retry:
            await self._backoff(delay)
        while self.pending is not None:
            try:
                async with self.lock:
                    counts = await asyncio.wait_for(self.push(stale=bool(self.failing)), TIMEOUT * 3)
                log_synced(counts)
                if not counts[2]:
                    delay = 1.0
                    continue
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self.failed(e)
            await self._backoff(delay)  # (Redis refused or could not be reached: push kept the users to push)
            delay = min(delay * 2, RETRY_MAX)

    async def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if the users change meanwhile (a change is never held back)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    def failed(self, e: BaseException) -> None:
        msg = _redact(f"{type(e).__name__}: {e}")
        if msg != self.failing:  # once per distinct error, not per retry
            log.error("mirror_sync_failed", upstream=self.config.upstream.where, error=msg,
                      detail="clients cannot log in upstream as their mirror users until this works; the upstream "
                      "user needs +acl|setuser +acl|deluser +acl|users (docs/security.md)")  # fmt: skip
        self.failing = msg

    async def apply(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> None:
        """Push the mirrors of the ``changed`` users (None: of every user whose rules Redis lacks) and
        delete those of ``deleted``; return once Redis has them (ACL SETUSER/DELUSER/LOAD answer then).
        Raises MirrorError if Redis refuses or cannot be reached within TIMEOUT."""
        async with self.lock:
            if changed is None:
                commands, names, gone = await asyncio.to_thread(self.mirrors.plan, list(users.items()), self.synced)
            else:  # (these are pushed whatever Redis has: an empty record)
                commands, names, _ = self.mirrors.plan([(n, users[n]) for n in sorted(changed) if n in users], {})
                gone = [m for m in map(self.mirrors.mirror_name, deleted) if m not in self.mirrors.protected]
            if gone:
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in gone)])
                names.append(("", ""))
            errors: list[str] = []
            try:
                for i in range(0, len(commands), BATCH):
                    replies = await asyncio.wait_for(self.request(commands[i:i + BATCH]), TIMEOUT)
                    errors += self._took(names[i:i + BATCH], commands[i:i + BATCH], replies)
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self.failed(e)
                for mirror, _ in names:  # (which of them Redis took is unknown)
                    self.synced.pop(mirror, None)
                self.retry()
                raise MirrorError(_redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)) from e
            if errors:
                self.retry()
                raise MirrorError(errors[0])

    def _took(self, names: Sequence[tuple[str, str]], commands: Sequence[list[bytes]], replies: Sequence[Any]
              ) -> list[str]:  # fmt: skip
        """Record Redis's replies to a batch of ``commands`` (``names``: (mirror, rules), ("", "") for an
        ACL DELUSER): a mirror Redis took is synced; one it refused is marked not synced (a refused
        DELUSER keeps its mirrors listed, to delete again) and logged. The errors, redacted."""
        errors = []
        now = time.monotonic()
        for (mirror, rules), command, reply in zip(names, commands, replies, strict=True):
            deleted = [] if mirror else [d.decode("utf-8", "surrogateescape") for d in command[2:]]
            if isinstance(reply, hiredis.ReplyError):
                error = _redact(str(reply))
                errors.append(error)
                log.error("mirror_user_failed", user=printable_name(mirror) if mirror else "",
                          deleted=[printable_name(d) for d in deleted[:LOG_NAMES]] if not mirror else [],
                          error=error, detail="Redis refused this mirror user change; retrying in the background")  # fmt: skip
                if mirror:
                    self.synced.pop(mirror, None)
                if self.metrics is not None:
                    self.metrics.mirror_push_errors.inc()
            elif mirror:
                self.synced[mirror] = rules
                self.pushed_at[mirror] = now
            else:
                for d in deleted:
                    self.synced.pop(d, None)
                    self.pushed_at.pop(d, None)
        if errors:
            self.failing = errors[0]  # (the retries sweep stale mirrors too; recovery is logged)
        return errors

    async def push(self, stale: bool = False, listed: list[bytes] | None = None) -> tuple[int, int, int]:
        """Push ``pending`` (the newest users, if any) where Redis lacks them; (set, deleted, errors)."""
        users = self.pending
        if users is None:
            return 0, 0, 0
        self.pending = None
        try:
            commands, names, deleted = await asyncio.to_thread(self.mirrors.plan, users, self.synced)
            if stale:  # (at start, or after a failure: Redis may hold mirrors of users that are gone)
                if listed is None:
                    listed = await self.acl_users()
                keep = {self.mirrors.mirror_name(n) for n, _ in users} | self.mirrors.protected | set(deleted)
                gone = [u for u in (x.decode("utf-8", "surrogateescape") for x in listed)
                        if u.startswith(self.mirrors.prefix) and u not in keep]  # fmt: skip
                deleted += gone
            for i in range(0, len(deleted), BATCH):
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in deleted[i:i + BATCH])])
                names.append(("", ""))
            errors = 0
            for i in range(0, len(commands), BATCH):
                replies = await self.request(commands[i:i + BATCH])
                errors += len(self._took(names[i:i + BATCH], commands[i:i + BATCH], replies))
        except BaseException:
            if self.pending is None:
                self.pending = users  # try this change again (unless a newer one is waiting)
            raise
        if errors:
            self.retry()
        elif self.failing:
            log.info("mirror_sync_recovered", upstream=self.config.upstream.where)
            self.failing = ""
        return sum(1 for n in names if n[0]), len(deleted), errors

    async def acl_users(self) -> list[bytes]:
        (listed,) = await self.request([[b"ACL", b"USERS"]])
        if isinstance(listed, hiredis.ReplyError):
            raise ConnectionError(f"ACL USERS: {listed}")
        return list(listed)

    async def request(self, commands: list[list[bytes]]) -> list[Any]:
        return await upstream_replies(self.config, commands, TIMEOUT)


def log_synced(counts: tuple[int, int, int]) -> None:
    if any(counts):
        log.info("mirror_users_synced", set=counts[0], deleted=counts[1], errors=counts[2])


def _redact(text: str) -> str:
    """No password hash in a log line (Redis's ACL SETUSER errors quote the rule they reject)."""
    return _HEX64.sub("<redacted>", text)

