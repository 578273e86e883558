"""Half-written files are never loaded (issue 21 §3), the reads: a file is read with its version
(size, mtime, inode, content), read_now refuses a file that differs between its two reads, the watcher
takes only files that read the same after [server] reload_settle, and what is not a regular file, or
too big, is refused at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import structlog.testing

from redisguard.acl import UsersFileError, load_users
from redisguard.commands.table import CommandTable
from redisguard.config.model import ConfigError
from redisguard.config.parse import parse_config
from redisguard.files import versions as file_versions
from redisguard.files.versions import FileChanged, FileRead, FileVersion, difference, read_file, read_now
from redisguard.observe.metrics import Metrics, parse_samples
from redisguard.runtime import watch
from redisguard.runtime.watch import FileWatch, unfinished
from tests.system.conftest import OLD, swap


def test_difference_names_what_changed() -> None:
    v = FileVersion(10, 5, 7, 1, b"d")
    assert difference(v, v) is None
    assert difference(v, FileVersion(10, 5, 8, 1, b"d")) == "replaced (another inode: renamed over, or a symlink swapped)"
    assert difference(v, FileVersion(10, 5, 7, 2, b"d")) == "replaced (another inode: renamed over, or a symlink swapped)"
    assert difference(v, FileVersion(11, 5, 7, 1, b"d")) == "size 10 -> 11"
    assert difference(v, FileVersion(10, 6, 7, 1, b"d")) == "modified (mtime)"
    # same size and mtime (a coarse clock, a rewrite within one tick): the content still tells
    assert difference(v, FileVersion(10, 5, 7, 1, b"e")) == "content changed"


def test_read_file_versions_what_it_read(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc\n")
    r = read_file(p)
    st = os.stat(p)
    assert r.data == b"abc\n"
    assert r.version == FileVersion(4, st.st_mtime_ns, st.st_ino, st.st_dev, hashlib.sha256(b"abc\n").digest())
    with pytest.raises(file_versions.FileUnreadable, match=f"cannot read {tmp_path}/nope: No such file"):
        read_file(tmp_path / "nope")


def _between_reads(monkeypatch: pytest.MonkeyPatch, change: Callable[[], object]) -> None:
    """``change()`` runs right after read_now's first read, before its re-read."""
    real = file_versions.read_files
    calls = []

    def read_files(paths: Iterable[Path]) -> dict[Path, FileRead]:
        out = real(paths)
        calls.append(1)
        if len(calls) == 1:
            change()
        return out

    monkeypatch.setattr(file_versions, "read_files", read_files)


def test_read_now_refuses_a_file_that_changes_between_its_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                table: CommandTable) -> None:  # fmt: skip
    p = tmp_path / "users.acl"
    p.write_text(OLD)
    assert read_now([p]) == {p: OLD.encode()}  # stable: its bytes
    _between_reads(monkeypatch, lambda: p.write_text(OLD.replace(" -@dangerous", "")))  # in place, same inode
    with pytest.raises(FileChanged, match="users.acl: size"):
        read_now([p])
    # the users file's own loader (start-up, ACL LOAD) reads the same way: refused, not parsed
    _between_reads(monkeypatch, lambda: p.write_text(OLD + "user extra on nopass +@all\n"))
    with pytest.raises(UsersFileError, match="users file changed between two reads"):
        load_users(p, table)


def test_read_now_refuses_a_symlink_swapped_between_its_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("..v1", "..v2"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "users.acl").write_text(OLD)  # the same bytes: only the inode tells
    (tmp_path / "..data").symlink_to("..v1")
    link = tmp_path / "users.acl"
    link.symlink_to("..data/users.acl")
    _between_reads(monkeypatch, lambda: swap(tmp_path, "..v2"))
    with pytest.raises(FileChanged, match="replaced"):
        read_now([link])


