"""Scripts never run with more rights than their caller (issue 21 §1), in every identity, by default.

A proxy cannot see inside a script: Redis checks each ``redis.call`` as the connection's user. Service
identity refuses scripts to users narrower than the service user (and refuses to start when the
service user could run what ``[acl] disabled_commands`` refuses); mirror identity — the default where the
service user may manage ACL users — runs them as the caller's mirror, less what redisguard disables.
Against real redis-servers of their own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redisguard.acl import User, new_user
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, covers, decide, dryrun, refused_commands, script_callable, service_may_run
from redisguard.policy.plan import Plan
from redisguard.protocol.resp import encode_command
from redisguard.upstream.mirror_users import mirror_rules
from redisguard.upstream.service import getuser_rules, runnable_refused
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    acl_user,
    free_port,
    proxy_config,
    raw_exchange,
    redis_server_binary,
    start_proxy,
    start_redis,
    upstream_user,
    wait_port,
)

USERS = """\
user default off
user wide on >wide-pw ~* &* +@all
user nodanger on >nodanger-pw ~* &* +@all -@dangerous -flushall
user narrow on >narrow-pw ~u:* +@all -@dangerous
"""
LIB = ("#!lua name=lib\nredis.register_function{function_name='rd', callback=function(keys) return redis.call('GET', keys[1]) "
       "end, flags={'no-writes'}}\nredis.register_function{function_name='sec', callback=function() return "
       "redis.call('GET', 'sec:1') end, flags={'no-writes'}}")
CMD_REFUSED = "The user executing the script can't run this command or subcommand"  # Redis 7.0, from inside a script
KEY_REFUSED = "no permissions to access|can't access at least one of the keys"
REFUSED = "scripts run with the rights of the proxy's service user"


def cmds(*argvs: list[bytes]) -> bytes:
    return b"".join(encode_command(a) for a in argvs)


def login(user: str) -> list[bytes]:
    return [b"AUTH", user.encode(), f"{user}-pw".encode()]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", *args], capture_output=True, text=True, timeout=90)


def check_config(p: ProxyProc, *args: str) -> subprocess.CompletedProcess[str]:
    """check-config on a copy of ``p``'s config with other free ports (``p`` holds its own)."""
    text = p.config.read_text()
    for port in (p.tls_port, p.plain_port, p.metrics_port):
        text = text.replace(f'"127.0.0.1:{port}"', f'"127.0.0.1:{free_port()}"')
    copy = p.config.with_name("check.toml")
    copy.write_text(text)
    return cli("check-config", "-c", str(copy), *args)


def serve(cfg: Path, log: Path) -> ProxyProc:
    """``redisguard serve`` with a config written by proxy_config (its tls, plaintext and metrics ports)."""
    ports = [int(m) for m in re.findall(r'address = "127\.0\.0\.1:(\d+)"', cfg.read_text())]
    proc = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))  # fmt: skip
    p = ProxyProc(proc, ports[0], ports[1], ports[3], cfg, log)
    wait_port(p.plain_port, proc)
    return p


def client(p: ProxyProc, user: str) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username=user, password=f"{user}-pw", decode_responses=True, socket_timeout=10)


def events(p: ProxyProc, name: str) -> list[dict[str, str]]:
    out = []
    for line in p.log.read_text().splitlines():
        if line.startswith("{") and (e := json.loads(line)).get("event") == name:
            out.append(e)
    return out


