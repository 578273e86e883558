"""Which version of a file redisguard loads: each file is read once into memory and what is parsed is
those bytes, never the path again, so what was checked is what is loaded.

A file's version is its size, mtime (ns), inode, device and the SHA-256 of the bytes read. A read
during which size or mtime moved, or two reads that give different versions (a writer still at work,
a rename or a symlink swapped between them: a new inode), mean the file is *in doubt*: the caller
keeps what it has. :func:`read_now` is SIGHUP's "what is there now" (read, re-read at once, equal);
the file watcher (watch.py) also waits a settle interval between the two reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


class FileChanged(ValueError):
    """A file changed while it was read, or between two reads: it is in doubt."""


class FileUnreadable(ValueError):
    """A file could not be read (gone, permission, ...); the message names it, never its contents."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(f"cannot read {path}: {err.strerror or err}")
        self.path = path
        self.error = err


@dataclass(frozen=True)
class FileVersion:
    size: int
    mtime_ns: int
    inode: int
    device: int
    digest: bytes = b""  # SHA-256 of the bytes read (b"": only stat'ed)

    @property
    def stat(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.inode, self.device


@dataclass(frozen=True)
class FileRead:
    path: Path
    version: FileVersion
    data: bytes = field(repr=False)


def _stat_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def stat_version(path: Path) -> tuple[int, int, int, int] | None:
    """(size, mtime_ns, inode, device) of what ``path`` names now (symlinks followed), None if unreadable:
    the watcher's cheap test for "something changed"."""
    try:
        return _stat_of(os.stat(path))
    except OSError:
        return None


# The largest file a reload reads (a users file of 10,000 users is ~4 MB): anything bigger, and anything
# that is not a regular file (a FIFO would block the read forever, /dev/zero never end), is refused.
MAX_FILE_BYTES = 1 << 30


def read_file(path: Path) -> FileRead:
    """The whole file, read once, and its version; FileChanged if it changed during the read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            before = os.fstat(f.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a directory)")
            if before.st_size > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes")
            data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes")
            after = os.fstat(f.fileno())
    except OSError as e:
        raise FileUnreadable(path, e) from None
    if _stat_of(before) != _stat_of(after) or (stat.S_ISREG(after.st_mode) and len(data) != after.st_size):
        raise FileChanged(f"{path} changed while it was read (it is being written)")
    return FileRead(path, FileVersion(*_stat_of(after), hashlib.sha256(data).digest()), data)


def read_files(paths: Iterable[Path]) -> dict[Path, FileRead]:
    return {p: read_file(p) for p in dict.fromkeys(paths)}


def difference(a: FileVersion, b: FileVersion) -> str | None:
    """What differs between two versions of a file, or None: the pure stability check."""
    if (a.inode, a.device) != (b.inode, b.device):
        return "replaced (another inode: renamed over, or a symlink swapped)"
    if a.size != b.size:
        return f"size {a.size} -> {b.size}"
    if a.mtime_ns != b.mtime_ns:
        return "modified (mtime)"
    if a.digest != b.digest:
        return "content changed"
    return None


def unstable(first: Mapping[Path, FileRead], second: Mapping[Path, FileRead]) -> list[str]:
    """One line per file whose two reads differ (``[]``: every file is stable)."""
    out = []
    for path, b in second.items():
        a = first.get(path)
        why = "not read the first time" if a is None else difference(a.version, b.version)
        if why:
            out.append(f"{path}: {why}")
    return out


def read_now(paths: Iterable[Path]) -> dict[Path, bytes]:
    """SIGHUP's "what is there now": every file read, then re-read at once; the bytes if both reads
    agree, else FileChanged (keep the old ones). FileUnreadable if one cannot be read."""
    paths = list(paths)
    first = read_files(paths)
    second = read_files(paths)
    problems = unstable(first, second)
    if problems:
        raise FileChanged(f"changed between two reads (being written? replace files with rename): {'; '.join(problems)}")
    return {p: r.data for p, r in second.items()}
