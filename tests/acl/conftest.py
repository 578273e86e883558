"""The ACL tests' oracle, a real redis-server 7.0 of the test module's own, and what compares with it:
a RESP connection that returns each reply's exact bytes, rule strings canonicalised (Redis prints
single-command rules, ``+get +set``, in its command dict's hash order, which changes with each
process's random seed: several of them compare as multisets, see ``canon``), and ``Pair``, which drives
ACL SETUSER on the oracle and on redisguard's users together (``SETUSER_CASES``)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
import redis

from redisguard.acl import User, parse_users
from redisguard.acl.admin import setuser
from redisguard.acl.replies import ACLReplies, acl_list
from redisguard.commands.table import CommandTable
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, RedisProc, start_redis

HASH = "5e884898da28047151d0e56f8dc6292773603d0d6aba4b3fb9e0faa1e9ea3b5f"  # sha256("password")
INITIAL = f"user default on nopass ~* &* +@all\nuser {UPSTREAM_USER} on >{UPSTREAM_PASSWORD} ~* &* +@all -flushall\n"


def reply_end(buf: bytes, i: int) -> int | None:
    """Where the RESP2/RESP3 reply starting at ``buf[i]`` ends, or None if incomplete."""
    eol = buf.find(b"\r\n", i)
    if eol < 0:
        return None
    kind, head, j = buf[i : i + 1], buf[i + 1 : eol], eol + 2
    if kind in b"$=!":
        n = int(head)
        return j if n < 0 else (j + n + 2 if len(buf) >= j + n + 2 else None)
    if kind in b"*~>%|":
        n = int(head) * (2 if kind in b"%|" else 1)
        for _ in range(max(n, 0)):
            end = reply_end(buf, j)
            if end is None:
                return None
            j = end
        return j
    return j  # + - : _ , # (


class Raw:
    """A RESP connection that returns each reply's exact bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def __call__(self, *argv: bytes | str) -> bytes:
        args = [a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in argv]
        self.sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
        while True:
            n = reply_end(self.buf, 0)
            if n is not None:
                out, self.buf = self.buf[:n], self.buf[n:]
                return out
            chunk = self.sock.recv(65536)
            assert chunk, "oracle closed the connection"
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def oracle() -> Iterator[RedisProc]:
    """The test module's own redis-server 7.0, the oracle (its users are the module's to change)."""
    r = start_redis()
    yield r
    r.stop()


@pytest.fixture
def raw(oracle: RedisProc) -> Iterator[Raw]:
    c = Raw(oracle.port)
    c("AUTH", UPSTREAM_USER, UPSTREAM_PASSWORD)
    for line in c("ACL", "USERS").split(b"\r\n")[2::2]:
        if line not in (b"default", UPSTREAM_USER.encode()):
            assert c("ACL", "DELUSER", line) == b":1\r\n"
    assert c("ACL", "SETUSER", "default", "on", "nopass", "~*", "&*", "+@all") == b"+OK\r\n"
    c("ACL", "LOG", "RESET")
    yield c
    c.close()


def initial_users(table: CommandTable) -> dict[str, User]:
    return parse_users(INITIAL, table)


_SINGLE = re.compile(r"^[+-](?!@)")


def canon_rules(text: str) -> str:
    """Single-command rules of each selector as a sorted group (Redis emits them in hash order)."""
    out: list[str] = []
    for group in re.split(r"(\([^)]*\))", text):
        toks = group.strip("()").split(" ")
        singles = sorted(t for t in toks if _SINGLE.match(t))
        rest = [t for t in toks if not _SINGLE.match(t)]
        inner = " ".join(rest + singles)
        out.append(f"({inner})" if group.startswith("(") else inner)
    return "".join(out)


def canon(reply: bytes) -> bytes:
    """A reply with every bulk string's rules canonicalised (lengths are unchanged by reordering)."""

    def fix(m: re.Match[bytes]) -> bytes:
        body = m[2].decode("utf-8", "surrogateescape")
        return m[1] + canon_rules(body).encode("utf-8", "surrogateescape") + b"\r\n"

    return re.sub(rb"(\$\d+\r\n)([^\r\n]*)\r\n", fix, reply)