# -- the rule, pure -----------------------------------------------------------------------------------
def test_covers_compares_what_a_script_can_reach(table: CommandTable) -> None:
    scriptable = script_callable(table)
    assert "flushall" in scriptable and "keys" in scriptable and "get" in scriptable
    assert not {"eval", "config|get", "debug", "module|load", "acl|setuser", "shutdown"} & scriptable  # noscript

    def u(rules: str) -> User:
        return new_user("u", table, rules.split())

    svc = u("~* &* +@all -flushall")
    assert covers(u("~* &* +@all"), svc, ["flushall"], scriptable)  # same as the service user, less FLUSHALL
    noscript = u("~* &* +@all -config|set -config|get -debug -shutdown -module|load")  # what scripts cannot call
    assert covers(noscript, svc, ["flushall"], scriptable)
    assert not covers(u("~* &* +@all -@admin"), svc, ["flushall"], scriptable)  # LASTSAVE, SLOWLOG: script-callable
    assert not covers(u("~* &* +@all"), u("~* &* +@all"), ["flushall"], scriptable)  # the service user can FLUSHALL
    assert not covers(u("~* &* +@all -@dangerous -flushall"), svc, ["flushall"], scriptable)  # KEYS, SWAPDB
    assert not covers(u("~u:* +@all -@dangerous"), svc, [], scriptable)
    assert not covers(u("~* +@all"), svc, ["flushall"], scriptable)  # no channels: PUBLISH in a script
    assert not covers(u("~* &* +@all"), None, ["flushall"], scriptable)  # unknown service user: every right
    assert covers(u("~* &* +@all"), None, [], scriptable)
    narrow_svc = u("~app:* %R~ro:* &ev +@all")
    assert covers(u("~app:* ~ro:* &ev &x +@all"), narrow_svc, [], scriptable)  # same patterns, perms at least
    assert not covers(u("~app:* %W~ro:* &ev +@all"), narrow_svc, [], scriptable)
    assert not covers(u("~ap* ~ro:* &ev +@all"), narrow_svc, [], scriptable)  # patterns compare as text
    assert covers(u("~nothing +get (~* &* +@all)"), narrow_svc, [], scriptable)  # one selector covers it


def test_decide_refuses_scripts_to_narrower_users(table: CommandTable) -> None:
    users = {n: new_user(n, table, r.split()) for n, r in
             (("wide", "on ~* &* +@all"), ("narrow", "on ~u:* +@all -@dangerous"), ("plain", "on ~u:* +get"))}  # fmt: skip
    svc = new_user("svc", table, ["~*", "&*", "+@all", "-flushall"])
    policy = Policy(table, users, frozenset({"flushall"}), service_user=svc)
    evals = ([b"EVAL", b"return 1", b"0"], [b"EVALSHA", b"a" * 40, b"0"], [b"EVAL_RO", b"return 1", b"0"],
             [b"EVALSHA_RO", b"a" * 40, b"0"], [b"FCALL", b"f", b"0"], [b"FCALL_RO", b"f", b"0"],
             [b"FUNCTION", b"LOAD", b"x"], [b"FUNCTION", b"RESTORE", b"x"])  # fmt: skip
    for argv in evals:
        v = decide(policy, users["narrow"], argv, False)
        assert v.reason == "script" and v.error is not None and v.error.startswith(b"-NOPERM this user has no permissions")
        assert b'identity = "mirror"' in v.error and v.error.endswith(b"\r\n") and v.error.count(b"\r\n") == 1
        assert decide(policy, users["wide"], argv, False).error is None
        assert decide(replace_scripts(policy, "allow"), users["narrow"], argv, False).error is None  # the opt-in
    # its own rules first: Redis's refusal, as before
    assert decide(policy, users["plain"], evals[0], False).reason == "command"
    assert decide(policy, users["narrow"], [b"EVAL", b"return 1", b"1", b"sec:1"], False).reason == "key"
    # SCRIPT LOAD runs nothing, FUNCTION LIST/DELETE/FLUSH no code: the user's own rules decide
    for argv in ([b"SCRIPT", b"LOAD", b"return 1"], [b"FUNCTION", b"LIST"], [b"FUNCTION", b"DELETE", b"lib"]):
        assert decide(policy, users["narrow"], argv, False).error is None, argv
    # ACL DRYRUN through redisguard says so in DRYRUN's shape for a denial: a bulk string, Redis's words first
    refusal = dryrun(policy, [b"narrow", b"EVAL", b"return 1", b"0"])
    why = decide(policy, users["narrow"], [b"EVAL", b"return 1", b"0"], False).error
    assert why is not None and refusal.startswith(b"$") and refusal.count(b"\r\n") == 2
    assert refusal.split(b"\r\n")[1] == b"T" + why[len(b"-NOPERM t"):-2]
    assert refusal.split(b"\r\n")[1].startswith(b"This user has no permissions to run the 'eval' command: ")
    assert dryrun(policy, [b"wide", b"EVAL", b"return 1", b"0"]) == b"+OK\r\n"
    # a disabled command is unknown to DRYRUN too, as after rename-command
    assert dryrun(policy, [b"wide", b"FLUSHALL"]) == b"-ERR Command 'FLUSHALL' not found\r\n"
    assert dryrun(policy, [b"wide", b"flushall", b"async"]) == b"-ERR Command 'flushall' not found\r\n"
    # the fast path never forwards a refused script, however often it is asked
    plan = Plan(policy, users["narrow"], "narrow", frozenset())
    for _ in range(3):
        assert plan.allowed([b"EVAL", b"return 1", b"0"]) is None and plan.allowed([b"FCALL_RO", b"f", b"0"]) is None
    assert Plan(policy, users["wide"], "wide", frozenset()).allowed([b"EVAL", b"return 1", b"0"]) is not None


