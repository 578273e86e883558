"""The traffic profile's file: loaded at start (so restarts add up), written every ``interval`` seconds
when something changed, and at shutdown. Writes are atomic (a temporary file renamed over the old one)
and happen in a worker thread; the JSON text itself is made on the loop from a bounded profile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from .audit import get_logger
from .profile import TrafficProfile

log = get_logger("redisguard")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)  # key names can be sensitive
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
        text = self.profile.dumps()
        self.profile.changed = False
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
