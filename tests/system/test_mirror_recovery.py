"""Mirror identity survives Redis losing its mirror users (Redis is the truth for mirrored users).

A redis-server restarted on the same port, ``ACL DELUSER`` and ``ACL LOAD`` on Redis drop the mirror
users; redisguard finds out (a client's refused upstream AUTH, the health check, a SIGHUP), pushes
them again, and the client whose AUTH was refused is served on a second connection without seeing an
error. Against a real redis-server of its own whose users come from an aclfile (so ACL LOAD there
keeps only the service user and Redis's open ``default``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from redisguard.commands.table import CommandTable
from redisguard.config.model import UpstreamConfig, mirror_prefix_conflict
from redisguard.observe.metrics import parse_samples
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    acl_user,
    free_port,
    proxy_config,
    raw_exchange,
    start_proxy,
    start_redis,
    upstream_user,
)

USERS = """\
user default off
user alice on >alice-pw ~app:* +@scripting +get +set +client|info
user bob on >bob-pw ~bob:* +get +client|info
"""
GOAL = 20.0  # seconds: served again without operator action (issue 21)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    r = start_redis(aclfile=tmp_path_factory.mktemp("redis") / "users.acl")
    yield r
    r.stop()


def upstream(r: RedisProc) -> redis.Redis:
    return redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, decode_responses=True,
                       socket_timeout=10)  # fmt: skip


def _proxy(tmp_path_factory: pytest.TempPathFactory, certs: Path, r: RedisProc, upstream_extra: str) -> ProxyProc:
    d = tmp_path_factory.mktemp("mirror")
    (d / "users.acl").write_text(USERS)
    return start_proxy(d, certs, d / "users.acl", r.port, upstream_extra=upstream_extra)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc) -> Iterator[ProxyProc]:
    """No health check: only a client's refused AUTH or a SIGHUP can find the mirrors gone."""
    p = _proxy(tmp_path_factory, certs, own_redis, 'identity = "mirror"\nhealth_check_interval = 0.0')
    yield p
    p.stop()


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc) -> Iterator[ProxyProc]:
    """A health check every second (its own prefix: two redisguards never share mirrors)."""
    p = _proxy(tmp_path_factory, certs, own_redis,
               'identity = "mirror"\nmirror_prefix = "hc:"\nhealth_check_interval = 1.0')  # fmt: skip
    yield p
    p.stop()


def client(p: ProxyProc, user: str) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username=user, password=f"{user}-pw", decode_responses=True,
                       socket_timeout=15)


def metrics(p: ProxyProc) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10) as resp:
        return parse_samples(resp.read().decode())


def resyncs(p: ProxyProc, reason: str) -> float:
    return metrics(p)[f'redisguard_mirror_resync_total{{reason="{reason}"}}']


def resync_lines(p: ProxyProc) -> list[dict[str, Any]]:  # (JSON log lines)
    lines = [json.loads(x) for x in p.log.read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "mirror_resync"]


def eventually(check: Callable[[], bool], timeout: float = GOAL) -> float:
    """Seconds until ``check()`` held (fails past ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def _redis_of(p: ProxyProc) -> redis.Redis:
    """The proxy's own upstream Redis, as the service user."""
    host, _, port = tomllib.loads(p.config.read_text())["upstream"]["address"].rpartition(":")
    return redis.Redis(host=host, port=int(port), username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, socket_timeout=10)


def served(p: ProxyProc, user: str = "alice") -> str:
    """A new client's upstream identity (as Redis names it, found by CLIENT INFO's id): it was served, as its mirror."""
    c = client(p, user)
    try:
        info = c.execute_command("CLIENT", "INFO")
        assert f" user={user} " in str(info)  # through redisguard: its own user
        return str(upstream_user(_redis_of(p), info))
    finally:
        c.close()


def report(what: str, seconds: float) -> None:
    print(f"\nmirror recovery: {what}: {seconds:.3f} s")


def test_served_through_a_redis_restart(quiet: ProxyProc, own_redis: RedisProc) -> None:
    """The first client after a restart without the mirrors is served, transparently, as its mirror:
    its refused AUTH had the mirrors pushed again and its connection retried once."""
    assert served(quiet) == "rg:alice"
    before = resyncs(quiet, "auth")
    own_redis.restart()
    assert "rg:alice" not in upstream(own_redis).acl_users()
    start = time.monotonic()
    assert served(quiet) == "rg:alice"  # no error, and never Redis's open default user
    report("redis-server restart, first client (auth path)", time.monotonic() - start)
    assert time.monotonic() - start < GOAL
    assert resyncs(quiet, "auth") == before + 1
    assert {"rg:default", "rg:alice", "rg:bob", UPSTREAM_USER} <= set(upstream(own_redis).acl_users())
    line = resync_lines(quiet)[-1]
    assert line["reason"] == "auth" and line["recreated"] == 3 and line["level"] == "warning"
    assert "rg:alice" in line["mirrors"]
    assert metrics(quiet)["redisguard_mirror_users_recreated_total"] >= 3


