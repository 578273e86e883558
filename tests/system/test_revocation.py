"""An acknowledged change of rights is final: ACL SETUSER/DELUSER/LOAD and reloads go through one
sequence (reload.py), a reload never undoes a change acknowledged after it began, and the reply comes
only once every worker (and, in mirror mode, Redis) has the change. Real redis-server, real clients,
``workers = 1`` and ``workers = 2``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from redisguard.acl import load_users
from redisguard.commands.table import CommandTable
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import Policy, Shared
from redisguard.runtime.changes import Change
from redisguard.runtime.reload import Reloader
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, read_until, start_proxy, start_redis
from tests.system.test_workers import children, http, wait_for

WORKERS = "[server]\nworkers = 2\n"
BASE = """\
user default off
user admin on >admin-pw ~* &* +@all
user app on >app-pw ~* +@all -@dangerous
"""
# Enough users that a reload takes a good part of a second (read, parsed, ACL replies built): SIGHUP
# and an ACL SETUSER sent right after it race for real.
FILLER = "".join(f"user filler{i} on >filler-pw-{i} ~filler:{i}:* ~shared:* +get +set +@read\n" for i in range(10_000))
NOPERM = b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"


def conn(p: ProxyProc, user: str = "app") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"AUTH %s %s-pw\r\n" % (user.encode(), user.encode()))
    assert read_until(s, b"+OK\r\n") == b"+OK\r\n"
    return s


def ask(s: socket.socket, line: bytes, timeout: float = 5.0) -> bytes:
    """One inline command, one one-line (or bulk) reply."""
    s.sendall(line + b"\r\n")
    return read_until(s, lambda d: d.endswith(b"\r\n") and (not d.startswith(b"$") or d.count(b"\r\n") >= 2), timeout)


def get_sec(s: socket.socket) -> bytes:
    return ask(s, b"GET sec:1")


def start(tmp: Path, certs: Path, redis_port: int, workers: int, text: str) -> tuple[ProxyProc, Path]:
    users = tmp / "users.acl"
    users.write_text(text)
    p = start_proxy(tmp, certs, users, redis_port, disabled="[]", extra=WORKERS if workers == 2 else "")
    if workers == 2:
        wait_for(lambda: http(p, "/readyz")[0] == 200, 60)
    return p, users


def spread(p: ProxyProc, n: int, workers: int) -> list[socket.socket]:
    """``n`` app connections; with workers, until both workers hold some (read from their audit log)."""
    out = [conn(p) for _ in range(n)]
    if workers == 2:
        for _ in range(100):
            ports = {f"127.0.0.1:{s.getsockname()[1]}" for s in out}
            where = {int(e["worker"]) for e in events(p, "auth_success") if e.get("peer") in ports}
            if where == {0, 1}:
                break
            out.append(conn(p))
        else:
            raise AssertionError("the connections did not land on both workers")
    return out


def worker_of(p: ProxyProc, s: socket.socket) -> int:
    """The worker that logged this connection's login."""
    peer = f"127.0.0.1:{s.getsockname()[1]}"
    (worker,) = {e["worker"] for e in events(p, "auth_success") if e.get("peer") == peer}
    assert isinstance(worker, int)
    return worker


def events(p: ProxyProc, name: str, since: int = 0) -> list[dict[str, Any]]:
    """The log's ``name`` events (from line ``since`` on): JSON objects, whatever each field holds."""
    return [e for line in p.log.read_text().splitlines()[since:] if line.startswith("{")
            and (e := json.loads(line))["event"] == name]  # fmt: skip


def reloaded(p: ProxyProc, since: int, workers: int) -> None:
    """Wait until every worker logged the end of a reload (from log line ``since`` on)."""
    wait_for(lambda: len(events(p, "config_reloaded", since)) == workers, 60)


@pytest.fixture(scope="module")
def direct(redis_server: RedisProc) -> redis.Redis:
    r = redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    r.set("sec:1", "secret")
    r.set("app:1", "mine")
    return r


