"""Differential: the keys and access flags redisguard takes from a request (the key specs of COMMAND
INFO) against a real Redis 7's COMMAND GETKEYSANDFLAGS, and SORT's BY/GET restriction against what
Redis refuses."""

from __future__ import annotations

import random
from typing import Any

import pytest

from redisguard.acl import check, new_user
from redisguard.commands.table import CommandTable
from tests.helpers import RedisProc, random_argv


class RawConn:
    """A bare RESP2 connection (no client-side reply parsing) for oracle commands."""

    def __init__(self, port: int) -> None:
        import socket

        import hiredis

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()
        self.call(b"AUTH", b"svc", b"svc-test-password")

    def call(self, *argv: bytes) -> Any:
        from redisguard.protocol.resp import encode_command

        self.sock.sendall(encode_command(list(argv)))
        while (reply := self.reader.gets()) is False:
            self.reader.feed(self.sock.recv(1 << 16))
        return reply

    def getkeys(self, argv: list[bytes]) -> list[tuple[bytes, int]]:
        reply = self.call(b"COMMAND", b"GETKEYSANDFLAGS", *argv)
        if isinstance(reply, Exception):
            return []
        return [(k, _need(f)) for k, f in reply]


def _need(flags: list[bytes]) -> int:
    f = {x.decode().lower() for x in flags}
    need = 1 if "access" in f else 0
    if f & {"insert", "delete", "update"}:
        need |= 2
    return need


SPECIAL = [
    "SORT a", "SORT a BY w_* GET # STORE dst", "SORT a LIMIT 0 1 STORE d1 STORE d2", "SORT_RO a BY x",
    "MIGRATE h 6379 a 0 100", "MIGRATE h 6379 \"\" 0 100 COPY AUTH pw KEYS k1 k2",
    "MIGRATE h 1 \"\" 0 1 AUTH2 u p KEYS k1",
    "SET a 1", "SET a 1 GET", "SET a 1 EX 10 get", "BITFIELD a GET u8 0", "BITFIELD a GET u8 0 SET u8 0 1",
    "BITFIELD a OVERFLOW WRAP GET u8 0", "BITFIELD a INCRBY", "BITFIELD_RO a GET u8 0",
    "EVAL s 2 k1 k2 a1", "EVAL s 0", "EVALSHA s 1 k", "FCALL f 1 k a", "ZUNIONSTORE d 2 a b WEIGHTS 1 2",
    "ZUNION 2 a b", "ZINTERCARD 2 a b LIMIT 1", "SINTERCARD 3 a b c", "LMPOP 2 a b LEFT", "BLMPOP 0 1 a LEFT",
    "ZMPOP 1 a MIN", "BZMPOP 0 2 a b MAX", "GEORADIUS a 0 0 1 km STORE d", "GEORADIUS a 0 0 1 km STOREDIST d",
    "GEORADIUSBYMEMBER a m 1 km STORE d", "XREAD COUNT 1 STREAMS a b 0 0", "XREADGROUP GROUP g c STREAMS a 0",
    "XREAD STREAMS a", "RENAME a b", "MSET a 1 b 2", "MEMORY USAGE a", "OBJECT ENCODING a", "LMOVE a b LEFT RIGHT",
    "COPY a b", "SMOVE a b m", "GETEX a PERSIST", "GETDEL a", "EXISTS a b", "TOUCH a", "UNLINK a b", "WATCH a",
    "PFCOUNT a b", "PFMERGE d a b", "BITOP AND d a b", "DEL a b c", "SUNIONSTORE d a b",
    "GEOSEARCHSTORE d s FROMMEMBER m BYRADIUS 1 km",
]  # fmt: skip


@pytest.mark.parametrize("line", SPECIAL)
def test_key_extraction_matches_getkeysandflags(oracle: RedisProc, table: CommandTable, line: str) -> None:
    import shlex

    argv = [a.encode() for a in shlex.split(line)]
    want = RawConn(oracle.port).getkeys(argv)
    from redisguard.commands.table import get_keys

    cmd = table.lookup(argv)
    assert cmd is not None
    got = [(argv[i], need) for i, need in get_keys(cmd, argv)]
    assert sorted(got) == sorted(want)


def test_key_extraction_random_commands(oracle: RedisProc, table: CommandTable) -> None:
    """Every keyed command, random arguments: our keys and access flags equal Redis's."""
    from redisguard.commands.table import get_keys

    rng = random.Random(7)
    raw = RawConn(oracle.port)
    names = [c.name for c in table.all_commands() if c.has_keys and not c.subcommands]
    checked = 0
    for name in names * 12:
        argv = random_argv(rng, table, name)
        want = raw.getkeys(argv)
        cmd = table.lookup(argv)
        assert cmd is not None
        got = [(argv[i], need) for i, need in get_keys(cmd, argv)]
        assert sorted(got) == sorted(want), (argv, got, want)
        checked += 1
    assert checked > 1000


SORT_USERS = {
    "s_all": ["on", "nopass", "~*", "+@all"],
    "s_prefix": ["on", "nopass", "~a*", "+@all"],
    "s_readall": ["on", "nopass", "%R~*", "~a*", "+@all"],
    "s_writeall": ["on", "nopass", "%W~*", "~a*", "+@all"],
    "s_selector": ["on", "nopass", "~a*", "+@all", "(~* +sort)"],
}
SORTS = ["SORT a", "SORT a BY b", "SORT a BY b_*", "SORT a GET #", "SORT a LIMIT 0 1 GET x_*", "SORT_RO a BY w_*",
         "SORT a ALPHA DESC BY nosort", "SORT a STORE a2 GET #", "SORT a BOGUS GET #", "SORT_RO a GET #"]  # fmt: skip


@pytest.mark.parametrize("user", sorted(SORT_USERS))
def test_sort_by_get_restriction_matches_redis(oracle: RedisProc, table: CommandTable, user: str) -> None:
    import shlex

    from redisguard.acl.check import sort_restriction

    rules = SORT_USERS[user]
    raw = RawConn(oracle.port)
    assert raw.call(b"ACL", b"SETUSER", user.encode(), b"reset", *[r.encode() for r in rules]) == b"OK"
    raw.call(b"DEL", b"a")
    raw.call(b"RPUSH", b"a", b"1")
    assert raw.call(b"AUTH", user.encode(), b"x") == b"OK"
    ours = new_user(user, table, rules)
    for line in SORTS:
        argv = [a.encode() for a in shlex.split(line)]
        reply = raw.call(*argv)
        want = b"-" + str(reply).encode() + b"\r\n" if "SORT denied" in str(reply) else None
        cmd = table.lookup(argv)
        assert cmd is not None
        denied = check(ours, cmd, argv)
        got = denied.error if denied else sort_restriction(ours, cmd, argv)
        if got and b"NOPERM" in got:
            assert "NOPERM" in str(reply) or "no permissions" in str(reply), (line, reply)
        else:
            assert got == want, (user, line, reply)
