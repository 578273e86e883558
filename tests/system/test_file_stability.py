"""Half-written files are never loaded (issue 21 §3): the file watcher reloads only files that read
the same before and after [server] reload_settle, a SIGHUP refuses a file that differs between its
two reads, and a reload parses exactly the bytes it checked (file_versions, watch).

The live tests run a real redis-server behind a real proxy while a writer replaces files the wrong way
(in place, in steps; a Kubernetes-style symlink swapped twice; a certificate before its key), and probe
all the while, as fast as they can, that no intermediate version is ever in force."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from redisguard.acl import UsersFileError, load_users
from redisguard.cli.certs import init_dev_certs
from redisguard.commands.table import CommandTable
from redisguard.config.model import ConfigError, ListenerConfig, TLSFiles
from redisguard.config.parse import parse_config
from redisguard.files import versions as file_versions
from redisguard.files.versions import FileChanged, FileRead, FileVersion, difference, read_file, read_now
from redisguard.observe.metrics import Metrics, parse_samples
from redisguard.protocol.resp import encode_command
from redisguard.runtime import watch
from redisguard.runtime.watch import FileWatch, unfinished
from redisguard.transport import tls
from tests.helpers import RedisProc, scrape, start_proxy, start_redis

INTERVAL, SETTLE = 0.5, 2.0  # a writer's pause below is 0.8-1 s: inside the settle, longer than an interval
WATCH = f"[server]\nreload_interval = {INTERVAL}\nreload_settle = {SETTLE}\n"
APP = "user app on >app-pw ~* &* +@all -@dangerous"
KEEP = "user keep on >keep-pw ~* &* +@all -@dangerous"
OLD = f"user default off\n{APP}\n{KEEP}\n"


# -- the pure parts -----------------------------------------------------------------------------------
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


@pytest.mark.parametrize("memfd", [True, False])
def test_loadable_paths_hold_exactly_the_bytes_and_vanish(monkeypatch: pytest.MonkeyPatch, memfd: bool) -> None:
    """ssl loads only from paths: memfds (nothing on disk), or a private 0700 directory removed at once."""
    monkeypatch.setattr(tls, "_MEMFD", [memfd])
    with tls.loadable(b"cert\n", b"key\n") as paths:
        assert [Path(p).read_bytes() for p in paths] == [b"cert\n", b"key\n"]
        if not memfd:
            d = Path(paths[0]).parent
            assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(Path(paths[1]).stat().st_mode) == 0o600
    assert all(not Path(p).exists() for p in paths)


def test_server_context_is_built_from_the_bytes_given_not_the_path(tmp_path: Path) -> None:
    """What the reload checked is what is loaded: the files on disk no longer matter."""
    init_dev_certs(tmp_path / "a")
    init_dev_certs(tmp_path / "b")
    live = TLSFiles(tmp_path / "live.pem", tmp_path / "live.key")
    lst = ListenerConfig("tls", "tls", "127.0.0.1", 0, tls=live)
    files = {live.cert_file: (tmp_path / "a/server.pem").read_bytes(), live.key_file: (tmp_path / "a/server.key").read_bytes()}
    (tmp_path / "live.pem").write_bytes((tmp_path / "b/server.pem").read_bytes())  # another pair on disk
    (tmp_path / "live.key").write_bytes((tmp_path / "b/server.key").read_bytes())
    assert served(tls.server_context(lst, files)) == fingerprint(tmp_path / "a/server.pem")
    assert served(tls.server_context(lst)) == fingerprint(tmp_path / "b/server.pem")  # (None: what is there now)


def fingerprint(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


def served(ctx: ssl.SSLContext) -> str:
    """The certificate a server context presents, by an in-memory handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s, c = ctx.wrap_bio(bios[0], bios[1], server_side=True), client.wrap_bio(bios[2], bios[3])
    for _ in range(10):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


# -- against a real redis-server, through the proxy ------------------------------------------------------
@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisProc]:
    """Its own Redis: if a probe's FLUSHDB ever got through, it would empty only this one."""
    r = start_redis()
    yield r
    r.stop()