def replace_scripts(policy: Policy, how: str) -> Policy:
    from dataclasses import replace

    return replace(policy, service_scripts=how)


@pytest.mark.parametrize(("rules", "refused", "runs"), [
    ("-flushall", "flushall", False),
    ("-flushall +flushall|async", "flushall", True),  # a first-argument rule
    ("-flushall (~* +flushall|sync)", "flushall", True),  # ... in a selector
    ("-select +select|0", "select", True),
    ("-object +object|encoding", "object", True),  # a subcommand rule of a refused container
    ("-object +object|encoding", "object|freq", False),
    ("-object", "object", False),
])  # fmt: skip
def test_one_answer_to_what_the_service_user_may_run(table: CommandTable, rules: str, refused: str, runs: bool) -> None:
    """The start-up check (runnable_refused) and the scripts rule (covers) ask the same function."""
    svc = new_user("svc", table, ["~*", "&*", "+@all", *rules.split()])
    scriptable = script_callable(table)
    assert (table.acl.family.get(refused, frozenset({refused})) & service_may_run(svc, scriptable) != set()) is runs
    assert runnable_refused(svc, [refused], table) == ([refused] if runs else [])
    # a user with every right but the refused one covers the service user exactly when it cannot run it
    assert covers(new_user("u", table, ["~*", "&*", "+@all"]), svc, [refused], scriptable) is not runs
    assert runnable_refused(None, [refused], table) == [refused]  # unknown: every right


def test_mirror_rules_take_what_redisguard_refuses(table: CommandTable) -> None:
    user = new_user("a", table, ["on", "~a:*", "+@all", "(~b:* +get +flushall)"])
    policy = Policy(table, {}, frozenset({"flushall", "keys", "nosuchcommand"}), enable_debug_command="local")
    refused = refused_commands(policy)
    assert refused == ("flushall", "keys", "module|load", "module|loadex", "module|unload")  # DEBUG: allowed locally
    rules = mirror_rules(user, refused)
    assert rules[-1] == "(~b:* resetchannels -@all +flushall +get -flushall -keys -module|load -module|loadex -module|unload)"
    assert "-flushall" in rules[: rules.index(rules[-1])]  # the root selector too
    assert mirror_rules(user) == [*user.root.describe().split(" "), "(" + user.selectors[1].describe() + ")"]


# -- against Redis: service identity -------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream(own_redis: RedisProc) -> redis.Redis:
    r = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, decode_responses=True)
    r.set("sec:1", "secret")
    r.set("u:1", "mine")
    return r


def _proxy(factory: pytest.TempPathFactory, certs: Path, redis_port: int, name: str, **kw: str) -> ProxyProc:
    d = factory.mktemp(name)
    users = d / "users.acl"
    users.write_text(USERS)
    return start_proxy(d, certs, users, redis_port, None, None, **kw)


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


