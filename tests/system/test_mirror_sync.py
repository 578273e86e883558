"""Mirror identity keeps Redis's mirror users in step when Redis refuses a push, when Redis goes back to
older rules (ACL LOAD of an older file, a restart from one), and when several redisguard instances
share one Redis.

- A push Redis refuses (-BUSY while a script runs) leaves the mirror marked not pushed and is retried
  in the background until Redis has it; ACL SETUSER/DELUSER still answer that Redis did not take it.
- A mirror's password derives from its name and its rules text, so a mirror Redis holds with older
  rules refuses our AUTH and is pushed again.
- The key derives from the service user's password: instances sharing the service user compute the
  same mirror passwords; instances whose users differ are told apart (``mirror_contested``).

Against a real redis-server of its own (users from an aclfile, so ACL SAVE/LOAD work)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from redisguard.acl import load_users, new_user
from redisguard.commands.table import CommandTable
from redisguard.config.load import load_config
from redisguard.config.model import Config
from redisguard.upstream.identity import MirrorIdentity
from redisguard.upstream.mirror_users import KEY_CONTEXT, MirrorUsers, mirror_key, mirror_rules
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    acl_user,
    find_acl_user,
    free_port,
    proxy_config,
    read_until,
    start_proxy,
    start_redis,
)
from tests.system.test_mirror_recovery import GOAL, eventually, metrics

USERS = """\
user default off
user admin on >admin-pw ~* &* +@all
user x on >x-pw ~* &* +@all -@dangerous
user y on >y-pw ~* +get +client|info
"""
EVAL_SEC = b"*3\r\n$4\r\nEVAL\r\n$32\r\nreturn redis.call('GET','sec:1')\r\n$1\r\n0\r\n"
SPIN = b"*3\r\n$4\r\nEVAL\r\n$39\r\nlocal i = 0 while true do i = i + 1 end\r\n$1\r\n0\r\n"
NOKEY = b"-ERR The user executing the script can't access at least one of the keys"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    r = start_redis(extra=["--busy-reply-threshold 200"], aclfile=tmp_path_factory.mktemp("redis") / "users.acl")
    yield r
    r.stop()


def upstream(r: RedisProc) -> redis.Redis:
    up = redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, socket_timeout=10)
    up.set("sec:1", "secret")
    return up


def proxy(d: Path, certs: Path, r: RedisProc, prefix: str, users: str = USERS, identity: str = "mirror") -> ProxyProc:
    (d / "users.acl").write_text(users)
    return start_proxy(d, certs, d / "users.acl", r.port,
                       upstream_extra=f'identity = "{identity}"\nmirror_prefix = "{prefix}"')  # fmt: skip


def login(p: ProxyProc, user: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
    s.sendall(f"AUTH {user} {user}-pw\r\n".encode())
    assert read_until(s, b"+OK\r\n") == b"+OK\r\n"
    return s


def ask(s: socket.socket, data: bytes, timeout: float = 10.0) -> bytes:
    s.sendall(data)
    return read_until(s, lambda b: b.endswith(b"\r\n"), timeout)


def admin(p: ProxyProc) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username="admin", password="admin-pw", socket_timeout=15)


def events(p: ProxyProc, name: str) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in p.log.read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == name]


def keys_of(up: redis.Redis, mirror: str) -> bytes | None:
    user = find_acl_user(up, mirror)
    return None if user is None else b" ".join(k.encode() if isinstance(k, str) else k for k in user["keys"])


def busy(up: redis.Redis) -> bool:
    try:
        up.ping()
    except redis.exceptions.ResponseError as e:
        return "BUSY" in str(e)
    return False


def spin(p: ProxyProc, up: redis.Redis) -> socket.socket:
    """x runs a script that never ends: Redis answers -BUSY to everything else until SCRIPT KILL."""
    s = login(p, "x")
    s.sendall(SPIN)
    eventually(lambda: busy(up))
    return s


def unbusy(up: redis.Redis) -> None:
    """SCRIPT KILL, and wait until Redis is done with the script (its answer may come first)."""
    with contextlib.suppress(redis.exceptions.ResponseError):  # (no script running)
        up.execute_command("SCRIPT", "KILL")
    eventually(lambda: not busy(up))


def report(what: str, seconds: float) -> None:
    print(f"\nmirror sync: {what}: {seconds:.3f} s")


# -- a push Redis refuses is retried until Redis has it --------------------------------------------

def test_a_refused_push_is_retried_until_redis_has_it(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    up = upstream(own_redis)
    p = proxy(tmp_path, certs, own_redis, "b:")
    try:
        assert keys_of(up, "b:x") == b"~*"
        s = spin(p, up)
        # ACL SETUSER / DELUSER through redisguard: in force here at once, but Redis refuses the mirror push
        for argv in (("SETUSER", "x", "resetkeys", "~u:*"), ("DELUSER", "y")):
            with pytest.raises(redis.exceptions.ResponseError, match=r"Redis did not take the mirror user change "
                               r"\(BUSY Redis is busy running a script"):  # fmt: skip
                admin(p).execute_command("ACL", *argv)
        assert metrics(p)["redisguard_mirror_push_errors_total"] >= 2
        time.sleep(2.5)  # the first retries are refused too: retrying goes on
        failed = len(events(p, "mirror_user_failed")) + len(events(p, "mirror_sync_failed"))
        assert failed >= 3 and not events(p, "mirror_sync_recovered")
        unbusy(up)
        assert read_until(s, b"\r\n").startswith(b"-ERR Script killed by user with SCRIPT KILL")
        start = time.monotonic()  # a new client of x does not wait for the retry's delay: its refused AUTH pushes now
        assert ask(login(p, "x"), EVAL_SEC).startswith(NOKEY)
        report("-BUSY push, next client of x served with its rules after SCRIPT KILL", time.monotonic() - start)
        assert keys_of(up, "b:x") == b"~u:*" and "b:y" not in up.acl_users()
        assert events(p, "mirror_sync_recovered")
        assert ask(s, EVAL_SEC).startswith(NOKEY)  # x's connection from before: Redis narrowed it in place

        # the same for a reload (the background push), whose ACL USERS Redis refuses
        before = len(events(p, "mirror_sync_failed"))
        s = spin(p, up)
        (tmp_path / "users.acl").write_text(USERS.replace("user x on >x-pw ~* ", "user x on >x-pw ~v:* "))
        os.kill(p.proc.pid, signal.SIGHUP)
        eventually(lambda: len(events(p, "mirror_sync_failed")) > before and bool(events(p, "config_reloaded")))
        time.sleep(1.5)  # (Redis takes nothing meanwhile: the retries are refused)
        unbusy(up)
        report("-BUSY during a reload, Redis has it after SCRIPT KILL",
               eventually(lambda: keys_of(up, "b:x") == b"~v:*" and "b:y" in up.acl_users()))  # (y is in the file)
    finally:
        unbusy(up)
        p.stop()


def test_a_refused_background_push_is_marked_and_retried(tmp_path: Path, certs: Path, own_redis: RedisProc,
                                                         table: CommandTable) -> None:  # fmt: skip
    """In one process: a users change whose ACL SETUSER Redis refuses is not taken for done."""
    up = upstream(own_redis)
    (tmp_path / "users.acl").write_text(USERS)
    (tmp_path / "narrow.acl").write_text(USERS.replace("user x on >x-pw ~* ", "user x on >x-pw ~v:* "))
    cfg = proxy_config(tmp_path, certs, tmp_path / "users.acl", own_redis.port, 1, 2, 3,
                       upstream_extra='identity = "mirror"\nmirror_prefix = "k:"')  # fmt: skip
    mirror = MirrorIdentity(load_config(cfg))
    spinner = socket.create_connection(("127.0.0.1", own_redis.port), timeout=10)

    async def run() -> float:
        await mirror.start(load_users(tmp_path / "users.acl", table))
        assert mirror.sync.synced["k:x"].startswith("~* ")
        spinner.sendall(f"AUTH {UPSTREAM_USER} {UPSTREAM_PASSWORD}\r\n".encode() + SPIN)
        await asyncio.sleep(0.5)  # (past busy-reply-threshold)
        mirror.users_changed(load_users(tmp_path / "narrow.acl", table))
        while "k:x" in mirror.sync.synced:  # refused: marked not pushed
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        assert "k:x" not in mirror.sync.synced and mirror.sync.task is not None and not mirror.sync.task.done()
        await asyncio.to_thread(unbusy, up)
        start = time.monotonic()
        await asyncio.wait_for(mirror.sync.task, GOAL)
        return time.monotonic() - start

    try:
        report("-BUSY background push, retried after SCRIPT KILL", asyncio.run(run()))
        assert mirror.sync.synced["k:x"].startswith("~v:* ") and keys_of(up, "k:x") == b"~v:*"
    finally:
        unbusy(up)
        spinner.close()


# -- a mirror with older rules refuses our password ------------------------------------------------

def test_older_rules_on_redis_are_pushed_again(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    """ACL SAVE on Redis, a revocation through redisguard, then ACL LOAD on Redis (and a restart from
    the same older file): the mirror is back with its old rules and the old rules' password."""
    up = upstream(own_redis)
    p = proxy(tmp_path, certs, own_redis, "s:")
    try:
        old = login(p, "x")
        assert ask(old, EVAL_SEC) == b"$6\r\nsecret\r\n"
        assert up.execute_command("ACL", "SAVE") == b"OK"
        assert admin(p).execute_command("ACL", "SETUSER", "x", "resetkeys", "~u:*") == b"OK"
        assert ask(old, EVAL_SEC).startswith(NOKEY)
        for stale in ("ACL LOAD", "restart"):
            if stale == "restart":
                own_redis.restart()
                up = upstream(own_redis)
            else:
                assert up.execute_command("ACL", "LOAD") == b"OK"
            assert keys_of(up, "s:x") == b"~*"  # Redis has the old rules again, with a password of ours
            start = time.monotonic()
            assert ask(login(p, "x"), EVAL_SEC).startswith(NOKEY)  # the first client is served, with its rules
            report(f"{stale} of an older ACL file, next client (auth path)", time.monotonic() - start)
            assert keys_of(up, "s:x") == b"~u:*"
            with contextlib.suppress(OSError):  # the connection from before never reads it either (Redis
                assert b"secret" not in ask(old, EVAL_SEC)  # drops its upstream at ACL LOAD: it is closed)
        assert metrics(p)['redisguard_mirror_resync_total{reason="auth"}'] >= 2
    finally:
        p.stop()