def swap(d: Path, version: str) -> None:
    """Kubernetes' atomic writer: ..data -> the new version directory, by rename over the old symlink."""
    os.symlink(version, d / "..data_tmp")
    os.rename(d / "..data_tmp", d / "..data")


def rewrite_in_place(path: Path, *steps: bytes, pause: float) -> None:
    """The wrong way: truncate and write the same inode, in steps with a pause between."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        for i, step in enumerate(steps):
            if i:
                time.sleep(pause)
            os.write(fd, step)
    finally:
        os.close(fd)


def _line(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\r\n"):
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return got


def auth(port: int, user: str, password: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(encode_command([b"AUTH", user.encode(), password.encode()]))
        return _line(s)


class Probe:
    """Logged in as ``user``, sends ``command`` as fast as it can until stopped; any reply other than
    ``expect`` (or a refused re-login after the proxy closed the connection) is a violation."""

    def __init__(self, port: int, user: str, password: str, command: list[bytes], expect: bytes) -> None:
        self.args = port, user, password, encode_command(command), expect
        self.violations: list[str] = []
        self.rounds = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        port, user, password, command, expect = self.args
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(encode_command([b"AUTH", user.encode(), password.encode()]))
                    if (reply := _line(s)) != b"+OK\r\n":
                        self.violations.append(f"AUTH {user}: {reply!r}")
                        continue
                    while not self.stopping.is_set():
                        s.sendall(command)
                        if not (reply := _line(s)).startswith(expect):
                            self.violations.append(f"{user}: {reply!r}")
                        self.rounds += 1
            except (ConnectionError, OSError):
                continue  # (the proxy closes a client whose user changed: log in again)

    def stop(self) -> list[str]:
        self.stopping.set()
        self.thread.join(15)
        assert self.rounds > 100, f"the probe hardly ran ({self.rounds} rounds)"
        return self.violations


@contextlib.contextmanager
def probes(port: int) -> Iterator[list[Probe]]:
    """``app`` may never FLUSHDB, ``keep`` may always log in (and PING), however the file is written."""
    ps = [Probe(port, "app", "app-pw", [b"FLUSHDB"], b"-NOPERM"), Probe(port, "keep", "keep-pw", [b"PING"], b"+PONG")]
    yield ps
    assert [v for p in ps for v in p.stop()] == []


def events(log: Path, name: str) -> list[dict[str, Any]]:
    return [e for line in log.read_text().splitlines() if line.startswith("{") and (e := json.loads(line))["event"] == name]


def wait_for_login(port: int, user: str, password: str, timeout: float = 40) -> float:
    """Seconds until ``user`` can log in (a new version is in force)."""
    start = time.monotonic()
    while auth(port, user, password) != b"+OK\r\n":
        assert time.monotonic() - start < timeout, f"{user} never became a user"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize(("cut", "pause", "workers"), [
    ("mid_line", 1.0, 1), ("line_boundary", 1.0, 1), ("mid_line", SETTLE + 1.5, 1),
    ("mid_line", 1.0, 2), ("mid_line", SETTLE + 1.5, 2),
])  # fmt: skip
def test_a_users_file_rewritten_in_place_in_two_steps_is_loaded_only_whole(
    tmp_path: Path, certs: Path, own_redis: RedisProc, cut: str, pause: float, workers: int
) -> None:
    """The issue's repro (mid_line: `user app on >pw ~* +@all`, pause, ` -@dangerous`), and a pause
    between lines (the half-written file has no `app`): neither is ever in force, the whole file is.
    A pause longer than the settle mid-line: stable, but its last line unfinished, so still in doubt.
    With workers, one watches and every worker loads the bytes it found stable (each used to re-read
    the file itself, mid-write)."""
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    final = f"user default off\n{KEEP}\n{APP}\nuser v2 on >v2-pw +ping\n".encode()
    split = final.index(b" -@dangerous", final.index(b"user app")) if cut == "mid_line" else final.index(b"user app")
    p = start_proxy(tmp_path, certs, users, own_redis.port, extra=WATCH + ("workers = 2\n" if workers == 2 else ""))
    try:
        with probes(p.plain_port):
            time.sleep(1 if workers == 1 else 3)
            rewrite_in_place(users, final[:split], final[split:], pause=pause)
            wait_for_login(p.plain_port, "v2", "v2-pw")
            time.sleep(0.5)
        log = p.log.read_text()
        assert "files_changed" in log and "config_reload_failed" not in log
        if pause > SETTLE:
            assert "the last line does not end with a newline" in log
    finally:
        p.stop()


def test_a_users_file_that_never_stops_changing_is_never_loaded(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    """A writer appending every 0.2 s for 8 s (4 settle intervals): the old rules stay all along, the
    unsettled checks are counted, and the file is loaded once the writer stops."""
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    p = start_proxy(tmp_path, certs, users, own_redis.port, extra=WATCH)
    try:
        with probes(p.plain_port):
            time.sleep(1)
            fd = os.open(users, os.O_WRONLY | os.O_TRUNC)
            try:  # every state ends at a line with `user default off` first: whole-looking, just not stable
                os.write(fd, b"user default off\n")
                end = time.monotonic() + 8
                while time.monotonic() < end:
                    os.write(fd, b"# still writing\n")
                    time.sleep(0.2)
                assert auth(p.plain_port, "keep", "keep-pw") == b"+OK\r\n"
                os.write(fd, f"{APP}\n{KEEP}\nuser v2 on >v2-pw +ping\n".encode())
            finally:
                os.close(fd)
            wait_for_login(p.plain_port, "v2", "v2-pw")
        m = scrape(p.metrics_port)
        assert m['redisguard_config_reload_total{result="unsettled"}'] >= 3
        assert m['redisguard_config_reload_total{result="success"}'] == 1
        assert "config_reload_failed" not in p.log.read_text()
    finally:
        p.stop()


def test_a_kubernetes_symlink_swapped_twice_mid_settle_ends_with_the_last_version(
    tmp_path: Path, certs: Path, own_redis: RedisProc
) -> None:
    """ConfigMap/Secret volumes swap `..data` to a new directory; v2 lives 0.8 s (less than the settle)
    and is never in force (it would let app FLUSHDB and drop keep); v3 is."""
    d = tmp_path / "users"
    d.mkdir()
    versions = {"..v1": OLD, "..v2": "user default off\nuser app on >app-pw ~* &* +@all\n",
                "..v3": f"{OLD}user v3 on >v3-pw +ping\n"}  # fmt: skip
    for name, text in versions.items():
        (d / name).mkdir()
        (d / name / "users.acl").write_text(text)
    (d / "..data").symlink_to("..v1")
    (d / "users.acl").symlink_to("..data/users.acl")
    p = start_proxy(tmp_path, certs, d / "users.acl", own_redis.port, extra=WATCH)
    try:
        with probes(p.plain_port):
            time.sleep(1)
            swap(d, "..v2")
            time.sleep(0.8)
            swap(d, "..v3")
            wait_for_login(p.plain_port, "v3", "v3-pw")
            time.sleep(0.5)
        assert "config_reload_failed" not in p.log.read_text()
    finally:
        p.stop()


class CertProbe:
    """TLS handshakes as fast as it can: the certificate each one was served (consecutive repeats
    merged), and any handshake that failed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                        ctx.wrap_socket(raw) as s:  # fmt: skip
                    der = s.getpeercert(binary_form=True)
                    assert der is not None
                    fp = hashlib.sha256(der).hexdigest()
            except (OSError, ssl.SSLError) as e:
                self.errors.append(repr(e))
                continue
            if not self.seen or self.seen[-1] != fp:
                self.seen.append(fp)


