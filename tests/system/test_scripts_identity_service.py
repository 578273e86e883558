"""Scripts in service identity, against a real redis-server of the module's own: refused to users
narrower than the service user (in order, in MULTI, on the fast path, in ACL DRYRUN), run for wider
ones, or for all with service_scripts = "allow"; serve and check-config refuse a service user that
could run what [acl] disabled_commands refuses; what start-up asks Redis never runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redisguard.acl import new_user
from redisguard.commands.table import CommandTable
from redisguard.protocol.resp import encode_command
from redisguard.upstream.service import getuser_rules
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    free_port,
    proxy_config,
    raw_exchange,
    redis_server_binary,
)
from tests.system.conftest import CMD_REFUSED, LIB, REFUSED, USERS, _proxy, check_config, cli, client


def cmds(*argvs: list[bytes]) -> bytes:
    return b"".join(encode_command(a) for a in argvs)


def login(user: str) -> list[bytes]:
    return [b"AUTH", user.encode(), f"{user}-pw".encode()]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc, upstream: redis.Redis
            ) -> Iterator[ProxyProc]:  # fmt: skip
    p = _proxy(tmp_path_factory, certs, own_redis.port, "service")  # identity = "service", FLUSHALL disabled
    yield p
    p.stop()


def test_service_repros_are_refused(service: ProxyProc, upstream: redis.Redis) -> None:
    nodanger = client(service, "nodanger")
    with pytest.raises(redis.ResponseError, match="unknown command 'FLUSHALL'"):
        nodanger.execute_command("FLUSHALL")
    for script in ("return redis.call('FLUSHALL')", "return redis.call('KEYS', '*')", "return redis.call('SWAPDB', 0, 1)"):
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            nodanger.eval(script, 0)
    assert upstream.get("sec:1") == "secret"  # nothing ran
    narrow = client(service, "narrow")
    with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
        narrow.execute_command("EVAL_RO", "return redis.call('GET', 'sec:1')", 0)
    wide = client(service, "wide")
    assert wide.function_load(LIB, replace=True) == "lib"
    for call in (("FCALL_RO", "rd", 1, "u:1"), ("FCALL", "rd", 1, "u:1"), ("FUNCTION", "LOAD", "REPLACE", LIB)):
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            narrow.execute_command(*call)
    sha = narrow.script_load("return redis.call('GET', 'sec:1')")  # SCRIPT LOAD runs nothing: allowed
    with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
        narrow.evalsha(sha, 0)
    assert narrow.get("u:1") == "mine"  # the rest of its rights are untouched


def test_service_wide_user_still_runs_scripts(service: ProxyProc) -> None:
    wide = client(service, "wide")  # +@all ~* &*: nothing a script as the service user can do is beyond it
    assert wide.eval("return redis.call('GET', 'sec:1')", 0) == "secret"
    assert wide.evalsha(wide.script_load("return redis.call('GET', KEYS[1])"), 1, "u:1") == "mine"
    wide.function_load(LIB, replace=True)
    assert wide.fcall_ro("rd", 1, "sec:1") == "secret"
    # FLUSHALL is disabled here, and the service user cannot run it in Redis either
    with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
        wide.eval("return redis.call('FLUSHALL')", 0)


def test_service_refusal_in_order_in_multi_and_pipelines(service: ProxyProc) -> None:
    got = raw_exchange(service.plain_port, cmds(login("narrow"), [b"GET", b"u:1"], [b"EVAL", b"return 1", b"0"],
                                                [b"GET", b"u:1"], [b"MULTI"], [b"GET", b"u:1"],
                                                [b"FCALL", b"rd", b"1", b"u:1"], [b"EXEC"], [b"GET", b"u:1"]))  # fmt: skip
    refusal = (b"-NOPERM this user has no permissions to run the '%s' command: scripts run with the rights of the "
               b"proxy's service user, which are wider than this user's; use [upstream] identity = \"mirror\"\r\n")  # fmt: skip
    assert got == (b"+OK\r\n$4\r\nmine\r\n" + refusal % b"eval" + b"$4\r\nmine\r\n+OK\r\n+QUEUED\r\n" + refusal % b"fcall"
                   + b"-EXECABORT Transaction discarded because of previous errors.\r\n$4\r\nmine\r\n")  # fmt: skip
    # the same pipeline many times: the per-user plan (fast path) never starts forwarding EVAL
    many = raw_exchange(service.plain_port, cmds(login("narrow"), *([[b"EVAL_RO", b"return 1", b"0"]] * 50)))
    assert many == b"+OK\r\n" + (refusal % b"eval_ro") * 50
    # ACL DRYRUN through redisguard says so too (a string, as Redis's DRYRUN answers a denial)
    wide = client(service, "wide")
    assert REFUSED in wide.execute_command("ACL", "DRYRUN", "narrow", "EVAL", "return 1", "0")
    assert wide.execute_command("ACL", "DRYRUN", "wide", "EVAL", "return 1", "0") == "OK"


def test_dryrun_answers_as_redis_does(service: ProxyProc) -> None:
    """ACL DRYRUN through redisguard, byte for byte against a redis-server whose FLUSHALL is renamed away
    (as [acl] disabled_commands is) and whose user lacks EVAL: the shape of each answer."""
    port = free_port()
    r = RedisProc(port, [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--rename-command", "FLUSHALL", "", "--user", "narrow", "on", "nopass", "~*", "+get",
                               "--user", "default", "on", "nopass", "~*", "&*", "+@all"])  # fmt: skip
    r.start()
    try:
        asks = ([b"ACL", b"DRYRUN", b"default", b"FLUSHALL"], [b"ACL", b"DRYRUN", b"default", b"flushall", b"async"],
                [b"ACL", b"DRYRUN", b"narrow", b"EVAL", b"return 1", b"0"])  # fmt: skip
        redis_says = raw_exchange(port, cmds(*asks))
        ours = raw_exchange(service.plain_port, cmds(login("wide"), *(a[:2] + [b"wide" if a[2] == b"default" else a[2]] + a[3:]
                                                                    for a in asks)))  # fmt: skip
    finally:
        r.stop()
    want = b"-ERR Command 'FLUSHALL' not found\r\n-ERR Command 'flushall' not found\r\n"
    assert redis_says.startswith(want) and ours.startswith(b"+OK\r\n" + want)
    denial = b"This user has no permissions to run the 'eval' command"
    assert redis_says[len(want):] == b"$%d\r\n%s\r\n" % (len(denial), denial)
    text = denial + (b": scripts run with the rights of the proxy's service user, which are wider than this user's; use "
                     b'[upstream] identity = "mirror"')  # fmt: skip
    assert ours[len(b"+OK\r\n" + want):] == b"$%d\r\n%s\r\n" % (len(text), text)


def test_check_config_names_the_refused_users(service: ProxyProc) -> None:
    res = check_config(service)
    assert res.returncode == 0, res.stderr
    assert "upstream identity: service (configured)" in res.stderr
    line = next(w for w in res.stderr.splitlines() if "are refused for" in w)
    assert "'nodanger', 'narrow'" in line and "'wide'" not in line and f"service user '{UPSTREAM_USER}'" in line


def test_service_scripts_allow_restores_the_old_behaviour(tmp_path_factory: pytest.TempPathFactory, certs: Path,
                                                          own_redis: RedisProc, upstream: redis.Redis) -> None:  # fmt: skip
    p = _proxy(tmp_path_factory, certs, own_redis.port, "allow", upstream_extra='service_scripts = "allow"')
    try:
        narrow = client(p, "narrow")
        assert narrow.execute_command("EVAL_RO", "return redis.call('GET', 'sec:1')", 0) == "secret"  # the operator's risk
        res = check_config(p)
        assert res.returncode == 0 and 'service_scripts = "allow": scripts of \'nodanger\', \'narrow\' run with' in res.stderr
    finally:
        p.stop()


def test_refuses_to_start_when_the_service_user_can_run_a_disabled_command(
        tmp_path: Path, certs: Path, own_redis: RedisProc, upstream: redis.Redis) -> None:  # fmt: skip
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    cfg = proxy_config(tmp_path, certs, users, own_redis.port, free_port(), free_port(), free_port(),
                       disabled='["FLUSHALL", "KEYS", "CONFIG", "DEBUG"]')  # fmt: skip
    want = f"ACL SETUSER {UPSTREAM_USER} -keys (and in Redis's ACL file)"
    res = cli("serve", "-c", str(cfg))
    assert res.returncode == 2 and want in res.stderr, res.stderr
    (line,) = [x for x in res.stderr.splitlines() if want in x]  # one line; CONFIG and DEBUG are noscript: not named
    assert line.startswith(f"redisguard: upstream: the service user '{UPSTREAM_USER}' may run KEYS in Redis,")
    res = cli("check-config", "-c", str(cfg))
    assert res.returncode == 1 and f"error: {line.removeprefix('redisguard: ')}" in res.stderr
    try:  # also when it is only in a selector of the service user
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "-keys", "(~* +keys)")
        res = cli("check-config", "-c", str(cfg))
        assert res.returncode == 1 and "may run KEYS in Redis" in res.stderr
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "clearselectors")
        res = cli("check-config", "-c", str(cfg))
        assert res.returncode == 0, res.stderr
    finally:
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "clearselectors", "+keys")


def _serve_and_check(cfg: Path) -> tuple[str, str]:
    """``serve``'s refusal line and check-config's error line for ``cfg`` (both must refuse)."""
    res = cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stderr
    (line,) = [x.removeprefix("redisguard: ") for x in res.stderr.splitlines() if x.startswith("redisguard: upstream:")]
    res = cli("check-config", "-c", str(cfg))
    assert res.returncode == 1, res.stderr
    (error,) = [x.removeprefix("error: ") for x in res.stderr.splitlines() if x.startswith("error: upstream:")]
    return line, error


def test_a_first_argument_rule_for_a_disabled_command_is_refused(
        tmp_path: Path, certs: Path, own_redis: RedisProc, upstream: redis.Redis) -> None:  # fmt: skip
    """rt1 b_firstarg_service: a service user with +flushall|async (FLUSHALL disabled here) could empty the
    database from a script. Read with ACL GETUSER, the rule counts; unreadable, nothing shows FLUSHALL out
    of a script's reach (a MULTI probe cannot: Redis refuses FLUSHALL without ASYNC the same way)."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    cfg = proxy_config(tmp_path, certs, users, own_redis.port, free_port(), free_port(), free_port())
    try:
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "+flushall|async", "-acl|getuser")
        line, error = _serve_and_check(cfg)
        assert line == error and line.startswith(f"upstream: the rights of the service user '{UPSTREAM_USER}' could not "
                                                 f"be read (ACL GETUSER {UPSTREAM_USER}: NOPERM ")  # fmt: skip
        assert "cannot run FLUSHALL in Redis" in line and f"ACL SETUSER {UPSTREAM_USER} +acl|getuser" in line
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "+acl|getuser")
        line, error = _serve_and_check(cfg)
        assert line == error and line.startswith(f"upstream: the service user '{UPSTREAM_USER}' may run FLUSHALL in Redis")
        assert f"ACL SETUSER {UPSTREAM_USER} -flushall (and" in line
        # without a script-callable disabled command, unreadable rights start, counted as every right
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "-acl|getuser")
        cfg.write_text(cfg.read_text().replace('disabled_commands = ["FLUSHALL", "CONFIG"]', 'disabled_commands = ["CONFIG"]'))
        res = cli("check-config", "-c", str(cfg))
        assert res.returncode == 0, res.stderr
        (warning,) = [x for x in res.stderr.splitlines() if "are refused for" in x]
        assert "'nodanger', 'narrow'" in warning and f"ACL SETUSER {UPSTREAM_USER} +acl|getuser lets it read them" in warning
    finally:
        upstream.execute_command("ACL", "SETUSER", UPSTREAM_USER, "-flushall", "+acl|getuser")
    assert upstream.get("sec:1") == "secret"