# -- several instances in front of one Redis -------------------------------------------------------

def test_instances_sharing_the_service_user_share_the_mirror_passwords(tmp_path_factory: pytest.TempPathFactory,
                                                                       certs: Path, own_redis: RedisProc) -> None:  # fmt: skip
    """An HA pair / a rolling deploy: same users file, same service user. Neither resets the other's
    mirrors, and a restarted instance pushes the very same passwords."""
    up = upstream(own_redis)
    a, b = (proxy(tmp_path_factory.mktemp(n), certs, own_redis, "t:", identity="auto") for n in "ab")
    try:
        before = acl_user(up, "t:x")["passwords"]
        for i in range(30):
            assert ask(login((a, b)[i % 2], "x"), b"SET app:1 v\r\n") == b"+OK\r\n"
        a.stop()
        a = proxy(tmp_path_factory.mktemp("a2"), certs, own_redis, "t:", identity="auto")
        for i in range(10):
            assert ask(login((a, b)[i % 2], "x"), b"SET app:1 v\r\n") == b"+OK\r\n"
        assert acl_user(up, "t:x")["passwords"] == before
        for p in (a, b):
            m = metrics(p)
            assert sum(v for k, v in m.items() if k.startswith("redisguard_mirror_resync_total")) == 0, m
            assert not events(p, "mirror_resync") and not events(p, "mirror_key_per_process")
    finally:
        a.stop()
        b.stop()


