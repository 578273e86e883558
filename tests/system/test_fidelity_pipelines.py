"""Protocol fidelity, pipelines: the same byte stream sent straight to Redis (with the same ACL) and
through redisguard must get the same bytes back: deep and mixed pipelines, inline requests, any split
of the stream, RESP3 types, protocol errors, client bytes in error lines, protected commands."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ProxyProc, RedisProc
from tests.system.conftest import LOGIN, cmds, same_as_redis


def test_deep_pipeline_10000_mixed(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    parts = [LOGIN]
    for i in range(10_000):
        k = i % 7
        parts.append(
            [
                [b"SET", b"cache:%d" % i, b"v%d" % i],
                [b"GET", b"cache:%d" % (i - 1)],
                [b"GET", b"secret:%d" % i],  # key denied
                [b"FLUSHALL"],  # command denied
                [b"NOSUCHCMD", b"x"],  # unknown
                [b"GET"],  # arity
                [b"INCR", b"cache:counter"],
            ][k]
        )
    out = same_as_redis(mirror, guarded, cmds(*parts), redis_server)
    assert out.count(b"\r\n-NOPERM") >= 2 * 1428


def test_resp3_types(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        [b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw", b"SETNAME", b"fid"], [b"HSET", b"cache:h", b"f", b"v"],
        [b"HGETALL", b"cache:h"], [b"SADD", b"cache:s", b"a"], [b"SMEMBERS", b"cache:s"],
        [b"ZADD", b"cache:z", b"1.5", b"m"], [b"ZSCORE", b"cache:z", b"m"], [b"GET", b"cache:none"],
        [b"HGETALL", b"secret"], [b"CLIENT", b"GETNAME"], [b"HELLO"], [b"HELLO", b"2"], [b"HGETALL", b"cache:h"],
    )  # fmt: skip
    out = same_as_redis(mirror, guarded, script, redis_server)
    assert b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n" in out and b"~1\r\n" in out and b",1.5\r\n" in out and b"_\r\n" in out


def test_inline_pipeline_and_reset(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = (
        b"AUTH alice alice-pw\r\nSET cache:i 'x y'\r\nGET cache:i\r\nGET secret\r\n\r\nPING\r\n"
        + cmds([b"MULTI"], [b"SET", b"cache:r", b"1"])
        + b'RESET\r\nGET cache:i\r\nAUTH alice alice-pw\r\nEXEC\r\nGET cache:r\r\nECHO "a\\x41"\r\n'
    )
    same_as_redis(mirror, guarded, script, redis_server)


def test_select_blocking_and_misc(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"SELECT", b"3"], [b"SET", b"cache:db3", b"1"], [b"SELECT", b"0"], [b"GET", b"cache:db3"],
        [b"SWAPDB", b"0", b"3"], [b"BLPOP", b"cache:q", b"0.2"], [b"RPUSH", b"cache:q", b"a"],
        [b"BLMOVE", b"cache:q", b"cache:q2", b"LEFT", b"RIGHT", b"0.1"], [b"BLPOP", b"secret:q", b"0.1"],
        [b"BRPOP", b"cache:q2", b"cache:q", b"0.1"], [b"BZPOPMIN", b"cache:z", b"0.1"], [b"ZADD", b"cache:z", b"1", b"m"],
        [b"BZPOPMIN", b"cache:z", b"0.1"],
        [b"XADD", b"cache:x", b"1-1", b"f", b"v"], [b"XREAD", b"BLOCK", b"100", b"STREAMS", b"cache:x", b"0"],
        [b"WAIT", b"0", b"10"], [b"ACL", b"WHOAMI"], [b"ACL", b"DRYRUN", b"alice", b"GET", b"secret"],
        [b"ACL", b"DRYRUN", b"alice", b"GET", b"cache:1"], [b"QUIT"], [b"PING"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server, quiet=1.0)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_split_of_a_pipeline(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc, data: st.DataObject) -> None:
    script = cmds(LOGIN, [b"SET", b"cache:s", b"x" * 300], [b"GET", b"secret"], "GET cache:s\r\n", [b"MULTI"],
                  [b"GET", b"no"], [b"EXEC"], [b"HELLO", b"3"], [b"GET", b"cache:s"])  # fmt: skip
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(script) - 1), max_size=12))))
    same_as_redis(mirror, guarded, script, redis_server, chunks=cuts, quiet=0.3)


def test_protected_commands_answer_as_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """DEBUG and MODULE LOAD are refused before AUTH and ACL, with Redis's text (enable-*-command no)."""
    same_as_redis(mirror, guarded, cmds([b"DEBUG", b"SLEEP", b"0"], [b"MODULE", b"LOAD", b"/x.so"], LOGIN,
                                        [b"DEBUG", b"SLEEP", b"0"], [b"MODULE", b"UNLOAD", b"x"]), redis_server)  # fmt: skip


def test_protocol_error_after_valid_requests_matches_redis(mirror: RedisProc, guarded: ProxyProc,
                                                           redis_server: RedisProc) -> None:  # fmt: skip
    same_as_redis(mirror, guarded, cmds(LOGIN, [b"SET", b"cache:p", b"1"], [b"GET", b"cache:p"]) + b"*x\r\nPING\r\n",
                  redis_server)  # fmt: skip


def test_command_names_fold_ascii_only(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """Redis folds command names in ASCII only: the Kelvin sign in "\u212aEYS" does not make it KEYS."""
    same_as_redis(mirror, guarded, cmds(LOGIN, ["\u212aEYS".encode(), b"*"], [b"CONFIG", "G\u0130T".encode(), b"x"],
                                        [b"gEt", b"cache:x"]), redis_server)  # fmt: skip


@pytest.mark.parametrize("name, script", [(name, script) for name, script in [
    ("protocol error quoting CR", cmds(LOGIN) + b"*1\r\n\r\n"),
    ("protocol error quoting LF", cmds(LOGIN) + b"*1\r\n\n$3\r\n"),
    ("protocol error quoting a high byte", cmds(LOGIN) + b"*1\r\n\xff\r\n"),
    ("ACL DRYRUN naming a user with CR LF and a high byte",
     cmds([b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"DRYRUN", b"\r\n+OK\r\n\xff", b"GET", b"x"])),
    ("ACL DRYRUN naming a command with a NUL", cmds([b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"DRYRUN", b"alice", b"g\0et\r\n"])),
    ("HELLO with an option holding CR LF", cmds([b"HELLO", b"2", b"\r\n:1\r\n"], LOGIN, [b"PING"])),
]], ids=lambda v: v if isinstance(v, str) else "")  # fmt: skip
def test_client_bytes_in_error_lines_match_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc, name: str,
                                                 script: bytes) -> None:  # fmt: skip
    """addReplyErrorFormat: a client's CR or LF inside an error text becomes a space (the error line
    can never end early and fake a reply), a NUL ends the argument, other bytes are sent raw."""
    same_as_redis(mirror, guarded, script, redis_server)
