"""Redis is the truth: checking that it still has the mirror users as pushed (mirror mode).

What was pushed is not trusted to still be there (a restart, an ACL LOAD or a failover to a replica
drop the mirrors). :meth:`MirrorVerifier.verify` compares Redis with what was pushed and pushes again
what is missing or refuses its password: ``ACL USERS`` (names; ~2 ms for 10,000 users) on every health
check, and with ``full`` also an ``AUTH`` as each mirror (exists, on, our password) when a client's
upstream AUTH is refused, when Redis is back after the health check saw it down, and on every reload
(SIGHUP). Not ``ACL LIST``: it costs Redis ~1.3 s per 10,000 users. Checks are coalesced (every caller
until a check starts shares it; they start at most one per ``VERIFY_GAP``) and go through the pushes'
lock: Redis hears one conversation at a time.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

import hiredis

from redisguard.acl import User
from redisguard.acl.user import printable_name
from redisguard.observe.audit import get_logger
from redisguard.upstream.client import TIMEOUT
from redisguard.upstream.mirror_sync import BATCH, LOG_NAMES, MirrorSync, log_synced

log = get_logger("redisguard")

# Verifications start at least this many seconds apart: clients refused at once share one check, and a
# stream of them causes at most one a second.
VERIFY_GAP = 1.0
# A mirror we pushed less than this many seconds ago that refuses our password was most likely pushed
# again by another instance with other users or credentials (or an ACL LOAD right after our push).
CONTEST_WINDOW = 60.0


class MirrorVerifier:
    """The checks of the mirrors in Redis, coalesced; what they find missing, ``sync`` pushes again."""

    def __init__(self, sync: MirrorSync) -> None:
        self.sync = sync
        self._next: asyncio.Future[bool] | None = None  # the check callers wait for, not started yet
        self._next_reason = ""
        self._next_full = False
        self._verifying: asyncio.Task[None] | None = None
        self._verify_began = -VERIFY_GAP

    def verify(self, reason: str, full: bool = True) -> asyncio.Future[bool]:
        """Check that Redis still has every mirror as pushed and push again what it lacks (``reason``:
        one of metrics.MIRROR_RESYNC_REASONS). ``full``: also log in as each mirror, else names only.

        Coalesced: the answer comes from a check that starts after this call (one that already read
        Redis may have missed what the caller saw), shared by every caller until it starts; checks
        start at most one per VERIFY_GAP. The future (shield it before a timeout) says whether Redis
        could be asked."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next_reason, self._next_full = reason, full
            self._verifying = asyncio.ensure_future(self._verify())
        elif full and not self._next_full:  # a names-only check not started yet becomes a full one
            self._next_reason, self._next_full = reason, True
        return self._next

    async def _verify(self) -> None:
        loop = asyncio.get_running_loop()
        fut = self._next
        assert fut is not None
        try:
            await asyncio.sleep(self._verify_began + VERIFY_GAP - loop.time())
            async with self.sync.lock:  # (behind a push or check under way)
                self._next = None  # from now on a caller needs the check after this one
                self._verify_began = loop.time()
                await asyncio.wait_for(self._resync(self._next_reason, self._next_full), TIMEOUT * 3)
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self.sync.failed(e)
            fut.set_result(False)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:  # never leave the callers waiting on a bug
            log.error("internal_error", message="verifying the mirror users failed", error=repr(e))
            fut.set_result(False)
        else:
            fut.set_result(True)
        finally:
            if self._next is fut:
                self._next = None

    async def _resync(self, reason: str, full: bool) -> None:
        began, sync = time.monotonic(), self.sync
        users = sync.pending if sync.pending is not None else sync.current  # the newest users
        listed = await sync.acl_users()
        lost, stale, probes = await asyncio.to_thread(self._compare, users, listed, full)
        refused: list[str] = []  # there, but not on or not with our password, so not with our rules
        for i in range(0, len(probes), BATCH):  # full: exists, on, and takes our password?
            batch = probes[i:i + BATCH]
            replies = await sync.request([cmd for _, cmd in batch])
            refused += [m for (m, _), r in zip(batch, replies, strict=True) if isinstance(r, hiredis.ReplyError)]
        if not lost and not refused and not stale:
            if sync.pending is not None:  # a retry waits out its delay: whoever asked for this check needs it now
                log_synced(await sync.push(stale=bool(sync.failing)))
            return
        self._contested(refused)
        lost += refused
        for m in lost:
            sync.synced.pop(m, None)
        if sync.pending is None:
            sync.pending = users
        pushed, deleted, errors = await sync.push(stale=full, listed=listed)
        if sync.metrics is not None:
            sync.metrics.mirror_resyncs.labels(reason).inc()
            sync.metrics.mirrors_recreated.inc(len(lost))
        log.warning("mirror_resync", reason=reason, upstream=sync.config.upstream.where, recreated=len(lost),
                    deleted=deleted, set=pushed, errors=errors, seconds=round(time.monotonic() - began, 3),
                    mirrors=[printable_name(m) for m in (lost or stale)[:LOG_NAMES]],
                    detail="Redis no longer had these mirror users as pushed (a restart, ACL LOAD or failover?): "
                    "pushed them again")  # fmt: skip

    def _contested(self, refused: Sequence[str]) -> None:
        """Mirrors we pushed a moment ago that Redis has with another password (other rules, or another
        key): most likely another redisguard instance in front of this Redis with other users or other
        service credentials, each pushing its own over the other's."""
        now, sync = time.monotonic(), self.sync
        contested = [m for m in refused if now - sync.pushed_at.get(m, -CONTEST_WINDOW) < CONTEST_WINDOW]
        if not contested:
            return
        if sync.metrics is not None:
            sync.metrics.mirrors_contested.inc(len(contested))
        log.warning("mirror_contested", upstream=sync.config.upstream.where, contested=len(contested),
                    mirrors=[printable_name(m) for m in contested[:LOG_NAMES]], window=CONTEST_WINDOW,
                    detail="Redis has these mirror users with other rules or another password less than a minute "
                    "after we pushed them: is another redisguard instance in front of this Redis with another users "
                    "file or other service credentials? Several instances must share both (docs/security.md); "
                    "pushing ours again")  # fmt: skip

    def _compare(self, users: list[tuple[str, User]], listed: list[bytes], full: bool
                 ) -> tuple[list[str], list[str], list[tuple[str, list[bytes]]]]:  # fmt: skip
        """(in a worker thread) Against Redis's ``ACL USERS``: the pushed mirrors it lacks, the
        ``<prefix>*`` users it has that are no mirror of ours and an AUTH to try as each pushed mirror it
        has (these two when ``full``)."""
        present = {x.decode("utf-8", "surrogateescape") for x in listed}
        synced, mirrors = self.sync.synced, self.sync.mirrors
        wanted = {m: u for n, u in users if (m := mirrors.mirror_name(n)) not in mirrors.protected}
        lost = [m for m in wanted if m in synced and m not in present]
        stale = [u for u in present if u.startswith(mirrors.prefix) and u not in wanted and u not in mirrors.protected
                 ] if full else []  # (workers mid-reload may differ for a moment: left to the full checks)
        probes = [(m, [b"AUTH", m.encode("utf-8", "surrogateescape"), mirrors.password(u.name, mirrors.rules_text(u)).encode()])
                  for m, u in wanted.items() if m in synced and m in present] if full else []  # fmt: skip
        return lost, stale, probes