def test_instances_with_other_users_are_told_apart(tmp_path_factory: pytest.TempPathFactory, certs: Path,
                                                   own_redis: RedisProc) -> None:  # fmt: skip
    """Two instances whose users files differ push their own rules over each other's (each finds its
    mirror refusing its password): that is logged and counted as contested, not taken for a Redis restart."""
    up = upstream(own_redis)
    narrow = USERS.replace("user x on >x-pw ~* ", "user x on >x-pw ~app:* ")
    a = proxy(tmp_path_factory.mktemp("a"), certs, own_redis, "c:", users=narrow)
    b = proxy(tmp_path_factory.mktemp("b"), certs, own_redis, "c:")
    try:
        assert keys_of(up, "c:x") == b"~*"  # b pushed its rules over a's
        os.kill(a.proc.pid, signal.SIGHUP)  # a verifies: its password for c:x is refused
        eventually(lambda: bool(events(a, "mirror_contested")))
        (line,) = events(a, "mirror_contested")
        assert line["mirrors"] == ["c:x"] and "share both" in str(line["detail"])
        assert metrics(a)["redisguard_mirror_users_contested_total"] == 1
        assert keys_of(up, "c:x") == b"~app:*"
    finally:
        a.stop()
        b.stop()


def test_without_a_service_password_the_key_is_per_process_and_said_so(tmp_path: Path, certs: Path,
                                                                        own_redis: RedisProc) -> None:  # fmt: skip
    """The aclfile Redis's default user (nopass, every right) as the service user."""
    (tmp_path / "users.acl").write_text(USERS)
    cfg = proxy_config(tmp_path, certs, tmp_path / "users.acl", own_redis.port, free_port(), free_port(), free_port(),
                       upstream_extra='identity = "mirror"\nmirror_prefix = "n:"')  # fmt: skip
    cfg.write_text(cfg.read_text().replace(f'username = "{UPSTREAM_USER}"\npassword_file = "upstream.pw"\n', ""))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # fmt: skip
    try:
        eventually(lambda: "mirror_users_synced" in log.read_text() or proc.poll() is not None)
        (line,) = [json.loads(x) for x in log.read_text().splitlines() if "mirror_key_per_process" in x]
        assert line["level"] == "warning" and "need a service password" in line["detail"]
    finally:
        proc.terminate()
        proc.wait(10)