def test_auto_with_redis_down_reads_the_rights_once_redis_answers(tmp_path: Path, certs: Path) -> None:
    """rt1 j_auto_down: identity = "auto" with Redis down at start is service with unknown rights (every
    right: every script refused). Each worker asks again until Redis answers, then the real rights hold;
    that it would now be mirror is logged (a restart switches)."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    port = free_port()
    p = start_proxy(tmp_path, certs, users, port, upstream_extra='identity = "auto"', extra="[server]\nworkers = 2\n")
    r = None
    try:
        time.sleep(1.5)  # a few retries against no Redis
        r = start_redis(port)
        deadline = time.monotonic() + 60
        while len(events(p, "service_rights_read")) < 2:
            assert time.monotonic() < deadline, p.log.read_text()[-3000:]
            time.sleep(0.2)
        assert all(e["rights"] == "~* &* +@all -flushall" for e in events(p, "service_rights_read"))
        assert len(events(p, "service_rights_unknown")) >= 2 and len(events(p, "upstream_identity_restart_required")) == 2
        redis.Redis(port=port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD).set("sec:1", "secret")
        for _ in range(6):  # connections spread over both workers
            assert client(p, "wide").eval("return redis.call('GET', 'sec:1')", 0) == "secret"
            with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
                client(p, "nodanger").eval("return redis.call('KEYS', '*')", 0)
    finally:
        p.stop()
        if r is not None:
            r.stop()


def test_redis_down_then_a_service_user_that_may_run_a_disabled_command(tmp_path: Path, certs: Path) -> None:
    """Rights read late that start-up would have refused: said in serve's words, and still every right."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    port = free_port()
    p = start_proxy(tmp_path, certs, users, port)  # identity = "service", FLUSHALL disabled
    r = RedisProc(port, [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--user",
                               UPSTREAM_USER, "on", f">{UPSTREAM_PASSWORD}", "~*", "&*", "+@all"])  # fmt: skip
    try:
        r.start()
        deadline = time.monotonic() + 60
        while not events(p, "service_rights_unsafe"):
            assert time.monotonic() < deadline, p.log.read_text()[-3000:]
            time.sleep(0.2)
        (e,) = events(p, "service_rights_unsafe")
        assert e["error"].startswith(f"upstream: the service user '{UPSTREAM_USER}' may run FLUSHALL in Redis")
        assert not events(p, "service_rights_read") and not events(p, "upstream_identity_restart_required")
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            client(p, "wide").eval("return redis.call('FLUSHALL')", 0)
    finally:
        p.stop()
        if r.proc is not None:
            r.stop()


