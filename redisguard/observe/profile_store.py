"""The traffic profile's file: loaded at start (so restarts add up), written every ``interval`` seconds
when something changed, and at shutdown. The profile is copied on the loop a slice at a time (so a big
one never stalls clients), serialized and written in a worker thread, atomically (a temporary file
renamed over the old one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from redisguard.observe.audit import get_logger
from redisguard.observe.profile import FORMAT, TrafficProfile, serialize, user_json

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


class ProfileStore:
    def __init__(self, profile: TrafficProfile, path: Path, interval: float) -> None:
        self.profile = profile
        self.path = path
        self.interval = interval
        self.task: asyncio.Future[None] | None = None

    def load(self) -> None:
        """Add what an earlier run recorded; a missing file is a fresh start, a bad one is kept aside."""
        try:
            self.profile.merge(TrafficProfile.from_json(json.loads(self.path.read_text())))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("profile_unreadable", file=str(self.path), error=str(e), detail="starting a new profile")

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save()

    async def save(self) -> None:
        if not self.profile.changed:
            return
        self.profile.changed = False
        data = await snapshot(self.profile)
        text = serialize(data)  # of the copy: safe off the loop too
        try:
            await asyncio.to_thread(_write, self.path, text)
        except OSError as e:
            self.profile.changed = True
            log.warning("profile_write_failed", file=str(self.path), error=str(e))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.save()