def test_getuser_reply_reads_back(upstream: redis.Redis, table: CommandTable) -> None:
    given = ["~u:*", "%R~r:*", "&ch", "+@all", "-flushall", "(~x +get)"]
    raw = redis.Redis(port=upstream.connection_pool.connection_kwargs["port"], username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    raw.execute_command("ACL", "SETUSER", "probe-u", "reset", *given)
    reply = raw.execute_command("ACL", "GETUSER", "probe-u")
    raw.execute_command("ACL", "DELUSER", "probe-u")
    rules = getuser_rules(reply)
    assert rules == ["+@all", "-flushall", "~u:*", "%R~r:*", "&ch", "(-@all +get ~x)"]
    assert new_user("probe-u", table, rules).describe() == new_user("probe-u", table, given).describe()


def test_probes_never_run(tmp_path: Path, certs: Path, own_redis: RedisProc, upstream: redis.Redis) -> None:
    """What start-up asks Redis is queued in a MULTI that is discarded, and sent only once the MULTI is."""
    import asyncio
    from dataclasses import replace

    from redisguard.config.load import load_config
    from redisguard.upstream.client import queued

    users = tmp_path / "users.acl"
    users.write_text(USERS)
    config = load_config(proxy_config(tmp_path, certs, users, own_redis.port, free_port(), free_port(), free_port()))
    prober = replace(config, upstream=replace(config.upstream, username="prober"))
    try:
        upstream.execute_command("ACL", "SETUSER", "prober", "reset", "on", f">{UPSTREAM_PASSWORD}", "~*", "+@all")
        assert asyncio.run(queued(prober, [[b"FLUSHALL"], [b"GET", b"x"]], 5)) == [b"QUEUED", b"QUEUED"]
        assert upstream.get("sec:1") == "secret"
        upstream.execute_command("ACL", "SETUSER", "prober", "-multi")  # MULTI refused: nothing else is sent
        assert asyncio.run(queued(prober, [[b"FLUSHALL"]], 5)) is None
        assert upstream.get("sec:1") == "secret"
        with pytest.raises(ValueError):
            asyncio.run(queued(prober, [[b"exec"]], 5))
    finally:
        upstream.execute_command("ACL", "DELUSER", "prober")
