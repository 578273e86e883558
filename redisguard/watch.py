"""Reload on file change ([server] reload_interval): the files a reload reads are checked every
interval (size, mtime, inode: a rename over the file, as editors and Kubernetes secret updates do,
counts), and a change triggers the same reload as SIGHUP. The stat calls run in a worker thread, so a
slow filesystem never stalls the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .audit import get_logger
from .config import Config

log = get_logger("redisguard")


def watched_files(config: Config) -> list[Path]:
    """What a reload reads: the config, the users file, every TLS listener's certificate files."""
    files = [config.source, config.acl.users_file]
    for lst in config.listeners:
        if lst.tls is not None:
            files += [lst.tls.cert_file, lst.tls.key_file, lst.tls.ca_file, lst.tls.crl_file]
    return [Path(f) for f in files if f is not None]


def signature(files: list[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out.append(None)  # gone for now (being replaced): a change when it is back
            continue
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class FileWatch:
    def __init__(self, config: Config, interval: float, on_change: Callable[[], None]) -> None:
        self.files = watched_files(config)
        self.interval = interval
        self.on_change = on_change
        self.task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last = await asyncio.to_thread(signature, self.files)
        while True:
            await asyncio.sleep(self.interval)
            now = await asyncio.to_thread(signature, self.files)
            if now != last and None not in now:  # (a file being replaced: wait until it is whole again)
                changed = [str(f) for f, a, b in zip(self.files, last, now, strict=True) if a != b]
                log.info("files_changed", files=changed, detail="reloading, as on SIGHUP")
                last = now
                self.on_change()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