def test_no_request_runs_as_redis_default_after_a_refused_login(quiet: ProxyProc, own_redis: RedisProc) -> None:
    """Redis's default user here is on nopass +@all: a request pipelined behind a refused mirror AUTH
    would run as it. The link sends the AUTH alone and holds the requests until Redis accepts it."""
    assert served(quiet) == "rg:alice"
    up = upstream(own_redis)
    up.execute_command("ACL", "DELUSER", "rg:alice")
    c = client(quiet, "alice")
    pipe = c.pipeline(transaction=False)
    pipe.execute_command("CLIENT", "INFO")
    pipe.eval("return redis.call('SET', 'outside', 'x')", 0)  # refused by Redis as rg:alice (~app:* only)
    info, evaled = pipe.execute(raise_on_error=False)
    assert upstream_user(up, info) == "rg:alice"
    c.close()
    assert isinstance(evaled, redis.ResponseError) and up.get("outside") is None


def test_a_refused_relogin_has_the_mirrors_verified(quiet: ProxyProc, own_redis: RedisProc) -> None:
    """AUTH as another user on an open connection: Redis refuses the new mirror's AUTH; that client is
    told and closed (its connection is another user's), and the mirrors are pushed again for the next."""
    assert served(quiet, "bob") == "rg:bob"
    before = resyncs(quiet, "auth")
    upstream(own_redis).execute_command("ACL", "DELUSER", "rg:bob")
    out = raw_exchange(quiet.plain_port, b"AUTH alice alice-pw\r\nGET app:1\r\nAUTH bob bob-pw\r\nGET bob:1\r\n",
                       expect_close=True)  # fmt: skip
    # (the error answers the AUTH: Redis refused the login it stands for)
    assert out == b"+OK\r\n$-1\r\n-ERR redisguard: upstream authentication failed; check [upstream] username " \
        b"and password\r\n", out  # fmt: skip
    eventually(lambda: resyncs(quiet, "auth") == before + 1)
    assert served(quiet, "bob") == "rg:bob"


