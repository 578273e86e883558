"""The traffic profile's file: the sum of what every process (each of ``[server] workers``, and every
earlier run) recorded. A process never loads it: its own profile holds only what it recorded since its
last save, and every ``interval`` seconds when something changed, and at shutdown, it *adds* that to the
file — under an exclusive ``flock`` on ``<file>.lock``, it reads the file, merges (counts summed, within
the profile's bounds), and writes atomically (a temporary file renamed over the old one). So whichever
worker writes, and when, no count is lost: concurrent writers take turns; a writer that dies holding the
lock releases it with its last breath (the kernel drops a dead process's flocks) and leaves the file whole;
a write that fails gives its counts back for the next one. A worker killed outright loses only what it
recorded since its last save (at most ``interval`` seconds), as one process always did. The taking is
O(1) on the loop; reading, merging and writing happen in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from redisguard.observe.audit import get_logger
from redisguard.observe.profile import FORMAT, TrafficProfile, user_json

log = get_logger("redisguard")


# Profile entries copied per event-loop turn: a profile of 10,000 users is copied in slices.
SLICE_ENTRIES = 4096


async def snapshot(profile: TrafficProfile) -> dict[str, Any]:
    """A JSON-able copy of ``profile``, made on the loop a slice at a time (records go on meanwhile;
    the copy of each user is consistent)."""
    users: dict[str, Any] = {}
    budget = SLICE_ENTRIES
    for name in sorted(profile.users):
        up = profile.users.get(name)
        if up is None:
            continue
        users[name] = user_json(up)
        budget -= len(up.keys) + up.n_uses + len(up.commands) + len(up.channels)
        if budget <= 0:
            budget = SLICE_ENTRIES
            await asyncio.sleep(0)
    return {"format": FORMAT, "users": users}


def _write(path: Path, text: str) -> None:
    """Atomically, mode 0600 from the start (key names can be sensitive), never through a symlink."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover (or a planted symlink): O_EXCL below refuses anything in the way
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path, keep_aside: bool) -> TrafficProfile:
    """The file's profile; a missing file is an empty one, a bad one is moved to ``<file>.bad`` (when
    ``keep_aside``) and counts as empty (the next write starts a new profile). OSError is the caller's."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return TrafficProfile()
    try:
        return TrafficProfile.from_json(json.loads(text))
    except (ValueError, TypeError, AttributeError) as e:
        if keep_aside:
            os.replace(path, path.with_name(path.name + ".bad"))
            log.warning("profile_unreadable", file=str(path), error=str(e), detail=f"kept as {path.name}.bad; "
                        "starting a new profile")  # fmt: skip
        return TrafficProfile()


def add_to_file(path: Path, taken: TrafficProfile) -> None:
    """Under the file's lock: read it, forget the users ``taken`` forgot, add ``taken``, write it."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (released by close, or by the kernel if this process dies)
        total = _read(path, keep_aside=True)
        total.forget(taken.forgotten)
        total.merge(taken)
        _write(path, total.dumps())
    finally:
        os.close(fd)


def observed(path: Path, live: dict[str, Any], in_flight: TrafficProfile | None, forgotten: Iterable[str]
             ) -> TrafficProfile:  # fmt: skip
    """Everything recorded (for ``[acl] reload_guard``): the file, a save under way and ``live`` (a
    snapshot of this process's profile), without the users forgotten. Blocking: for a thread."""
    gone = set(forgotten)
    try:
        total = _read(path, keep_aside=False)
    except OSError:
        total = TrafficProfile()
    total.forget(gone | (in_flight.forgotten if in_flight is not None else set()))
    if in_flight is not None:
        total.merge(in_flight, skip=gone)
    total.merge(TrafficProfile.from_json(live))
    return total


async def observe(profile: TrafficProfile, path: Path) -> Callable[[], TrafficProfile]:
    """For ``[acl] reload_guard``: what this process has not saved yet, copied now on the loop (a slice at
    a time); the function returned (blocking: for a thread) adds the file to it."""
    live = await snapshot(profile)
    return functools.partial(observed, path, live, profile.in_flight, set(profile.forgotten))


class ProfileStore:
    def __init__(self, profile: TrafficProfile, path: Path, interval: float) -> None:
        self.profile = profile
        self.path = path
        self.interval = interval
        self.task: asyncio.Future[None] | None = None
        self.saving: asyncio.Future[None] | None = None  # the save under way (never cancelled half-way)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save()

    async def save(self) -> None:
        """Add what was recorded since the last save to the file (or wait for the save under way); a
        cancelled caller does not cancel the write."""
        if self.saving is None or self.saving.done():
            self.saving = asyncio.ensure_future(self._save())
        await asyncio.shield(self.saving)

    async def _save(self) -> None:
        if not self.profile.changed:
            return
        taken = self.profile.take()
        self.profile.in_flight = taken
        try:
            await asyncio.to_thread(add_to_file, self.path, taken)
        except OSError as e:
            self.profile.give_back(taken)
            log.warning("profile_write_failed", file=str(self.path), error=str(e))
        finally:
            self.profile.in_flight = None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.saving is not None:
            await self.saving  # the one the timer started, then what came after it
        await self.save()
