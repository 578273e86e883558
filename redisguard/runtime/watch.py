"""Reload on file change ([server] reload_interval): the files a reload reads are stat'ed every
interval (size, mtime, inode: a rename over the file, as editors and Kubernetes secret updates do,
counts). A change starts the same reload as SIGHUP, but only of **stable** files: every watched file is
read, read again after [server] reload_settle seconds, and both reads must give the same version
(size, mtime, inode, SHA-256; see file_versions) — a writer still at work, a file gone or unreadable,
a symlink swapped meanwhile: the old ones stay, it is logged, and tried again next interval. The reload
then parses exactly those bytes. The reads run in a worker thread: a slow filesystem never stalls the
event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from redisguard.config.model import Config
from redisguard.files.versions import FileChanged, FileRead, FileUnreadable, read_files, stat_version, unstable
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics

log = get_logger("redisguard")

Signature = tuple[tuple[int, int, int, int] | None, ...]


def watched_files(config: Config) -> list[Path]:
    """What a reload reads: the config, the users file, every TLS listener's certificate files."""
    files = [config.source, config.acl.users_file]
    for lst in config.listeners:
        if lst.tls is not None:
            files += [lst.tls.cert_file, lst.tls.key_file, lst.tls.ca_file, lst.tls.crl_file]
    return list(dict.fromkeys(Path(f) for f in files if f is not None))


def signature(files: list[Path]) -> Signature:
    return tuple(stat_version(f) for f in files)


def unfinished(users_file: Path, reads: dict[Path, FileRead]) -> list[str]:
    """A users file whose last line has no newline yet is being written (every prefix of a rule line is
    itself valid rules: ``+@all`` before `` -@dangerous``): in doubt, however long it has been still."""
    data = reads[users_file].data if users_file in reads else b""
    if data and not data.endswith(b"\n"):
        return [f"{users_file}: the last line does not end with a newline (still being written?)"]
    return []


class FileWatch:
    def __init__(self, config: Config, on_stable: Callable[[dict[Path, bytes]], None], metrics: Metrics) -> None:
        self.files = watched_files(config)
        self.users_file = Path(config.acl.users_file)
        self.interval = config.server.reload_interval
        self.settle = config.server.reload_settle
        self.on_stable = on_stable  # the reload, given the bytes to parse
        self.metrics = metrics
        self.task: asyncio.Future[None] | None = None
        # What the files were before the proxy read them (made at start, on the loop: a few stat calls)
        self.baseline = signature(self.files)
        self.warned = 0.0  # when files_unsettled was last a warning (0: not since the last stable read)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last = self.baseline
        while True:
            await asyncio.sleep(self.interval)
            now = await asyncio.to_thread(signature, self.files)
            if now == last:
                continue
            reads = await self._settled()
            if reads is None:
                continue  # (last unchanged: tried again next interval)
            loaded = tuple(reads[f].version.stat for f in self.files)
            changed = [str(f) for f, a, b in zip(self.files, last, loaded, strict=True) if a != b]
            log.info("files_changed", files=changed, detail=f"stable for {self.settle:g} s; reloading, as on SIGHUP")
            last = loaded
            self.on_stable({p: r.data for p, r in reads.items()})

    async def _settled(self) -> dict[Path, FileRead] | None:
        """Every watched file, if it reads the same now and after the settle interval; else None (logged)."""
        try:
            first = await asyncio.to_thread(read_files, self.files)
            await asyncio.sleep(self.settle)
            second = await asyncio.to_thread(read_files, self.files)
            problems = unstable(first, second) or unfinished(self.users_file, second)
        except (FileChanged, FileUnreadable) as e:
            problems = [str(e)]
        if not problems:
            self.warned = 0.0
            return second
        self.metrics.config_reloads.labels("unsettled").inc()
        # (a writer that never stops, a users file never finished: a warning a minute, not one per interval)
        now = time.monotonic()
        warn = not self.warned or now - self.warned >= 60
        if warn:
            self.warned = now
        detail = (f"kept the previous users, certificates and config; trying again in {self.interval:g} s "
                  "(replace files with rename: see README)")  # fmt: skip
        (log.warning if warn else log.debug)("files_unsettled", problems=problems, detail=detail)
        return None

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