def test_a_certificate_replaced_before_its_key_is_served_only_with_it(tmp_path: Path, own_redis: RedisProc) -> None:
    """cert written in place, the key 1 s later: the old pair is served until both are stable, then the
    new one; no reload ever tries (and fails on) the new certificate with the old key."""
    own, new = tmp_path / "certs", tmp_path / "new"
    init_dev_certs(own)
    init_dev_certs(new)
    old = fingerprint(own / "server.pem")
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    p = start_proxy(tmp_path, own, users, own_redis.port, extra=WATCH)
    probe = CertProbe(p.tls_port)
    try:
        time.sleep(1)
        rewrite_in_place(own / "server.pem", (new / "server.pem").read_bytes(), pause=0)
        time.sleep(1.0)
        rewrite_in_place(own / "server.key", (new / "server.key").read_bytes(), pause=0)
        deadline = time.monotonic() + 40
        while probe.seen[-1:] != [fingerprint(new / "server.pem")]:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.05)
        time.sleep(0.5)
        probe.stopping.set()
        probe.thread.join(15)
        assert probe.errors == []
        assert probe.seen == [old, fingerprint(new / "server.pem")]
        m = scrape(p.metrics_port)
        assert m['redisguard_config_reload_total{result="success"}'] == 1
        assert m.get('redisguard_config_reload_total{result="failure"}', 0) == 0
        assert "config_reload_failed" not in p.log.read_text()
    finally:
        probe.stopping.set()
        p.stop()


