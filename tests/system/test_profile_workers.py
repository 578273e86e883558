"""The traffic profile with ``[server] workers = 2``: every worker adds its traffic to the one file, so its
counts equal the metrics' (whichever worker saw a command, through a worker killed and restarted), and
`acl suggest` allows what either worker saw. Plus the file's merge itself: concurrent writers, bounds,
a failed write."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from pathlib import Path

import redis

from redisguard.commands.table import CommandTable
from redisguard.observe.profile import MAX_PATTERNS, TrafficProfile
from redisguard.observe.profile_store import ProfileStore, add_to_file
from tests.helpers import ProxyProc, RedisProc, start_proxy
from tests.system.test_least_privilege import _cli
from tests.system.test_workers import WORKERS, admin_on, children, http, metrics, served_by, wait_for

USERS = "user default off\nuser app on >app-pw ~* &* +@all\n"


def client_on(p: ProxyProc, worker: int) -> redis.Redis:
    return admin_on(p, worker, "app", "app-pw")


def counts(path: Path) -> dict[str, int]:
    try:
        return dict(json.loads(path.read_text())["users"]["app"]["commands"])
    except (FileNotFoundError, KeyError):
        return {}


def allowed(p: ProxyProc, command: str) -> float:
    return metrics(p).get(f'redisguard_commands_total{{command="{command}",result="allowed",user="app"}}', 0)


def test_two_workers_add_up_in_one_profile(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    profile = tmp_path / "profile.json"
    p = start_proxy(tmp_path, certs, users, redis_server.port, disabled="[]\nreload_guard = true",
                    extra=WORKERS + f'[profile]\nfile = "{profile}"\ninterval = 0.2\n')  # fmt: skip
    try:
        wait_for(lambda: http(p, "/readyz")[0] == 200)
        a, b = client_on(p, 0), client_on(p, 1)
        for i in range(7):
            assert a.strlen(f"s:{i}") == 0
        for i in range(3):
            assert b.strlen(f"s:{i}") == 0
        for i in range(5):
            assert b.getrange(f"g:{i}", 0, 1) == b""  # seen by worker 1 only
        # both workers' periodic saves: 10 STRLEN in the metrics, 10 in the profile
        wait_for(lambda: allowed(p, "strlen") == 10 and counts(profile).get("strlen") == 10)
        assert counts(profile)["getrange"] == 5 == allowed(p, "getrange")
        a.close()
        b.close()

        # [acl] reload_guard: worker 0 never saw GETRANGE, and refuses a users file without it all the same
        users.write_text(USERS.replace("+@all", "+@all -getrange"))
        since = len(p.log.read_text().splitlines())
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served_by(p, "config_reload_failed", since) == {0, 1})
        assert "would deny 1 observed command(s), e.g. user app: getrange g:*" in p.log.read_text()
        users.write_text(USERS)

        # A worker killed (its counts were saved) and restarted: it adds to the file, never resets it.
        victim = children(p.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(p.proc.pid)) == 2 and victim not in children(p.proc.pid))
        wait_for(lambda: http(p, "/readyz")[0] == 200)
        a, b = client_on(p, 0), client_on(p, 1)
        for i in range(4):
            assert a.strlen(f"t:{i}") == 0
        assert b.strlen("t:x") == 0 and b.strlen("t:y") == 0
        a.close()
        b.close()
        wait_for(lambda: allowed(p, "strlen") == 16)
    finally:
        p.stop()  # every worker saves what is left at shutdown
    assert counts(profile)["strlen"] == 16 and counts(profile)["getrange"] == 5

    out = _cli("acl", "suggest", "--profile", str(profile), "--users", str(users))
    assert out.returncode == 0, out.stderr
    assert {"+strlen", "+getrange"} <= set(out.stdout.split())
    tight = tmp_path / "tight.acl"
    tight.write_text(out.stdout)
    check = _cli("acl", "diff", str(users), str(tight), "--against", str(profile))
    assert check.returncode == 0 and "allows everything observed" in check.stdout, check.stdout
    tight.write_text(out.stdout.replace(" +getrange", ""))
    check = _cli("acl", "diff", str(users), str(tight), "--against", str(profile))
    assert check.returncode == 1 and "getrange" in check.stdout, check.stdout


def _one(table: CommandTable, name: str, keys: list[bytes], user: str = "app") -> TrafficProfile:
    prof = TrafficProfile()
    cmd = table.get(name)
    assert cmd is not None
    for k in keys:
        prof.record(user, cmd, [name.encode(), k], [(1, 1)], [])
    return prof


def test_concurrent_writers_lose_no_count(tmp_path: Path, table: CommandTable) -> None:
    path = tmp_path / "profile.json"
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for _ in range(10):
                add_to_file(path, _one(table, "get", [b"k:%d" % n, b"shared"]).take())
        except BaseException as e:  # (reported below: a thread's exception is not the test's)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = TrafficProfile.from_json(json.loads(path.read_text()))
    assert total.users["app"].commands == {"get": 6 * 10 * 2}
    assert set(total.users["app"].keys) == {b"k:*", b"shared"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_merge_keeps_the_bounds_and_forgotten_users_leave_the_file(tmp_path: Path, table: CommandTable) -> None:
    path = tmp_path / "profile.json"
    add_to_file(path, _one(table, "get", [b"a%d" % i for i in range(MAX_PATTERNS - 10)]).take())
    add_to_file(path, _one(table, "get", [b"b%d" % i for i in range(MAX_PATTERNS - 10)], "gone").take())
    add_to_file(path, _one(table, "get", [b"c%d" % i for i in range(MAX_PATTERNS - 10)]).take())
    total = TrafficProfile.from_json(json.loads(path.read_text()))
    app = total.users["app"]
    assert app.keys_truncated and set(app.keys) == {b"*"} and app.commands == {"get": 2 * (MAX_PATTERNS - 10)}
    assert app.uses == {"get": {b"*"}}
    live = TrafficProfile()
    live.forget(["gone"])  # ACL DELUSER: the file forgets the user at the next save
    add_to_file(path, live.take())
    assert set(json.loads(path.read_text())["users"]) == {"app"}


def test_a_failed_write_gives_the_counts_back(tmp_path: Path, table: CommandTable) -> None:
    path, lock = tmp_path / "profile.json", tmp_path / "profile.json.lock"
    live = _one(table, "get", [b"x"])
    store = ProfileStore(live, path, 60)

    async def run() -> None:
        lock.mkdir()  # the lock cannot be opened: the write fails
        await store.save()
        assert live.users["app"].commands == {"get": 1} and live.changed and not path.exists()
        lock.rmdir()
        live.merge(_one(table, "get", [b"y"]))  # recorded meanwhile
        await store.stop()

    asyncio.run(run())
    assert counts(path) == {"get": 2} and live.users == {}


def test_a_bad_file_is_kept_aside(tmp_path: Path, table: CommandTable) -> None:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    add_to_file(path, _one(table, "get", [b"x"]).take())
    assert (tmp_path / "profile.json.bad").read_text() == "{not json" and counts(path) == {"get": 1}


def test_restart_adds_to_the_file_never_double_counts(tmp_path: Path, table: CommandTable) -> None:
    path = tmp_path / "profile.json"
    add_to_file(path, _one(table, "get", [b"x"] * 3).take())
    add_to_file(path, TrafficProfile().take())  # a new process with nothing recorded yet
    assert counts(path) == {"get": 3}