@pytest.mark.parametrize("workers", [1, 2])
def test_setuser_acknowledged_during_a_reload_holds_after_it(workers: int, tmp_path: Path, certs: Path,
                                                             redis_server: RedisProc, direct: redis.Redis) -> None:  # fmt: skip
    p, _ = start(tmp_path, certs, redis_server.port, workers, BASE + FILLER)
    try:
        clients = spread(p, 8, workers)
        assert all(get_sec(s) == b"$6\r\nsecret\r\n" for s in clients)
        admin = conn(p, "admin")
        for round_ in range(3):
            since = len(p.log.read_text().splitlines())
            os.kill(p.proc.pid, signal.SIGHUP)  # (with workers: the supervisor, which reloads them all)
            time.sleep(0.02)
            assert ask(admin, b"ACL SETUSER app resetkeys ~app:*") == b"+OK\r\n"
            # at once, on every worker, for connected and new clients
            assert all(get_sec(s) == NOPERM for s in [*clients, conn(p)])
            # ... and after the reload of the file (which still says ~*) has finished everywhere: for good
            reloaded(p, since, workers)
            for _ in range(5):
                assert all(get_sec(s) == NOPERM for s in [*clients, conn(p)])
                assert all(ask(s, b"GET app:1") == b"$4\r\nmine\r\n" for s in clients)
                time.sleep(0.05)
            assert events(p, "users_changes_replayed", since), "the reload ended before the ACL SETUSER: no race was run"
            # a reload asked for after the change is the file's truth again (as Redis's ACL LOAD)
            if round_ == 2:
                since = len(p.log.read_text().splitlines())
                os.kill(p.proc.pid, signal.SIGHUP)
                reloaded(p, since, workers)
                assert all(get_sec(conn(p)) == b"$6\r\nsecret\r\n" for _ in range(8))
            else:
                assert ask(admin, b"ACL SETUSER app ~*") == b"+OK\r\n"
                assert all(get_sec(s) == b"$6\r\nsecret\r\n" for s in clients)
    finally:
        p.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_no_old_rights_after_the_reply(workers: int, tmp_path: Path, certs: Path, redis_server: RedisProc,
                                       direct: redis.Redis) -> None:  # fmt: skip
    """Narrow, widen, 50 rounds: right after each reply, every connection (on both workers) and every
    new one sees the new rights. Zero GETs of sec:1 served after a narrowing +OK."""
    p, _ = start(tmp_path, certs, redis_server.port, workers, BASE)
    try:
        clients = spread(p, 12, workers)
        admin = conn(p, "admin")
        served_after_ok = 0
        for _ in range(50):
            assert ask(admin, b"ACL SETUSER app resetkeys ~app:*") == b"+OK\r\n"
            for s in clients:  # all at once, the moment +OK is here
                s.sendall(b"GET sec:1\r\n")
            served_after_ok += sum(read_until(s, lambda d: d.endswith(b"\r\n") and d.count(b"\r\n") >= (
                1 if d.startswith(b"-") else 2)) != NOPERM for s in clients)  # fmt: skip
            fresh = [conn(p) for _ in range(4)]
            served_after_ok += sum(get_sec(s) != NOPERM for s in fresh)
            for s in fresh:
                s.close()
            assert ask(admin, b"ACL SETUSER app ~*") == b"+OK\r\n"
            assert all(get_sec(s) == b"$6\r\nsecret\r\n" for s in clients)
        assert served_after_ok == 0
        # DELUSER: gone everywhere when it answers (its clients disconnected, AUTH refused)
        assert ask(admin, b"ACL DELUSER app") == b":1\r\n"
        s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
        assert ask(s, b"AUTH app app-pw").startswith(b"-WRONGPASS")
        assert all(read_until(c, lambda d: False, 2) == b"" for c in clients)  # closed by redisguard
    finally:
        p.stop()