def test_getuser_reply_reads_back(upstream: redis.Redis, table: CommandTable) -> None:
    given = ["~u:*", "%R~r:*", "&ch", "+@all", "-flushall", "(~x +get)"]
    raw = redis.Redis(port=upstream.connection_pool.connection_kwargs["port"], username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    raw.execute_command("ACL", "SETUSER", "probe-u", "reset", *given)
    reply = raw.execute_command("ACL", "GETUSER", "probe-u")
    raw.execute_command("ACL", "DELUSER", "probe-u")
    rules = getuser_rules(reply)
    assert rules == ["+@all", "-flushall", "~u:*", "%R~r:*", "&ch", "(-@all +get ~x)"]
    assert new_user("probe-u", table, rules).describe() == new_user("probe-u", table, given).describe()


# -- the default: asked of Redis ---------------------------------------------------------------------------
def test_default_is_mirror_where_the_service_user_manages_acl_users(
        tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc, upstream: redis.Redis) -> None:  # fmt: skip
    p = _proxy(tmp_path_factory, certs, own_redis.port, "auto", upstream_extra='identity = "auto"',
               extra="[server]\nworkers = 2\n")  # fmt: skip
    try:
        (e,) = events(p, "upstream_identity")  # once, in the process that forks the workers
        assert e["identity"] == "mirror" and "may manage Redis ACL users" in e["why"]
        # every worker is a mirror: connections spread over both
        for _ in range(6):
            assert upstream_user(upstream, client(p, "wide").execute_command("CLIENT", "INFO")) == "rg:wide"
        # the repros now run with the caller's rights: Redis refuses them from inside the script
        wide, nodanger, narrow = client(p, "wide"), client(p, "nodanger"), client(p, "narrow")
        assert "-flushall" in acl_user(upstream, "rg:wide")["commands"]  # disabled here: taken from the mirror
        with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
            wide.eval("return redis.call('FLUSHALL')", 0)
        for script in ("return redis.call('KEYS', '*')", "return redis.call('SWAPDB', 0, 1)"):
            with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
                nodanger.eval(script, 0)
        with pytest.raises(redis.ResponseError, match=KEY_REFUSED):
            narrow.execute_command("EVAL_RO", "return redis.call('GET', 'sec:1')", 0)
        wide.function_load(LIB, replace=True)
        with pytest.raises(redis.ResponseError, match=KEY_REFUSED):
            narrow.execute_command("FCALL_RO", "sec", 0)
        assert narrow.execute_command("FCALL_RO", "rd", 1, "u:1") == "mine"
        assert narrow.execute_command("EVAL_RO", "return redis.call('GET', 'u:1')", 0) == "mine"
        assert upstream.get("sec:1") == "secret"
        res = cli("check-config", "-c", str(p.config), "--skip-bind")
        assert "upstream identity: auto (auto: decided at start-up by asking Redis" in res.stderr
        # a reload that disables one more command takes it from every mirror too
        assert wide.eval("return #redis.call('KEYS', 'sec:*')", 0) == 1
        p.config.write_text(p.config.read_text().replace('disabled_commands = ["FLUSHALL", "CONFIG"]',
                                                         'disabled_commands = ["FLUSHALL", "CONFIG", "KEYS"]'))  # fmt: skip
        os.kill(p.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "-keys" not in acl_user(upstream, "rg:wide")["commands"]:
            assert time.monotonic() < deadline, acl_user(upstream, "rg:wide")
            time.sleep(0.1)
        with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
            client(p, "wide").eval("return redis.call('KEYS', 'sec:*')", 0)
    finally:
        p.stop()


def test_default_is_service_where_the_service_user_cannot(tmp_path: Path, certs: Path, own_redis: RedisProc,
                                                          upstream: redis.Redis) -> None:  # fmt: skip
    # a service user without ACL rights but ACL GETUSER of itself (its rights are read from that)
    upstream.execute_command("ACL", "SETUSER", "plain", "reset", "on", f">{UPSTREAM_PASSWORD}", "~*", "&*", "+@all",
                             "-@admin", "-flushall", "+command|info", "+info", "+acl|getuser")  # fmt: skip
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    cfg = proxy_config(tmp_path, certs, users, own_redis.port, free_port(), free_port(), free_port(),
                       upstream_extra='identity = "auto"')  # fmt: skip
    cfg.write_text(cfg.read_text().replace(f'username = "{UPSTREAM_USER}"', 'username = "plain"'))
    p = serve(cfg, tmp_path / "log")
    try:
        (e,) = events(p, "upstream_identity")
        assert e["identity"] == "service" and "'plain' may not manage Redis ACL users" in e["why"]
        assert upstream_user(upstream, client(p, "wide").execute_command("CLIENT", "INFO")) == "plain"
        assert client(p, "wide").eval("return redis.call('GET', 'sec:1')", 0) == "secret"  # wider than 'plain'
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            client(p, "nodanger").eval("return redis.call('KEYS', '*')", 0)
        res = cli("check-config", "-c", str(cfg), "--skip-bind")
        assert "upstream identity: auto" in res.stderr
        res = check_config(p)
        assert "upstream identity: service (auto: the service user 'plain' may not manage" in res.stderr, res.stdout + res.stderr
    finally:
        p.stop()
        upstream.execute_command("ACL", "DELUSER", "plain")


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