# -- pure parts -------------------------------------------------------------------------------------

def _config(tmp_path: Path, password: str = "pw", username: str = "svc") -> Config:
    (tmp_path / "users.acl").write_text(USERS)
    (tmp_path / "c.toml").write_text('[[listener]]\nname = "p"\ntype = "tcp"\naddress = "127.0.0.1:0"\n'
                                     '[upstream]\n[acl]\nusers_file = "users.acl"\n')  # fmt: skip
    config = load_config(tmp_path / "c.toml")
    return replace(config, upstream=replace(config.upstream, identity="mirror", username=username, password=password))


def test_mirror_key_derives_from_the_service_credentials(tmp_path: Path) -> None:
    key = mirror_key(_config(tmp_path))
    assert key is not None and key == mirror_key(_config(tmp_path))
    assert key == hmac.new(b"pw", KEY_CONTEXT + b"svc", hashlib.sha256).digest()
    assert key != hmac.new(b"pw", b"svc", hashlib.sha256).digest()  # its own domain
    assert len({key, mirror_key(_config(tmp_path, password="pw2")), mirror_key(_config(tmp_path, username="s2"))}) == 3
    assert mirror_key(_config(tmp_path, password="")) is None


def test_mirror_password_binds_name_and_rules(tmp_path: Path, table: CommandTable) -> None:
    a, b = MirrorUsers(_config(tmp_path)), MirrorUsers(_config(tmp_path))  # two instances
    x = new_user("x", table, ["on", "~a:*", "+get"])
    assert a.auth(x) == b.auth(x) and a.auth(x) is a.auth(x)  # the same password; encoded once per user
    text = " ".join(mirror_rules(x))
    assert a.auth(x) == b"*3\r\n$4\r\nAUTH\r\n$4\r\nrg:x\r\n$64\r\n" + a.password("x", text).encode() + b"\r\n"
    assert a.password("x", text) != a.password("x", text.replace("~a:*", "~*"))
    assert a.password("ab", "c") != a.password("a", "bc")
    assert MirrorUsers(_config(tmp_path, password="other")).auth(x) != a.auth(x)
    setuser = a.setuser(x, mirror_rules(x))
    assert setuser[5] == b"#" + hashlib.sha256(a.password("x", text).encode()).hexdigest().encode()
    narrower = new_user("x", table, ["on", "~a:1", "+get"])
    assert a.auth(narrower) != a.auth(x)
    first = a.auth(x)
    a.refused = ("keys",)  # a reload changed [acl] disabled_commands: the rules pushed change too
    assert a.auth(x) != first and a.auth(x) == a._auth_command("x", " ".join(mirror_rules(x, ("keys",))))
    del x, narrower
    gc.collect()
    assert len(a._auth) == 0  # bounded by the users alive
