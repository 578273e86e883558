"""[upstream] identity: the scripting gap in service mode, and mirror mode closing it — a Redis ACL user
per redisguard user, kept in step at start, on ACL SETUSER/DELUSER and on reload; each client's upstream
connection logs in as its user's mirror. Against a real redis-server of its own."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from redisguard.acl import new_user
from redisguard.commands.table import CommandTable
from redisguard.upstream.mirror_users import mirror_rules
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    acl_user,
    raw_exchange,
    read_until,
    start_proxy,
    start_redis,
    upstream_user,
)

USERS = """\
user default off
user alice on >alice-pw ~app:* +@scripting +get +set +client|info +client|list +client|reply
user bob on >bob-pw ~bob:* +get +client|info +client|reply
user admin on >admin-pw ~* &* +@all
"""
SCRIPT = "return redis.call('GET','secret')"


@pytest.fixture(scope="module")
def upstream(own_redis: RedisProc) -> redis.Redis:
    r = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, decode_responses=True)
    r.set("secret", "the-secret")
    r.set("app:1", "one")
    return r


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc, upstream: redis.Redis
           ) -> Iterator[ProxyProc]:  # fmt: skip
    upstream.execute_command("ACL", "SETUSER", "rg:ghost", "on", ">x", "+@all")  # a stale mirror from an earlier run
    d = tmp_path_factory.mktemp("mirror")
    users = d / "users.acl"
    users.write_text(USERS)
    p = start_proxy(d, certs, users, own_redis.port, upstream_extra='identity = "mirror"')
    yield p
    p.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc, upstream: redis.Redis
            ) -> Iterator[ProxyProc]:  # fmt: skip
    d = tmp_path_factory.mktemp("service")
    users = d / "users.acl"
    users.write_text(USERS)
    p = start_proxy(d, certs, users, own_redis.port)
    yield p
    p.stop()


def upstream_user_of(upstream: redis.Redis, c: redis.Redis) -> str | None:
    """The user a proxied client's upstream connection is logged in as, as Redis sees it."""
    return upstream_user(upstream, c.execute_command("CLIENT", "INFO"))