def test_a_worker_that_does_not_apply_a_change_is_killed_not_left_stale(tmp_path: Path, certs: Path,
                                                                        redis_server: RedisProc) -> None:  # fmt: skip
    p, _ = start(tmp_path, certs, redis_server.port, 2, BASE)
    try:
        admin = conn(p, "admin")
        (mine,) = {int(e["worker"]) for e in events(p, "auth_success") if e.get("user") == "admin"}
        stuck = {e["worker"]: e["pid"] for e in events(p, "worker_started")}[1 - mine]
        assert isinstance(stuck, int) and stuck in children(p.proc.pid)
        other = next(s for s in (conn(p, "admin") for _ in range(100)) if worker_of(p, s) == mine)
        os.kill(stuck, signal.SIGSTOP)
        t0 = time.monotonic()
        admin.sendall(b"ACL SETUSER app resetkeys ~app:*\r\nPING\r\n")
        for _ in range(5):  # the wait is that client's alone: the others on its worker are served meanwhile
            t = time.monotonic()
            assert ask(other, b"PING") == b"+PONG\r\n" and time.monotonic() - t < 2
            time.sleep(0.2)
        # answered in order, once the stopped worker is dealt with
        assert read_until(admin, b"+OK\r\n+PONG\r\n", 60) == b"+OK\r\n+PONG\r\n"
        waited = time.monotonic() - t0
        assert waited > 5, "answered before the stopped worker was dealt with"
        assert not Path(f"/proc/{stuck}").exists() or Path(f"/proc/{stuck}/stat").read_text().split()[2] == "Z"
        assert any(e.get("detail", "").startswith("did not apply an ACL change") for e in events(p, "worker_killed"))
        wait_for(lambda: len(children(p.proc.pid)) == 2 and http(p, "/readyz")[0] == 200, 60)
        # the restarted worker has the change (the journal): no connection anywhere reads sec:1
        assert all(get_sec(conn(p)) == NOPERM for _ in range(20))
        # and `default` is still the file's (off) everywhere: the journal's lines (a users text without a
        # `user default` line) never bring in Redis's implicit open default user
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as anonymous:
                assert ask(anonymous, b"GET sec:1").startswith(b"-NOAUTH")
    finally:
        p.stop()


@pytest.mark.parametrize("how", ["ACL LOAD", "SIGHUP"])
def test_workers_load_the_same_version_of_a_file_being_replaced(how: str, tmp_path: Path, certs: Path,
                                                                redis_server: RedisProc) -> None:  # fmt: skip
    """With workers, the users file is read once (by the supervisor) and every worker parses those bytes:
    a file replaced again and again (temp + rename, the documented way) while a load runs can never
    leave the two workers with different users in force (each used to read it at its own time)."""
    import threading

    wide = BASE + FILLER
    narrow = BASE.replace("app on >app-pw ~* +@all -@dangerous", "app on >app-pw ~app:* +get") + FILLER
    p, users = start(tmp_path, certs, redis_server.port, 2, wide)
    try:
        admins: dict[int, socket.socket] = {}
        while len(admins) < 2:
            s = conn(p, "admin")
            admins.setdefault(worker_of(p, s), s)
        for _ in range(4):
            stop = threading.Event()

            def flip(stop: threading.Event = stop) -> None:
                version = 0
                while not stop.is_set():
                    version ^= 1
                    tmp = users.with_suffix(".tmp")
                    tmp.write_text((wide, narrow)[version])
                    os.rename(tmp, users)
                    time.sleep(0.002)

            writer = threading.Thread(target=flip)
            writer.start()
            since = len(p.log.read_text().splitlines())
            try:
                if how == "ACL LOAD":
                    ask(admins[0], b"ACL LOAD", timeout=90)
                else:
                    os.kill(p.proc.pid, signal.SIGHUP)
                    def done(since: int = since) -> bool:
                        return len(events(p, "config_reloaded", since)) + len(events(p, "config_reload_failed", since)) >= 2

                    wait_for(done, 60)
            finally:
                stop.set()
                writer.join()
            time.sleep(1.0)
            verdicts = {w: ask(s, b"ACL DRYRUN app GET sec:1") for w, s in admins.items()}
            assert verdicts[0] == verdicts[1], verdicts
    finally:
        p.stop()


