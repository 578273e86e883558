"""ACL LOG in redisguard.acl.admin against a real redis-server 7.0: the same denials on both, the
replies compared byte for byte (ages and client info scrubbed), grouping, its window, the bound."""

from __future__ import annotations

import re

from redisguard.acl.admin import ACLLog, Context, Reason
from tests.acl.conftest import Raw
from tests.helpers import RedisProc

_VOLATILE = re.compile(rb"(\$11\r\nage-seconds\r\n)(?:\$\d+\r\n|,)[^\r]*\r\n(\$11\r\nclient-info\r\n)\$\d+\r\n[^\r]*\r\n")


def scrub(reply: bytes) -> bytes:
    """Age and client info vary: keep their type marker (bulk or RESP3 double), drop the values."""

    def fix(m: re.Match[bytes]) -> bytes:
        kind = b"$" if m[0][len(m[1]) : len(m[1]) + 1] == b"$" else b","
        return m[1] + kind + b"AGE\r\n" + m[2] + b"$CINFO\r\n"

    return _VOLATILE.sub(fix, reply)


def test_acl_log_matches_redis(raw: Raw, oracle: RedisProc) -> None:
    raw("ACL", "SETUSER", "r", "on", ">p", "~k*", "&ch", "+get", "+publish", "+multi", "+exec", "+eval", "+client|info")
    log = ACLLog()
    c = Raw(oracle.port)
    now = 1000.0

    def denied(reason: Reason, context: Context, obj: bytes | str, user: bytes | str, *argv: bytes | str) -> None:
        reply = c(*argv)
        assert reply.startswith((b"-NOPERM", b"-WRONGPASS", b"-ERR The user executing")), (argv, reply)
        log.add(reason, context, obj, user, "id=1 addr=x cmd=y", now)

    assert c("AUTH", "r", "p") == b"+OK\r\n"
    denied("command", "toplevel", "set", "r", "SET", "x", "1")
    denied("key", "toplevel", b"x", "r", "get", "x")
    denied("key", "toplevel", b"x", "r", "GET", "x")  # grouped: count 2
    denied("channel", "toplevel", b"zz", "r", "PUBLISH", "zz", "m")
    denied("command", "toplevel", "client|kill", "r", "CLIENT", "KILL", "ID", "1")
    denied("command", "toplevel", "client|kill", "r", "client", "kill", "ID", "1")
    assert c("MULTI") == b"+OK\r\n"
    denied("key", "multi", b"y", "r", "GET", "y")
    c("EXEC")
    denied("key", "lua", b"zz", "r", "EVAL", "return redis.call('get','zz')", "0")
    denied("auth", "toplevel", "auth", "r", "auth", "r", "bad")
    denied("auth", "toplevel", "AUTH", "nosuch", "AUTH", "nosuch", "bad")
    denied("auth", "toplevel", "hello", "r", "hello", "3", "auth", "r", "bad")
    denied("auth", "toplevel", "AUTH", "nosuch", "AUTH", "nosuch", "bad2")  # grouped, moved to the head
    c.close()
    for resp in (2, 3):
        raw("HELLO", str(resp))
        for argv in ([], [b"3"], [b"100"], [b"0"], [b"-1"], [b"x"], [b""], [b" 1"], [b"1.0"], [b"+1"], [b"01"],
                     [b"-0"], [b"99999999999999999999"], [b"9223372036854775807"], [b"9223372036854775808"],
                     [b"-9223372036854775808"], [b"1", b"2"]):  # fmt: skip
            want = raw("ACL", "LOG", *argv)
            got = log.reply(argv, resp, now + 1.5)
            assert scrub(got) == scrub(want), (resp, argv, want, got)
            assert got.count(b"age-seconds") == want.count(b"age-seconds")
    raw("HELLO", "2")
    # entry shape: count, reason, context, object, username, age-seconds, client-info (Redis 7.0: 7 fields)
    entry = log.reply([b"1"], 2, now + 1.5)
    assert entry.startswith(b"*1\r\n*14\r\n$5\r\ncount\r\n:2\r\n$6\r\nreason\r\n$4\r\nauth\r\n")
    assert b"$11\r\nage-seconds\r\n$3\r\n1.5\r\n" in entry
    assert b",1.5\r\n" in log.reply([b"1"], 3, now + 1.5)
    assert log.reply([b"1"], 2, now + 0.003).count(b"0.0030000000000000001") == 1  # %.17g, like Redis 7.0
    assert raw("ACL", "LOG", "1", "2") == log.reply([b"1", b"2"], 2, now, b"LOG")
    assert log.reply([b"1", b"2"], 2, now, b"log") == (
        b"-ERR unknown subcommand or wrong number of arguments for 'log'. Try ACL HELP.\r\n"
    )
    assert raw("ACL", "LOG", "ReSeT") == log.reply([b"ReSeT"], 2, now) == b"+OK\r\n"
    assert raw("ACL", "LOG") == log.reply([], 2, now) == b"*0\r\n"


def test_acl_log_grouping_window_and_bounds(raw: Raw, oracle: RedisProc) -> None:
    # Only the 10 newest entries are looked at for grouping; max_len trims the oldest.
    raw("ACL", "SETUSER", "r", "on", ">p", "+get")
    raw("CONFIG", "SET", "acllog-max-len", "12")
    log = ACLLog(max_len=12)
    c = Raw(oracle.port)
    c("AUTH", "r", "p")
    try:
        for cmd in ["set", "del", "incr", "decr", "append", "strlen", "type", "ttl", "exists", "persist", "dump", "set"]:
            c(cmd, "k") if cmd not in ("set", "append") else c(cmd, "k", "v")
            log.add("command", "toplevel", cmd, "r", "ci", 50.0)
        want = raw("ACL", "LOG", "100")
        got = log.reply([b"100"], 2, 50.0)
        assert scrub(got) == scrub(want)
        assert got.count(b"count\r\n:1\r\n") == 12  # the first "set" is beyond the 10 newest: a new entry
        for cmd in ["hset", "lpush", "sadd"]:
            c(cmd, "k", "v", *(["v"] if cmd == "hset" else []))
            log.add("command", "toplevel", cmd, "r", "ci", 50.0)
        assert len(log) == 12 and b"$3\r\ndel\r\n" not in log.reply([b"100"], 2, 50.0)  # the oldest dropped
        assert scrub(log.reply([b"100"], 2, 50.0)) == scrub(raw("ACL", "LOG", "100"))
    finally:
        raw("CONFIG", "SET", "acllog-max-len", "128")
        c.close()
    # the 60 s window (not waited for on the oracle): within it grouped, beyond it a new entry
    log = ACLLog()
    log.add("key", "toplevel", b"k", "u", "c1", 100.0)
    log.add("key", "toplevel", b"k", "u", "c2", 160.0)
    assert len(log) == 1 and log.entries[0].count == 2 and log.entries[0].client_info == b"c2"
    log.add("key", "toplevel", b"k", "u", "c3", 220.001)
    assert len(log) == 2 and log.entries[0].count == 1
    log.add("key", "multi", b"k", "u", "c", 220.0)  # another context: another entry
    log.add("key", "toplevel", b"k", "v", "c", 220.0)  # another user
    assert len(log) == 4
    zero = ACLLog(max_len=0)
    zero.add("auth", "toplevel", "AUTH", "x", "c", 1.0)
    assert len(zero) == 0
