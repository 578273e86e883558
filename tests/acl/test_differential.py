"""Differential tests: the same users loaded into a real Redis 7 and into redisguard must give the
same rule-parsing errors, the same ACL LIST form and the same verdicts (ACL DRYRUN is the oracle)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from redisguard.acl import ACLError, User, check, compile_glob, new_user, stringmatch
from redisguard.acl.replies import ACLReplies
from redisguard.commands.table import CommandTable
from tests.helpers import RedisProc, start_redis
from tests.kernels import TWINS, Kernel

SEED_USERS = 420  # x CASES_PER_USER commands each: >= 20,000 (user, command) verdicts per run
CASES_PER_USER = 90
KEYS = ["a", "ab", "b", "a:1", "b:2", "x", "abc", "a*", "[a]", "k\\"]
# "*" and "**" give %R~*, %W~*, %RW~* (ordinary patterns, unlike the ~* flag); "" gives the empty pattern.
PATTERNS = ["a*", "b*", "a?", "[ab]*", "*1", "x", "a[^b]*", "*:*", "a\\*", "[a-c]?", "k\\\\", "?", "*", "**", "",
            "\u00e9*", "[a-\u00e9]"]  # fmt: skip
CHANNELS = ["c1", "c2", "news.*", "n*", "x", "", "**"]
# Names no ACL pattern can contain but keys and channels can: empty, NUL, CR/LF, bytes >= 0x80.
EDGE_NAMES = [b"", b"\x00", b"a\x00", b"a\x00b", b"\x00a", b"c1\x00", b"\r\n", b"a\r\n", b"\n", b"\r", b"\xff",
              b"\x80a", b"a\xe9", b"\xc3\xa9", b"a:1\xff"]  # fmt: skip
HUGE = b"a:" + b"\x00\r\n\xff" * (1 << 18)  # a 1 MB name
KEY_NAMES = [k.encode() for k in KEYS] + EDGE_NAMES
CHANNEL_NAMES = [c.encode() for c in CHANNELS] + EDGE_NAMES


@pytest.fixture(scope="module")
def oracle() -> Iterator[RedisProc]:
    r = start_redis()
    yield r
    r.stop()


def _conn(r: RedisProc) -> redis.Redis:
    return redis.Redis(port=r.port, username="svc", password="svc-test-password", decode_responses=False)


def random_rules(rng: random.Random, table: CommandTable, allow_invalid: bool) -> list[str]:
    cmds = [c.name for c in table.commands.values()]
    subs = [s.name for c in table.commands.values() for s in c.subcommands.values()]
    rules: list[str] = ["on"]

    def selector_rule() -> str:
        k = rng.random()
        if k < 0.22:
            return rng.choice(["~", "%R~", "%W~", "%RW~"]) + rng.choice(PATTERNS)
        if k < 0.30:
            return "&" + rng.choice(CHANNELS)
        if k < 0.50:
            return rng.choice("+-") + "@" + rng.choice(table.categories)
        if k < 0.72:
            return rng.choice("+-") + rng.choice(cmds)
        if k < 0.80:
            return rng.choice("+-") + rng.choice(subs)
        if k < 0.83:
            return "+" + rng.choice(["select|0", "select|1", "get|a", "debug|object"])
        return rng.choice(["allkeys", "resetkeys", "allchannels", "resetchannels", "+@all", "-@all", "~*", "&*"])

    for _ in range(rng.randint(1, 9)):
        if rng.random() < 0.12:
            rules.append("(" + " ".join(selector_rule() for _ in range(rng.randint(1, 4))) + ")")
        else:
            rules.append(selector_rule())
    if allow_invalid and rng.random() < 0.3:
        rules.insert(rng.randrange(len(rules) + 1), rng.choice([
            "+@nosuch", "+nosuch", "-select|1", "%X~a", "%R~", "~", "#abc", "<nope", "!" + "0" * 64, "bogus",
            "+config|nosuch", "+config|get|x", "+get|", "~a b",
        ]))  # fmt: skip
    return rules


def random_argv(rng: random.Random, table: CommandTable, name: str) -> list[bytes]:
    cmd = table.get(name)
    assert cmd is not None
    argv = [b.encode() for b in name.split("|")]
    want = abs(cmd.arity) if cmd.arity > 0 else abs(cmd.arity) + rng.randint(0, 4)
    while len(argv) < want:
        r = rng.random()
        if r < 0.0004:
            argv.append(HUGE)  # rare: matching a 1 MB name costs our matcher ~0.2 s per leading-* pattern
        elif r < 0.55:
            argv.append(rng.choice(KEY_NAMES))
        elif r < 0.75:
            argv.append(str(rng.randint(0, 3)).encode())
        elif r < 0.85:
            argv.append(rng.choice(CHANNEL_NAMES))
        else:
            argv.append(rng.choice([b"STORE", b"GET", b"BY", b"STREAMS", b"KEYS", b"LIMIT", b"WITHSCORES"]))
    return argv


def dryrun_text(table: CommandTable, user: User, argv: list[bytes]) -> bytes:
    """What ACL DRYRUN says, computed by redisguard (the reply redisguard itself sends)."""
    import hiredis

    from redisguard.policy.decide import Policy, dryrun

    reader = hiredis.Reader()
    # (Redis's ACL alone: as in mirror identity, where redisguard adds no scripts rule of its own)
    reader.feed(dryrun(Policy(table, {user.name: user}, service_scripts="allow"), [user.name.encode(), *argv]))
    reply: bytes = reader.gets()
    return reply


_DENIED_NAME = re.compile(rb"(This user has no permissions to access the ')(.*)(' (?:key|channel))", re.S)


def c_string_name(reply: bytes) -> bytes:
    """The DRYRUN denial text as Redis prints it: the name goes through %s, which stops at a NUL
    (redisguard prints it so too: this only normalizes Redis's side for the comparison)."""
    m = _DENIED_NAME.fullmatch(reply) if isinstance(reply, bytes) else None
    return m[1] + m[2].split(b"\x00")[0] + m[3] if m else reply


def stricter_psubscribe(argv: list[bytes], want: object, got: object) -> bool:
    """Redis compares a PSUBSCRIBE pattern to the ACL channel patterns with strcmp, so `&a` lets
    `PSUBSCRIBE a\\0*` through. redisguard compares all the bytes and refuses: a deliberate divergence,
    only ever in the stricter direction."""
    return (
        argv[0].lower() == b"psubscribe" and any(b"\x00" in a for a in argv[1:]) and want == b"OK"
        and isinstance(got, bytes) and got.endswith(b"' channel")
    )  # fmt: skip


def split_describe(line: str, table: CommandTable) -> tuple[list[str], set[tuple[int, str]]]:
    """ACL LIST form → (everything up to the category rules, single-command rules as a set).

    Redis emits single-command rules in its command dict's hash order, which changes with each
    process's random seed; everything else must match token for token."""
    head: list[str] = []
    singles: set[tuple[int, str]] = set()
    selector = 0
    for tok in line.replace("(", "( ").replace(")", " )").split():
        selector += tok == "("
        if tok[:1] in "+-" and "@" not in tok:
            singles.add((selector, tok))
        else:
            head.append(tok)
    return head, singles


def test_rules_describe_and_verdicts_match_redis(oracle: RedisProc, table: CommandTable) -> None:
    rng = random.Random(20261125)
    r = _conn(oracle)
    all_names = [c.name for c in table.all_commands() if not c.subcommands]
    coverage = list(all_names)
    rng.shuffle(coverage)
    verdicts = mismatches = parse_checked = edge_verdicts = huge_verdicts = nul_texts = stricter = 0
    problems: list[str] = []
    for i in range(SEED_USERS):
        rules = random_rules(rng, table, allow_invalid=True)
        name = f"u{i}"
        try:
            r.execute_command("ACL", "SETUSER", name, *rules)
            redis_err = None
        except redis.ResponseError as e:
            redis_err = str(e)
        try:
            ours = new_user(name, table, rules)
            our_err = None
        except ACLError as e:
            our_err = str(e)
        parse_checked += 1
        if (redis_err is None) != (our_err is None) or (redis_err and redis_err != our_err):
            problems.append(f"rules {rules}: redis={redis_err!r} ours={our_err!r}")
            continue
        if redis_err is not None:
            r.execute_command("ACL", "DELUSER", name)
            continue
        line = (
            r.execute_command("ACL", "GETUSER", name)
            and [x.decode() for x in r.execute_command("ACL", "LIST") if x.decode().startswith(f"user {name} ")][0]
        )
        want_head, want_singles = split_describe(line[len(f"user {name} ") :], table)
        got_head, got_singles = split_describe(ours.describe(), table)
        if (want_head, want_singles) != (got_head, got_singles):
            problems.append(f"describe {rules}:\n  redis {line}\n  ours  user {name} {ours.describe()}")
        pipe = r.pipeline(transaction=False)
        cases = []
        for _ in range(CASES_PER_USER):
            cmd_name = coverage.pop() if coverage else rng.choice(all_names)
            argv = random_argv(rng, table, cmd_name)
            cases.append(argv)
            pipe.execute_command("ACL", "DRYRUN", name, *argv)
        for argv, want in zip(cases, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(want, redis.ResponseError):
                continue  # arity etc.: answered before the ACL check, covered elsewhere
            verdicts += 1
            edge_verdicts += any(a in EDGE_NAMES for a in argv[1:])
            huge_verdicts += HUGE in argv
            got = dryrun_text(table, ours, argv)
            if got != want and c_string_name(got) == want:
                nul_texts += 1
            elif stricter_psubscribe(argv, want, got):
                stricter += 1
            elif got != want:
                mismatches += 1
                show = [a if len(a) < 100 else b"<%d bytes>" % len(a) for a in argv]
                problems.append(f"verdict {rules} {show}: redis={want!r:.300} ours={got!r:.300}")
        r.execute_command("ACL", "DELUSER", name)
    print(f"differential: {parse_checked} rule lists, {verdicts} verdicts ({edge_verdicts} with edge names, "
          f"{huge_verdicts} with a 1 MB name), {mismatches} verdict mismatches; known: {nul_texts} DRYRUN texts "
          f"cut at NUL by Redis, {stricter} PSUBSCRIBE with NUL refused where Redis allows")  # fmt: skip
    assert not coverage, "every command in the table was exercised"
    assert verdicts >= 20000
    assert edge_verdicts >= 2000 and huge_verdicts >= 3
    assert not problems, "\n".join(problems[:30]) + f"\n({len(problems)} problems)"


@pytest.mark.parametrize(
    ("pattern", "string"),
    [
        (p, s)
        for p in PATTERNS + ["a**b", "[", "[a", "a[b-", "\\", "[\\]]", "[z-a]", "*a*b*", "***", "?*", "*?"]
        for s in KEY_NAMES + [b"zz", b"]"]
    ],
)
@pytest.mark.parametrize("kernel", TWINS)
def test_glob_matches_redis_semantics(oracle: RedisProc, pattern: str, string: bytes, kernel: Kernel) -> None:
    """stringmatchlen through ACL: a user with only %R~pattern may GET a key iff the glob matches
    (%R~* is an ordinary pattern, so this also pins down "*" against the empty key); both twins of
    the kernel, and compile_glob over the one in use."""
    r = _conn(oracle)
    r.execute_command("ACL", "SETUSER", "g", "reset", "on", "nopass", "+get", "%R~" + pattern)
    want = r.execute_command("ACL", "DRYRUN", "g", "GET", string) == b"OK"
    assert kernel(pattern.encode(), string) == want
    assert compile_glob(pattern.encode())(string) == want


@pytest.mark.parametrize("kernel", TWINS)
def test_glob_random_patterns_match_redis(oracle: RedisProc, table: CommandTable, kernel: Kernel) -> None:
    """Random patterns against random names (empty, NUL, CR/LF, high bytes, 1 MB), as key patterns
    (%R~p: never the allkeys flag) and channel patterns (&p), through ACL DRYRUN and through ours."""
    rng = random.Random(20261126)
    r = _conn(oracle)
    symbols = ["a", "b", ":", "*", "*", "?", "[", "]", "^", "-", "\\", "\u00e9"]
    units = [b"a", b"b", b":", b"\x00", b"\r", b"\n", b"\xff", b"\x80", b"\xc3", b"\xa9", b"*", b"[", b"]", b"-", b"\\"]
    pipe = r.pipeline(transaction=False)
    cases: list[tuple[bytes, list[bytes], bool | None]] = []
    for i in range(400):
        pattern = "".join(rng.choice(symbols) for _ in range(rng.randint(0, 6)))
        rules = ["on", "nopass", "+get", "+publish", "%R~" + pattern, "&" + pattern]
        user = new_user("g", table, rules)
        pipe.execute_command("ACL", "SETUSER", "g", "reset", *rules)
        cases.append((b"", [], None))
        names = [b"".join(rng.choice(units) for _ in range(rng.randint(0, 5))) for _ in range(10)] + [b""]
        if i < 3:
            names.append(HUGE)
        for name in names:
            for argv in ([b"GET", name], [b"PUBLISH", name, b"m"]):
                cmd = table.lookup(argv)
                assert cmd is not None
                pipe.execute_command("ACL", "DRYRUN", "g", *argv)
                cases.append((pattern.encode(), argv, check(user, cmd, argv) is None))
        for name in names:
            pipe.execute_command("ACL", "DRYRUN", "g", "GET", name)
            cases.append((pattern.encode(), [b"kernel", name], kernel(pattern.encode(), name)))
        key = names[0]
        assert compile_glob(pattern.encode())(key) == stringmatch(pattern.encode(), key)
    problems = []
    for (glob, argv, ours), reply in zip(cases, pipe.execute(), strict=True):
        if ours is None:
            assert reply == b"OK"  # the SETUSER
        elif (reply == b"OK") != ours:
            problems.append(f"pattern {glob!r} {argv[0]!r} {argv[1][:40]!r}: redis={reply[:80]!r} ours allow={ours}")
    assert not problems, "\n".join(problems[:30]) + f"\n({len(problems)} problems)"


@pytest.mark.parametrize("kernel", TWINS)
@pytest.mark.parametrize(
    ("pattern", "string"),
    [
        *[(b"a*" * n, b"a" * 2100) for n in (1000, 1001, 1002, 1003)],  # the nesting limit
        (b"a*" * 1001 + b"b", b"a" * 2100),
        (b"*a*a*a*a*a*a*a*a*a*b", b"a" * 5000),  # exponential without skipLongerMatches
        (b"*a*a*a*a*a*a*a*a*a*a", b"a" * 5000),
        (b"*a*b*a*b*a*b*c", b"ab" * 3000),
        (b"*[a-c]*[^x]*?*\\**z", b"abc" * 2000),
        (b"*:p0:*", b":" * 5000 + b"p0:"),
        (b"*:p0:*", b":" * 5000 + b"p0"),
        (b"*\xff\x80*", b"\x80\xff" * 2000 + b"\xff\x80\xff"),
    ],
)
def test_adversarial_globs_match_redis(oracle: RedisProc, pattern: bytes, string: bytes, kernel: Kernel) -> None:
    """Patterns built to explode and the nesting limit (CVE-2022-36021), as Redis 7.0.15 answers them."""
    r = _conn(oracle)
    r.execute_command("ACL", "SETUSER", "adv", "reset", "on", "nopass", "+get", b"%R~" + pattern)
    for name in (string, string[:-1], string + b"z"):
        want = r.execute_command("ACL", "DRYRUN", "adv", "GET", name) == b"OK"
        assert kernel(pattern, name) is want, (pattern[:40], len(name))
        assert compile_glob(pattern)(name) is want
    r.execute_command("ACL", "DELUSER", "adv")


def test_psubscribe_with_nul_is_stricter_than_redis(oracle: RedisProc, table: CommandTable) -> None:
    """The one known verdict divergence on odd names (see stricter_psubscribe): Redis's strcmp stops at
    the NUL and allows, redisguard compares every byte and refuses. Everything else here is Redis's."""
    r = _conn(oracle)
    rules = ["on", "nopass", "+@all", "&a", "&b*"]
    r.execute_command("ACL", "SETUSER", "ps", "reset", *rules)
    ours = new_user("ps", table, rules)
    for argv, redis_allows, we_allow in [
        ([b"PSUBSCRIBE", b"a\x00*"], True, False),
        ([b"PSUBSCRIBE", b"b*\x00"], True, False),
        ([b"PSUBSCRIBE", b"a"], True, True),
        ([b"PSUBSCRIBE", b"\x00"], False, False),
        ([b"SUBSCRIBE", b"a\x00"], False, False),  # plain channels are glob-matched on all their bytes
        ([b"SUBSCRIBE", b"b\x00"], True, True),
    ]:
        assert (r.execute_command("ACL", "DRYRUN", "ps", *argv) == b"OK") is redis_allows, argv
        cmd = table.lookup(argv)
        assert cmd is not None
        assert (check(ours, cmd, argv) is None) is we_allow, argv


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


def _families(rules: str, table: CommandTable) -> list[list[tuple[str, int]]]:
    """Per selector of an ACL LIST / GETUSER rule string: each command family's single rules in the order
    given, as (family, kind) with kind 0 the container's own rule, 1 a subcommand's, 2 a first-arg's.
    Redis walks its command dict (and each container's subcommand dict) in hash order, which its random
    seed changes with each process: only this order within a family is fixed — the container's rule,
    then its subcommands', then its first-arg rules (ACLDescribeSelectorCommandRulesSingleCommands)."""
    out = []
    for group in re.split(r"(\([^)]*\))", rules):
        seq = []
        for tok in group.strip("()").split():
            if tok[:1] in "+-" and "@" not in tok:
                name, _, arg = tok[1:].partition("|")
                container = table.get(name)
                kind = 0 if not arg else 1 if container is not None and container.subcommands else 2
                seq.append((name, kind))
        out.append(sorted(seq, key=lambda t: t[0]))  # (a stable sort: each family keeps its own order)
    return out


def test_container_subcommand_rules_describe_as_redis(oracle: RedisProc, table: CommandTable) -> None:
    """Random rules heavy in container subcommands (+object|freq, -config|set, client|, acl|, xinfo|,
    memory|, ...): ACL GETUSER (RESP2 and RESP3) and ACL LIST as Redis gives them, byte for byte once
    the hash-ordered single rules are sorted, and in Redis's order within each command family."""
    from tests.acl.test_admin import Raw, canon_rules, same

    rng = random.Random(20261203)
    containers = [c for c in table.commands.values() if c.subcommands]
    picked = [c for c in containers if c.name in ("object", "config", "client", "acl", "xinfo", "memory")]
    raw = Raw(oracle.port)
    raw("AUTH", "svc", "svc-test-password")
    compared = with_subs = 0
    for i in range(150):
        def rule() -> str:
            c = rng.choice(picked if rng.random() < 0.7 else containers)
            k = rng.random()
            if k < 0.6:
                return rng.choice("+-") + rng.choice([s.name for s in c.subcommands.values()])
            if k < 0.75:
                return rng.choice("+-") + c.name
            if k < 0.85:
                return rng.choice("+-") + rng.choice(["get", "set", "select", "@read", "@admin", "@slow", "@dangerous"])
            return rng.choice(["+@all", "-@all", "+select|0"])

        rules = ["on", *(rule() for _ in range(rng.randint(2, 10)))]
        if rng.random() < 0.2:
            rules.append("(" + " ".join(rule() for _ in range(rng.randint(1, 5))) + ")")
        name = f"s{i}"
        assert raw("ACL", "SETUSER", name, *rules) == b"+OK\r\n", rules
        users = {name: new_user(name, table, rules)}
        replies = ACLReplies(users)
        for resp in (2, 3):
            raw("HELLO", str(resp))
            want, got = raw("ACL", "GETUSER", name), replies.acl_getuser(name.encode(), resp)
            assert same(want, got), f"GETUSER RESP{resp} {rules}\n  redis {want!r}\n  ours  {got!r}"
        raw("HELLO", "2")
        line = next(x for x in raw("ACL", "LIST").decode().split("\r\n") if x.startswith(f"user {name} "))
        ours = next(x for x in replies.acl_list().decode().split("\r\n") if x.startswith(f"user {name} "))
        assert canon_rules(line) == canon_rules(ours), f"{rules}\n  redis {line}\n  ours  {ours}"
        assert _families(line, table) == _families(ours, table), f"{rules}\n  redis {line}\n  ours  {ours}"
        with_subs += "|" in ours
        compared += 1
        raw("ACL", "DELUSER", name)
    raw.close()
    assert compared == 150 and with_subs >= 100