def test_sighup_refuses_a_users_file_that_is_a_fifo_fed_other_versions(tmp_path: Path, certs: Path,
                                                                        own_redis: RedisProc) -> None:  # fmt: skip
    """A users file that gives other bytes each time it is opened (a FIFO fed two versions, each of which
    would open the door) is refused on SIGHUP without blocking on it — not a regular file; a file that
    changes between SIGHUP's two reads is covered by test_read_now's unit tests — the old rules stay and
    the failure is counted; a stable file then loads on the next SIGHUP."""
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    p = start_proxy(tmp_path, certs, users, own_redis.port)
    fifo = tmp_path / "users.fifo"
    os.mkfifo(fifo)
    os.rename(fifo, users)
    fed: list[int] = []
    done = threading.Event()
    versions = [f"user default off\nuser app on >app-pw ~* +@all\n{KEEP}\n".encode(),  # both would open the door
                f"{OLD}user extra on >extra-pw ~* +@all\n".encode()]  # fmt: skip

    def feed() -> None:  # each time redisguard opens the file: the next version (then the last one again)
        while not done.is_set():
            try:
                fd = os.open(users, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader opens it
            except OSError:
                time.sleep(0.001)
                continue
            os.set_blocking(fd, True)
            os.write(fd, versions[min(len(fed), 1)])
            os.close(fd)  # (the reader's EOF)
            fed.append(1)
            time.sleep(0.5)  # the reader closes before the next version is offered

    writer = threading.Thread(target=feed, daemon=True)
    try:
        writer.start()
        time.sleep(0.2)
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "config_reload_failed" not in p.log.read_text():
            assert time.monotonic() < deadline, "the SIGHUP reload did not fail"
            time.sleep(0.05)
        done.set()
        (failed,) = events(p.log, "config_reload_failed")
        assert "not a regular file" in failed["error"] and str(users) in failed["error"]
        with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as s:
            s.sendall(encode_command([b"AUTH", b"app", b"app-pw"]))
            assert _line(s) == b"+OK\r\n"
            s.sendall(encode_command([b"FLUSHDB"]))
            assert _line(s).startswith(b"-NOPERM")  # the old rules
        assert auth(p.plain_port, "extra", "extra-pw").startswith(b"-WRONGPASS")
        m = scrape(p.metrics_port)
        assert m['redisguard_config_reload_total{result="failure"}'] == 1
        assert m["redisguard_config_last_reload_successful"] == 0
        writer.join(10)
        os.unlink(users)  # a stable file again: the next SIGHUP loads what is there now
        users.write_text(f"{OLD}user extra on >extra-pw ~* +@all\n")
        p.proc.send_signal(signal.SIGHUP)
        wait_for_login(p.plain_port, "extra", "extra-pw", timeout=20)
    finally:
        p.stop()


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