def same(want: bytes, got: bytes) -> bool:
    return want == got or canon(want) == canon(got)


class Pair:
    """The oracle and our users, driven together."""

    def __init__(self, raw: Raw, table: CommandTable) -> None:
        self.raw, self.table = raw, table
        self.users = initial_users(table)
        self.exact = 0

    def check_views(self, names: list[str]) -> None:
        want = self.raw("ACL", "LIST")
        got = ACLReplies(self.users).acl_list()
        assert got == acl_list(self.users)
        assert same(want, got), f"ACL LIST\n  redis {want!r}\n  ours  {got!r}"
        self.exact += want == got
        replies = ACLReplies(self.users)
        for name in names:
            for resp in (2, 3):
                self.raw("HELLO", str(resp))
                want = self.raw("ACL", "GETUSER", name)
                got = replies.acl_getuser(name.encode("utf-8", "surrogateescape"), resp)
                assert same(want, got), f"GETUSER {name!r} RESP{resp}\n  redis {want!r}\n  ours  {got!r}"
            self.raw("HELLO", "2")

    def setuser(self, *args: bytes | str) -> bytes:
        argv = [a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args]
        want = self.raw("ACL", "SETUSER", *argv)
        before = {n: (u, u.describe(), u.fingerprint) for n, u in self.users.items()}
        new, got = setuser(self.users, self.table, argv)
        assert got == want, f"SETUSER {argv!r}\n  redis {want!r}\n  ours  {got!r}"
        # the given users are never changed; only the named one is a new object
        assert {n: (u, u.describe(), u.fingerprint) for n, u in self.users.items()} == before
        if new is None:
            assert not want.startswith(b"+")
        else:
            name = argv[0].decode("utf-8", "surrogateescape")
            assert set(new) == set(self.users) | {name}
            assert all(new[n] is u for n, u in self.users.items() if n != name)
            assert new[name] is not self.users.get(name)
            self.users = new
        return got