# -- mirror mode ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mirror_redis() -> Iterator[RedisProc]:
    r = start_redis()
    yield r
    r.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_mirror_setuser_then_auth_at_once(workers: int, tmp_path: Path, certs: Path, mirror_redis: RedisProc) -> None:
    """Redis's own test suite: ACL SETUSER bob ... then AUTH bob at once; DELUSER then AUTH fails at once."""
    users = tmp_path / "users.acl"
    users.write_text(BASE)
    p = start_proxy(tmp_path, certs, users, mirror_redis.port, disabled="[]", upstream_extra='identity = "mirror"',
                    extra=WORKERS if workers == 2 else "")  # fmt: skip
    up = redis.Redis(port=mirror_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    try:
        if workers == 2:
            wait_for(lambda: http(p, "/readyz")[0] == 200, 60)
        admin = conn(p, "admin")
        for i in range(50):
            name = b"bob%d" % i
            assert ask(admin, b"ACL SETUSER %s on >pw +@all ~*" % name) == b"+OK\r\n"
            s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
            assert ask(s, b"AUTH %s pw" % name) == b"+OK\r\n"
            assert ask(s, b"SET k%d v" % i) == b"+OK\r\n", f"round {i}"
            assert ask(admin, b"ACL DELUSER %s" % name) == b":1\r\n"
            assert b"rg:" + name not in up.acl_users()  # Redis has the deletion when DELUSER answers
            s2 = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
            assert ask(s2, b"AUTH %s pw" % name).startswith(b"-WRONGPASS")
            s.close()
            s2.close()
        # Redis refuses the mirror change: the client is told so, not +OK
        up.execute_command("ACL", "SETUSER", UPSTREAM_USER, "-acl|setuser")
        try:  # (restored by Redis's default user: the service user can no longer do it)
            reply = ask(admin, b"ACL SETUSER carol on >pw +get ~c:*")
            assert reply.startswith(b"-ERR redisguard: the change is in force here, but Redis did not take the "
                                    b"mirror user change (NOPERM"), reply  # fmt: skip
            assert ask(admin, b"PING") == b"+PONG\r\n"  # the connection goes on, replies in order
        finally:
            redis.Redis(port=mirror_redis.port).execute_command("ACL", "SETUSER", UPSTREAM_USER, "+acl|setuser")
        assert ask(admin, b"ACL SETUSER carol on >pw +get ~c:*") == b"+OK\r\n"
        s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
        assert ask(s, b"AUTH carol pw") == b"+OK\r\n" and ask(s, b"GET c:1") == b"$-1\r\n"
    finally:
        p.stop()


# -- the ordering rule, in one process (the Reloader itself; ACL LOAD's users-only load) ----------------
def _sequence(tmp: Path, table: CommandTable) -> tuple[Reloader, Shared, Path]:
    users = tmp / "users.acl"
    users.write_text(BASE)
    shared = Shared(Policy(table, load_users(users, table), users_file=str(users)))
    ctx = SimpleNamespace(metrics=Metrics(), clients=set(), executor=concurrent.futures.ThreadPoolExecutor(1))
    # (a stand-in context, what the Reloader uses of one; no config: a users-only load never reads it)
    return Reloader(None, table, shared, ctx, lambda c: None), shared, users  # type: ignore[arg-type]


def test_ordering_rule_changes_after_a_load_was_asked_for_hold_on_top(tmp_path: Path, table: CommandTable) -> None:
    reloader, shared, users = _sequence(tmp_path, table)

    def app() -> str:
        return shared.policy.users["app"].describe()

    async def scenario() -> None:
        narrow = Change("setuser", (b"app", b"resetkeys", b"~app:*"))
        # asked for, then a change: the change holds on top of what the load read
        done = reloader.acl_load()
        assert reloader.change(narrow)[0] == b"+OK\r\n"
        assert await done == b"+OK\r\n"
        assert "~app:*" in app() and "~* " not in app()
        # a change, then a load asked for: the file is the truth again
        reloader.change(Change("setuser", (b"app", b"~other:*")))
        assert await reloader.acl_load() == b"+OK\r\n"
        assert "~* " in app()
        # two loads in a row, changes between: each is replayed onto the loads asked for before it, in order
        first = reloader.acl_load()
        reloader.change(narrow)
        second = reloader.acl_load()
        reloader.change(Change("deluser", (b"admin",)))
        await first
        assert "~app:*" in app() and "admin" not in shared.policy.users
        await second  # asked for after the narrowing (the file again), before the DELUSER (still applied)
        assert "~* " in app() and "admin" not in shared.policy.users
        # a failed load keeps what is in force, changes included
        users.write_text("user app on >x ~* +@all\n")  # no `user default`: refused
        bad = reloader.acl_load()
        reloader.change(narrow)
        assert (await bad).startswith(b"-ERR")
        assert "~app:*" in app()

    asyncio.run(scenario())