def test_concurrent_clients_share_one_resync(quiet: ProxyProc, own_redis: RedisProc) -> None:
    assert served(quiet) == "rg:alice"
    before = resyncs(quiet, "auth")
    up = upstream(own_redis)
    up.execute_command("ACL", "DELUSER", "rg:alice", "rg:bob")
    results: list[str] = []

    def one(user: str) -> None:
        try:
            results.append(served(quiet, user))
        except redis.RedisError as e:
            results.append(repr(e))

    threads = [threading.Thread(target=one, args=("alice" if i % 2 else "bob",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(set(results)) == ["rg:alice", "rg:bob"], results
    assert 1 <= resyncs(quiet, "auth") - before <= 3  # coalesced (a check shares the ones asked within 1 s)


def test_acl_deluser_and_acl_load_on_redis(quiet: ProxyProc, own_redis: RedisProc) -> None:
    up = upstream(own_redis)
    assert served(quiet, "bob") == "rg:bob"
    up.execute_command("ACL", "DELUSER", "rg:bob")
    start = time.monotonic()
    assert served(quiet, "bob") == "rg:bob"
    report("ACL DELUSER rg:bob on Redis, next client (auth path)", time.monotonic() - start)
    up.execute_command("ACL", "LOAD")  # the aclfile has only the service user and default
    assert not [u for u in up.acl_users() if u[:3] in ("rg:", b"rg:")]
    start = time.monotonic()
    assert served(quiet, "alice") == "rg:alice"
    report("ACL LOAD on Redis, next client (auth path)", time.monotonic() - start)
    assert "rg:bob" in up.acl_users()  # every mirror, not only the one refused


def test_sighup_always_verifies(quiet: ProxyProc, own_redis: RedisProc) -> None:
    """The users did not change, and the mirrors are gone or hold another password: SIGHUP pushes them."""
    up = upstream(own_redis)
    assert served(quiet) == "rg:alice"
    before = resyncs(quiet, "sighup")
    up.execute_command("ACL", "DELUSER", "rg:bob")
    up.execute_command("ACL", "SETUSER", "rg:alice", "resetpass", ">not-ours")  # its name alone looks fine
    os.kill(quiet.proc.pid, signal.SIGHUP)
    eventually(lambda: resyncs(quiet, "sighup") == before + 1)
    assert "rg:bob" in up.acl_users()
    ours = acl_user(up, "rg:alice")["passwords"]
    assert len(ours) == 1 and ours[0] not in quiet.log.read_text()  # no password hash in the log
    line = resync_lines(quiet)[-1]
    assert line["reason"] == "sighup" and line["recreated"] == 2
    assert served(quiet) == "rg:alice"


def test_health_check_recreates_without_clients(watched: ProxyProc, own_redis: RedisProc) -> None:
    """Nobody connects: the health check (every second here) finds the mirrors gone after a restart,
    an ACL DELUSER and an ACL LOAD on Redis, and pushes them again."""
    up = upstream(own_redis)
    eventually(lambda: "hc:alice" in up.acl_users())
    for what, lose in (("redis-server restart", own_redis.restart),
                       ("ACL DELUSER hc:alice", lambda: up.execute_command("ACL", "DELUSER", "hc:alice")),
                       ("ACL LOAD", lambda: up.execute_command("ACL", "LOAD"))):  # fmt: skip
        lose()
        assert "hc:alice" not in up.acl_users()
        seconds = eventually(lambda: {"hc:alice", "hc:bob", "hc:default"} <= set(up.acl_users()))
        report(f"{what}, health check (interval 1 s)", seconds)
    m = metrics(watched)
    assert m['redisguard_mirror_resync_total{reason="health"}'] + m['redisguard_mirror_resync_total{reason="reconnect"}'] >= 3
    assert m['redisguard_mirror_resync_total{reason="auth"}'] == 0
    assert served(watched) == "hc:alice"


def test_health_check_after_redis_was_down(watched: ProxyProc, own_redis: RedisProc) -> None:
    """Redis down for longer than a check: the check that sees it back verifies in full (reconnect)."""
    up = upstream(own_redis)
    eventually(lambda: "hc:alice" in up.acl_users())
    before = resyncs(watched, "reconnect")
    own_redis.stop()
    eventually(lambda: metrics(watched)["redisguard_upstream_up"] == 0)
    start = time.monotonic()
    own_redis.start()
    eventually(lambda: resyncs(watched, "reconnect") == before + 1)
    report("redis-server down ~1 s, health check (reconnect)", time.monotonic() - start)
    assert "hc:alice" in up.acl_users()


def test_two_workers_through_a_redis_restart(tmp_path_factory: pytest.TempPathFactory, certs: Path,
                                             own_redis: RedisProc) -> None:  # fmt: skip
    """With [server] workers = 2 each worker verifies on its own (they share the mirror passwords)."""
    d = tmp_path_factory.mktemp("workers")
    (d / "users.acl").write_text(USERS)
    p = start_proxy(d, certs, d / "users.acl", own_redis.port, extra="[server]\nworkers = 2\n",
                    upstream_extra='identity = "mirror"\nmirror_prefix = "w:"\nhealth_check_interval = 0.0')  # fmt: skip
    try:
        eventually(lambda: all(served(p, u) == f"w:{u}" for u in ("alice", "bob")))
        own_redis.restart()
        start = time.monotonic()
        assert [served(p, u) for u in ["alice", "bob"] * 5] == ["w:alice", "w:bob"] * 5  # on both workers
        report("redis-server restart, 10 clients on 2 workers (auth path)", time.monotonic() - start)
        assert metrics(p)['redisguard_mirror_resync_total{reason="auth"}'] >= 1
    finally:
        p.stop()


# -- the service user is never a mirror ---------------------------------------------------------

def test_service_user_inside_the_prefix_is_refused(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    """Service user rg:svc and a redisguard user svc: its mirror would overwrite the service user."""
    (tmp_path / "users.acl").write_text(USERS + "user svc on >svc-pw ~* +@all\n")
    up = upstream(own_redis)
    up.execute_command("ACL", "SETUSER", "rg:svc", "on", ">rg-svc-pw", "~*", "+@all")
    before = up.execute_command("ACL", "GETUSER", "rg:svc")
    cfg = proxy_config(tmp_path, certs, tmp_path / "users.acl", own_redis.port, free_port(), free_port(), free_port(),
                       upstream_extra='identity = "mirror"')  # fmt: skip
    cfg.write_text(cfg.read_text().replace(f'username = "{UPSTREAM_USER}"', 'username = "rg:svc"'))
    (tmp_path / "upstream.pw").write_text("rg-svc-pw\n")
    fix = "the service user 'rg:svc' ([upstream] username) starts with mirror_prefix 'rg:'"
    for cmd in (["check-config", "--skip-bind"], ["serve"]):
        res = subprocess.run([sys.executable, "-m", "redisguard", *cmd, "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr, res.stderr
        (line,) = [x for x in res.stderr.splitlines() if fix in x]
        assert "upstream.mirror_prefix" in line and "choose a mirror_prefix it does not start with" in line
    assert up.execute_command("ACL", "GETUSER", "rg:svc") == before  # the service user was not touched
    up.execute_command("ACL", "DELUSER", "rg:svc")


def test_a_push_never_sets_nor_deletes_the_service_user(tmp_path: Path, certs: Path, own_redis: RedisProc,
                                                        table: CommandTable) -> None:  # fmt: skip
    """Defence in depth behind the refusal: were the service user inside the prefix anyway, neither the
    push of a redisguard user of the same name, nor stale deletion, nor a full verification touches it."""
    import asyncio

    from redisguard.acl import load_users
    from redisguard.config.load import load_config
    from redisguard.upstream.identity import MirrorIdentity

    (tmp_path / "users.acl").write_text(USERS)
    (tmp_path / "more.acl").write_text(USERS + "user svc on >svc-pw ~* +@all\n")
    cfg = proxy_config(tmp_path, certs, tmp_path / "users.acl", own_redis.port, 1, 2, 3,
                       upstream_extra='identity = "mirror"\nmirror_prefix = "u:"')  # fmt: skip
    up = upstream(own_redis)
    up.execute_command("ACL", "SETUSER", "u:svc", "on", ">the-real-one", "~*", "+@all")
    before = up.execute_command("ACL", "GETUSER", "u:svc")
    mirror = MirrorIdentity(load_config(cfg))
    mirror.mirrors.protected |= {"u:svc"}  # as if the service user were u:svc

    async def run() -> bool:
        await mirror.start(load_users(tmp_path / "users.acl", table))  # u:svc looks like a stale mirror
        ok = await mirror.verify("sighup")
        mirror.users_changed(load_users(tmp_path / "more.acl", table))  # ... and like the mirror of user svc
        assert mirror.sync.task is not None
        await mirror.sync.task
        return ok and await mirror.verify("sighup")

    assert asyncio.run(run())
    assert {"u:alice", "u:bob", "u:default", "u:svc"} <= set(up.acl_users())
    assert up.execute_command("ACL", "GETUSER", "u:svc") == before
    up.execute_command("ACL", "DELUSER", "u:alice", "u:bob", "u:default", "u:svc")


def test_mirror_prefix_conflict() -> None:
    assert mirror_prefix_conflict(UpstreamConfig(username="rg:svc", mirror_prefix="rg:"))
    assert mirror_prefix_conflict(UpstreamConfig(username="svc", mirror_prefix="rg:")) is None
    # no username: the service user is Redis's default, which a prefix "def" + user "ault" would mirror
    assert "'default'" in (mirror_prefix_conflict(UpstreamConfig(username="", mirror_prefix="def")) or "")
    assert mirror_prefix_conflict(UpstreamConfig(username="", mirror_prefix="rg:")) is None


# -- pure parts -------------------------------------------------------------------------------------

def test_mirror_identity_refuses_the_conflict_however_the_mode_was_chosen(tmp_path: Path) -> None:
    from redisguard.config.load import load_config
    from redisguard.config.model import ConfigError
    from redisguard.upstream.identity import MirrorIdentity

    (tmp_path / "users.acl").write_text(USERS)
    (tmp_path / "c.toml").write_text('[[listener]]\nname = "p"\ntype = "tcp"\naddress = "127.0.0.1:0"\n'
                                     '[upstream]\nusername = "rg:svc"\n[acl]\nusers_file = "users.acl"\n')  # fmt: skip
    config = load_config(tmp_path / "c.toml")  # service identity: no conflict to speak of
    with pytest.raises(ConfigError, match="starts with mirror_prefix 'rg:'"):
        MirrorIdentity(replace(config, upstream=replace(config.upstream, identity="mirror")))


def test_login_reply_is_one_line_in_any_chunks() -> None:
    import asyncio

    from redisguard.transport.upstream_link import LOGIN_REPLY_MAX, UpstreamProtocol

    async def reply(*chunks: bytes) -> bytes:
        proto = UpstreamProtocol(None)  # type: ignore[arg-type]  # (the client is not reached while logging in)
        proto.login = fut = asyncio.get_running_loop().create_future()
        for c in chunks:
            proto.data_received(c)
        assert proto.login is None
        return await fut

    assert asyncio.run(reply(b"+O", b"K\r", b"\n")) == b"+OK"
    assert asyncio.run(reply(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")).startswith(b"-WRONG")
    with pytest.raises(ConnectionError, match="unexpected reply"):
        asyncio.run(reply(b"+" * (LOGIN_REPLY_MAX + 1)))
