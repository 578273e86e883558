"""Differential: Redis's glob (stringmatchlen, as its ACL key and channel patterns use it) against both
twins of redisguard's kernel and compile_glob, through ACL DRYRUN on a real Redis 7: every pattern of
a list, random ones, and patterns built to explode."""

from __future__ import annotations

import random

import pytest

from redisguard.acl import check, compile_glob, new_user, stringmatch
from redisguard.commands.table import CommandTable
from tests.acl.conftest import _conn
from tests.helpers import HUGE, KEY_NAMES, PATTERNS, RedisProc
from tests.kernels import TWINS, Kernel


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