def test_a_users_file_whose_last_line_is_unfinished_is_in_doubt(tmp_path: Path) -> None:
    p = tmp_path / "users.acl"
    reads = {p: file_versions.FileRead(p, FileVersion(0, 0, 0, 0), b"user default off\nuser app on >pw ~* +@all")}
    assert unfinished(p, reads) == [f"{p}: the last line does not end with a newline (still being written?)"]
    for whole in (b"", b"user default off\n"):
        assert unfinished(p, {p: file_versions.FileRead(p, FileVersion(0, 0, 0, 0), whole)}) == []


@pytest.mark.parametrize(("change", "problem"), [
    (lambda p: p.write_text(OLD + "user extra on nopass +@all\n"), "size"),  # in place, during the settle
    (lambda p: p.unlink(), "cannot read"),  # gone during the settle
    (lambda p: (p.with_suffix(".new").write_text(OLD), p.with_suffix(".new").rename(p)), "replaced"),  # renamed over
    (lambda p: None, None),  # stable: its bytes
])  # fmt: skip
def test_the_watcher_takes_only_files_that_read_the_same_after_the_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], object], problem: str | None
) -> None:
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    cfg = parse_config({"listener": [{"type": "tcp", "address": "127.0.0.1:1"}], "acl": {"users_file": str(users)},
                        "server": {"reload_interval": 0.5, "reload_settle": 0.1}}, tmp_path)  # fmt: skip
    metrics = Metrics()
    w = FileWatch(cfg, lambda files: None, metrics)
    real = file_versions.read_files  # (what watch.py calls)
    reads: list[dict[Path, FileRead]] = []

    def read_files(paths: Iterable[Path]) -> dict[Path, FileRead]:
        reads.append(out := real(paths))
        if len(reads) == 1:
            change(users)  # after the first read, before the one after the settle
        return out

    monkeypatch.setattr(watch, "read_files", read_files)
    with structlog.testing.capture_logs() as logs:
        got = asyncio.run(w._settled())
    unsettled = parse_samples(metrics.render().decode()).get('redisguard_config_reload_total{result="unsettled"}', 0)
    if problem is None:
        assert got is not None and got[users].data == OLD.encode() and unsettled == 0
    else:
        assert got is None and unsettled == 1
        (logged,) = [e for e in logs if e["event"] == "files_unsettled"]
        assert logged["log_level"] == "warning" and problem in " ".join(logged["problems"])


def test_reload_settle_option() -> None:
    base = {"listener": [{"type": "tcp", "address": "127.0.0.1:1"}], "acl": {"users_file": "u"}}
    assert parse_config(base, Path("/")).server.reload_settle == 1.0
    assert parse_config({**base, "server": {"reload_settle": 3}}, Path("/")).server.reload_settle == 3.0
    for bad in (0, 0.05, 301):
        with pytest.raises(ConfigError, match=r"server.reload_settle: seconds, 0.1 to 300"):
            parse_config({**base, "server": {"reload_settle": bad}}, Path("/"))


def test_a_reload_refuses_what_is_not_a_regular_file_or_too_big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO as the users file would block the reload in open() forever (ACL LOAD never answered, no
    later reload loaded), /dev/zero would never end: both refused at once, as is a file over the cap."""
    import errno as _errno

    from redisguard.files import versions as file_versions

    fifo = tmp_path / "users.fifo"
    os.mkfifo(fifo)
    for bad in (fifo, Path("/dev/zero")):
        with pytest.raises(file_versions.FileUnreadable, match="not a regular file") as e:
            file_versions.read_file(bad)
        assert e.value.error.errno == _errno.EINVAL
    with pytest.raises(file_versions.FileUnreadable, match="directory"):
        file_versions.read_file(tmp_path)
    big = tmp_path / "big.acl"
    big.write_bytes(b"user default off\n" * 100)
    monkeypatch.setattr(file_versions, "MAX_FILE_BYTES", 1000)
    with pytest.raises(file_versions.FileUnreadable, match="larger than 1000 bytes"):
        file_versions.read_file(big)