def client(p: ProxyProc, user: str) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username=user, password=f"{user}-pw", decode_responses=True, socket_timeout=10)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_service_identity_refuses_scripts_that_would_reach_more(service: ProxyProc, upstream: redis.Redis) -> None:
    """The gap, closed: Redis would run the script as the service user, so redisguard refuses it to alice,
    whose key patterns are narrower; admin (~* &* +@all, as wide as the service user) runs scripts."""
    alice = client(service, "alice")
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access one of the keys"):
        alice.execute_command("GET", "secret")  # GET secret itself is refused by redisguard
    with pytest.raises(redis.exceptions.NoPermissionError, match="rights of the proxy's service user.*identity = \"mirror\""):
        alice.eval(SCRIPT, 0)
    assert client(service, "admin").eval(SCRIPT, 0) == "the-secret"
    assert upstream_user_of(upstream, alice) == UPSTREAM_USER
    res = subprocess.run([sys.executable, "-m", "redisguard", "check-config", "--skip-bind", "-c", str(service.config)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "are refused for 'alice', 'bob'" not in res.stderr  # bob may not run scripts at all
    assert "are refused for 'alice'" in res.stderr and 'identity = "mirror"' in res.stderr


def test_mirror_identity_redis_refuses_the_script(mirror: ProxyProc, upstream: redis.Redis) -> None:
    alice = client(mirror, "alice")
    with pytest.raises(redis.ResponseError) as e:
        alice.eval(SCRIPT, 0)
    # Redis 7.0's refusal from inside the script (a NOPERM: the script's user may not touch the key)
    assert "can't access at least one of the keys" in str(e.value) or "NOPERM" in str(e.value)
    assert alice.eval("return redis.call('GET','app:1')", 0) == "one"  # its own keys still work in scripts
    assert alice.get("app:1") == "one"
    assert upstream_user_of(upstream, alice) == "rg:alice"
    assert any(c["user"] == "rg:alice" for c in upstream.client_list())  # CLIENT LIST on Redis names the user
    res = subprocess.run([sys.executable, "-m", "redisguard", "check-config", "--skip-bind", "-c", str(mirror.config)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "are refused for" not in res.stderr and "upstream identity: mirror (configured)" in res.stderr  # closed


def test_mirror_users_at_start(mirror: ProxyProc, upstream: redis.Redis) -> None:
    names = set(upstream.acl_users())
    assert {"rg:default", "rg:alice", "rg:bob", "rg:admin", UPSTREAM_USER} <= names
    assert "rg:ghost" not in names  # stale mirrors are removed
    got = acl_user(upstream, "rg:alice")
    assert got["enabled"] and got["keys"] == ["~app:*"] and len(got["passwords"]) == 1
    assert "nopass" not in got["flags"]
    default = acl_user(upstream, "rg:default")  # redisguard's default is off; its mirror is on, with no commands
    assert default["enabled"] and default["categories"] == ["-@all"] and not default["commands"]
    # the password is redisguard's alone: its hash is never logged (nor anything else of it)
    log = mirror.log.read_text()
    assert got["passwords"][0] not in log and "mirror_users_synced" in log


def test_mirror_follows_acl_setuser_and_deluser(mirror: ProxyProc, upstream: redis.Redis) -> None:
    admin = client(mirror, "admin")
    assert admin.execute_command("ACL", "SETUSER", "carol", "on", ">carol-pw", "~c:*", "+get", "+client|info") == "OK"
    eventually(lambda: "rg:carol" in upstream.acl_users())
    carol = client(mirror, "carol")
    assert upstream_user_of(upstream, carol) == "rg:carol"
    assert " user=carol " in carol.execute_command("CLIENT", "INFO")  # through redisguard: its own name
    admin.execute_command("ACL", "SETUSER", "carol", "~d:*")
    eventually(lambda: acl_user(upstream, "rg:carol")["keys"] == ["~c:*", "~d:*"])
    assert admin.execute_command("ACL", "DELUSER", "carol") == 1
    eventually(lambda: "rg:carol" not in upstream.acl_users())


def test_mirror_relogin_and_reset(mirror: ProxyProc, upstream: redis.Redis) -> None:
    """One client, one upstream connection: it logs in again as each user the client becomes (Redis
    names the mirror user; through redisguard CLIENT INFO names the redisguard user it had when it asked)."""
    with socket.create_connection(("127.0.0.1", mirror.plain_port), timeout=10) as s:
        seen = []
        for user in ("alice", "bob", "admin"):
            s.sendall(f"AUTH {user} {user}-pw\r\nCLIENT INFO\r\n".encode())
            info = read_until(s, lambda d: d.endswith(b"\n\r\n"))
            seen.append((int(info.split(b"id=")[1].split(b" ")[0]), upstream_user(upstream, info)))
        assert seen == [(seen[0][0], f"rg:{u}") for u in ("alice", "bob", "admin")]
    out = raw_exchange(mirror.plain_port, b"AUTH alice alice-pw\r\nCLIENT INFO\r\nAUTH bob bob-pw\r\nCLIENT INFO\r\n"
                       b"SET bob:1 x\r\nRESET\r\nCLIENT INFO\r\nAUTH admin admin-pw\r\nCLIENT INFO\r\n")  # fmt: skip
    assert re.findall(rb"id=(\d+) .* user=(\S+)", out) == [(out.split(b"id=")[1].split(b" ")[0], u)
                                                          for u in (b"alice", b"bob", b"admin")]  # fmt: skip
    assert out.startswith(b"+OK\r\n") and b"-NOPERM this user has no permissions to run the 'set' command\r\n+RESET\r\n" \
        b"-NOAUTH Authentication required.\r\n+OK\r\n" in out


def test_mirror_relogin_under_client_reply_off(mirror: ProxyProc) -> None:
    """The upstream AUTH is answered, or not, as Redis will: its first one goes before CLIENT REPLY OFF."""
    out = raw_exchange(mirror.plain_port, b"AUTH alice alice-pw\r\nCLIENT REPLY OFF\r\nAUTH bob bob-pw\r\nGET bob:1\r\n"
                       b"CLIENT REPLY ON\r\nCLIENT INFO\r\nGET bob:1\r\n")  # fmt: skip
    assert out.startswith(b"+OK\r\n+OK\r\n$") and out.endswith(b"\r\n$-1\r\n"), out
    assert b" user=bob " in out


def test_mirror_follows_a_reload(mirror: ProxyProc, upstream: redis.Redis) -> None:
    users = Path(str(mirror.config).replace("redisguard.toml", "users.acl"))
    users.write_text(USERS.replace("~bob:*", "~bob:* ~shared:*") + "user dave on >dave-pw ~dave:* +get\n")
    os.kill(mirror.proc.pid, signal.SIGHUP)
    eventually(lambda: "rg:dave" in upstream.acl_users() and acl_user(upstream, "rg:bob")["keys"] == ["~bob:*", "~shared:*"])
    users.write_text(USERS)
    os.kill(mirror.proc.pid, signal.SIGHUP)
    eventually(lambda: "rg:dave" not in upstream.acl_users())


def test_mirror_rules_are_the_acl_list_form(table: CommandTable) -> None:
    u = new_user("x", table, ["on", ">pw", "nopass", "~a:*", "%R~r:*", "&ch", "+get", "(~s:* +set)", "skip-sanitize-payload"])
    rules = mirror_rules(u)
    assert rules == ["skip-sanitize-payload", "~a:*", "%R~r:*", "resetchannels", "&ch", "-@all", "+get",
                     "(~s:* resetchannels -@all +set)"]
    assert not any(r in ("on", "off", "nopass") or r.startswith(("#", ">")) for r in rules)


# The least the upstream user needs in mirror mode (docs/security.md): the mirror users' admin, the
# command table and settings at start, PING for /readyz and the health check. No data commands.
LEAST = "reset on >{pw} -@all +acl|setuser +acl|deluser +acl|users +acl|cat +command|info +info +config|get +ping"


def test_mirror_mode_with_a_least_privilege_upstream_user(tmp_path: Path, certs: Path) -> None:
    r = start_redis()
    try:
        direct = redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, decode_responses=True)
        direct.set("secret", "s")
        direct.execute_command("ACL", "SETUSER", UPSTREAM_USER, *LEAST.format(pw=UPSTREAM_PASSWORD).split())
        users = tmp_path / "users.acl"
        users.write_text(USERS)
        p = start_proxy(tmp_path, certs, users, r.port, upstream_extra='identity = "mirror"')
        try:
            alice = client(p, "alice")
            assert alice.set("app:2", "two") and alice.get("app:2") == "two"
            with pytest.raises(redis.ResponseError):
                alice.eval(SCRIPT, 0)
            log = p.log.read_text()
            assert "mirror_sync_failed" not in log and "command_table_fallback" not in log
        finally:
            p.stop()
        # without the ACL grants: said once at start, and clients get an error rather than the wrong identity
        direct.execute_command("ACL", "SETUSER", UPSTREAM_USER, "-acl")
        p = start_proxy(tmp_path, certs, users, r.port, upstream_extra='identity = "mirror"')
        try:
            with pytest.raises(redis.RedisError, match="upstream authentication failed"):
                client(p, "alice").get("app:2")
            (line,) = [x for x in p.log.read_text().splitlines() if "mirror_sync_failed" in x]
            assert "NOPERM" in line and "+acl|setuser +acl|deluser +acl|users" in line
        finally:
            p.stop()
    finally:
        r.stop()