# (name, rules...) — applied in order to one oracle, so later cases build on earlier users.
SETUSER_CASES: list[tuple[str | bytes, ...]] = [
    ("alice",),
    ("alice", "on", ">secret", "~cache:*", "+get"),
    ("alice", "+set", "%R~report:*", "&events:*"),
    ("alice", "%W~report:*"),  # the same pattern again ORs the flags: ~report:*
    ("alice", "%RW~logs:*", "%r~x", "%w~y"),
    ("alice", "-get"),
    ("alice", "+@read", "-@dangerous"),
    ("alice", "+client|info", "-config|set", "+config|get"),
    ("alice", "+select|0", "+select|1"),
    ("alice", "+debug|object"),
    ("alice", "-select|1"),
    ("alice", "+get|a"),
    ("alice", "+@all"),
    ("alice", "-@all", "+@hash", "-hdel"),
    ("alice", "nocommands", "allcommands", "-flushall"),
    ("alice", "allkeys"),
    ("alice", "~more:*"),  # error: a pattern after allkeys
    ("alice", "resetkeys", "~a", "~b", "%R~c"),
    ("alice", "~*"),
    ("alice", "%R~*"),  # error too (allkeys set)
    ("alice", "resetkeys", "%RW~*"),  # a pattern, not the flag
    ("alice", "allchannels"),
    ("alice", "&x"),  # error: a pattern after allchannels
    ("alice", "resetchannels", "&a", "&b", "&a"),
    ("alice", "&*"),
    ("alice", "<secret"),
    ("alice", "<secret"),  # error: no such password
    ("alice", f"#{HASH}", f"#{HASH}", ">other"),
    ("alice", f"!{HASH}"),
    ("alice", f"!{HASH}"),  # error: not there
    ("alice", "#" + HASH.upper()),  # error: uppercase hash
    ("alice", "#abc"),  # error: short hash
    ("alice", "!zz"),
    ("alice", "nopass"),
    ("alice", ">again"),  # clears nopass
    ("alice", "resetpass"),
    ("alice", "off", "skip-sanitize-payload"),
    ("alice", "sanitize-payload", "on"),
    ("alice", "reset"),
    ("alice", "ON", "AllKeys", "+@ALL", "-GET", "~a"),  # keywords are case-insensitive; then an error
    ("alice", "+@nosuch"),
    ("alice", "+nosuch"),
    ("alice", "-nosuch|x"),
    ("alice", "+config|nosuch"),
    ("alice", "+config|get|x"),
    ("alice", "+get|"),
    ("alice", "+client|"),
    ("alice", "+config|get|"),
    ("alice", "bogus"),
    ("alice", "%X~a"),
    ("alice", "%R~"),  # the empty pattern is fine
    ("alice", "%~a"),  # no permission letter
    ("alice", "%RR~a"),
    ("alice", "~a b"),
    ("alice", "&a b"),
    ("alice", ""),  # empty rule: a no-op
    ("bob", "on", "(~a +get)", "(%R~b* +@read -keys)"),
    ("bob", "(~c", "+set)"),  # split over arguments
    ("bob", "(~d", "", "+get", ")"),
    ("bob", "(~e", "(~f", "+get)"),  # a new "(" starts over: "(~e" is dropped
    ("bob", "clearselectors", "()"),
    ("bob", "(~x", "+get"),  # error: unmatched
    ("bob", "on", "(~x ~y"),
    ("bob", "(bogus)"),
    ("bob", "(+get", "bogus)"),
    ("bob", '(~a "b)'),  # sdssplitargs fails on the quote: an empty selector
    ("bob", '("~\\x41" +get)'),  # quoted, with a hex escape: ~A
    ("bob", "('~q r' +get)"),  # a pattern with a space, from quotes: error
    ("bob", '("" ~a)'),  # an empty rule inside a selector is an error
    ("bob", "(~a\t~b)", "(~a\v~b)"),
    ("bob", "(allkeys ~x)"),
    ("bob", "(&* &x)"),
    ("bob", "((~a))"),
    ("bob", "(", ")"),
    ("bob", "("),
    ("bob", "reset", "(~a +get)", "resetpass"),  # reset clears the selectors
    ("bob", "(+@all -@dangerous ~x:* &c)"),
    ("bob", "-@all", "+@keyspace", "+@connection", "-ping"),
    ("bob", "+@all", "-@slow"),
    ("carol", "on", "nopass", "+acl|whoami", "+acl|log", "-acl"),
    ("carol", "+acl", "-acl|setuser"),
    ("carol", "-@all", "+acl|cat|x"),  # no first-arg of a subcommand
    ("carol", "+@all", "-select|1"),
    ("carol", "-@all", "+select|0", "+select|0", "+SELECT|0", "-select"),
    ("default", "off", "resetpass", f"#{HASH}"),
    ("default", "on", "nopass"),
    ("a b",),
    ("a\tb", "on"),
    (b"a\x00b",),
    ("", "on"),  # an empty name is allowed
    (b"\xff\xfe", "on", "~\udce9", "&\udcff", ">\udcff"),  # any bytes
    ("dave", b"bo\r\ngus"),  # CR/LF in the echoed rule become spaces
    ("dave", b"bo\x00gus"),  # the echoed rule stops at a NUL
    ("dave", b"on\x00zz", b"(~a\x00b ~c)", b"~*\x00q", b"+get\x00|x"),  # C-string keyword matching
    ("dave", b"~a\x00b"),  # NUL in a pattern: error
    ("dave", b"\x00abc"),
    ("dave", b"+\xe2\x84\xaaeys"),  # KELVIN SIGN + "eys": not "keys"
    ("dave", "+@all", "allcommands", "-@all", "+@all"),
    ("dave", "(+get", b"x\x00)"),
    ("eve", "on", ">p1", ">p2", ">p1", "<p2", "%R~r:*", "%W~w:*", "~rw:*", "&ch:*", "+@read", "+@write", "-del"),
]


def _conn(r: RedisProc) -> redis.Redis:
    return redis.Redis(port=r.port, username="svc", password="svc-test-password", decode_responses=False)
