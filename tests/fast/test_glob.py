"""Redis's glob (``stringmatchlen``, util.c 7.0) without a server: known answers, and every fast path
of ``compile_glob`` agreeing with the general matcher. The live comparison with a real Redis is in
test_acl_differential.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.acl import check, compile_glob, new_user, stringmatch
from redisguard.commands.table import CommandTable
from tests.kernels import TWINS, Kernel

HUGE = b"a:" + b"\x00\r\n\xff" * (1 << 18)  # a bit over 1 MB

# (pattern, string, Redis 7.0.15's answer), each read from ACL DRYRUN of a `%R~<pattern>` user.
ORACLE = [
    (b"", b"", True),  # the only pattern that matches the empty string
    (b"", b"a", False),
    (b"", b"\x00", False),
    (b"*", b"", False),  # the main loop never runs: "*" is left over
    (b"**", b"", False),
    (b"***", b"", False),
    (b"a*", b"", False),
    (b"*a", b"", False),
    (b"?", b"", False),
    (b"?*", b"", False),
    (b"[^a]", b"", False),
    (b"\\", b"", False),
    (b"*", b"\x00", True),
    (b"*", b"\r\n", True),
    (b"*", b"\xff", True),
    (b"**", b"\x80", True),
    (b"?", b"\x00", True),
    (b"?", b"\xff", True),
    (b"a*", b"a", True),
    (b"a*", b"a\x00", True),
    (b"a**", b"a", True),
    (b"x", b"x\x00", False),
    (b"[^a]", b"\x00", True),
    (b"[a-c]", b"\xe9", False),  # chars are signed: 0xe9 is below 'a'
    (b"[a-\xc3\xa9]", b"\xe9", True),  # "[a-é]": the range is 0xc3..'a' as signed chars
    (b"[a-\xc3\xa9]", b"\xc3", True),
    (b"[a-\xc3\xa9]", b"\xff", True),
    (b"\xc3\xa9*", b"\xc3\xa9", True),
    (b"\\*", b"*", True),
    (b"a\\", b"a\\", True),
    (b"[\\]]", b"]", True),
    (b"[", b"", False),
]


@pytest.mark.parametrize("kernel", TWINS)
@pytest.mark.parametrize(("pattern", "string", "want"), ORACLE)
def test_known_redis_answers(pattern: bytes, string: bytes, want: bool, kernel: Kernel) -> None:
    assert kernel(pattern, string) is want
    assert stringmatch(pattern, string) is want
    assert compile_glob(pattern)(string) is want


def test_star_does_not_match_the_empty_string() -> None:
    """The bug this file was written for: the "*" fast path said yes to b""."""
    for pattern in (b"*", b"**", b"a*", b"ab*"):
        assert not compile_glob(pattern)(b"")
        assert not stringmatch(pattern, b"")
    assert compile_glob(b"")(b"")


_ALPHABET = [b"a", b"b", b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"\xe9"]
_STRINGS = [b"".join(t) for n in range(3) for t in itertools.product([b"a", b"b", b"\x00", b"\xff", b"*", b"\n"], repeat=n)]


def test_compile_glob_equals_stringmatch_exhaustively() -> None:
    """Every pattern up to 3 symbols (all the fast-path shapes among them) against every short string."""
    checked = 0
    for n in range(4):
        for t in itertools.product(_ALPHABET, repeat=n):
            pattern = b"".join(t)
            fast = compile_glob(pattern)
            for s in _STRINGS:
                assert fast(s) == stringmatch(pattern, s), (pattern, s)
                checked += 1
    assert checked > 30000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8), st.binary(max_size=8))
def test_compile_glob_equals_stringmatch_random(pattern: bytes, string: bytes) -> None:
    assert compile_glob(pattern)(string) == stringmatch(pattern, string)
    assert compile_glob(pattern + b"*")(string) == stringmatch(pattern + b"*", string)


@pytest.mark.parametrize(
    ("pattern", "want"),
    [(b"*", True), (b"**", True), (b"a*", True), (b"a:*", True), (b"b*", False), (b"a", False), (b"", False),
     (b"?", False), (b"*\xff", True), (b"a[:]*", True)],
)  # fmt: skip
@pytest.mark.parametrize("kernel", TWINS)
def test_one_megabyte_name(pattern: bytes, want: bool, kernel: Kernel) -> None:
    assert kernel(pattern, HUGE) is want
    assert stringmatch(pattern, HUGE) is want
    assert compile_glob(pattern)(HUGE) is want


@pytest.mark.parametrize(
    ("rules", "argv", "allowed"),
    [
        (["~*"], [b"GET", b""], True),  # ALLKEYS is a flag: no matching at all
        (["allkeys"], [b"SET", b"", b"1"], True),
        (["%RW~*"], [b"GET", b""], False),  # an ordinary "*" pattern: no empty key
        (["%RW~*"], [b"GET", b"\x00"], True),
        (["%R~*", "%W~*"], [b"GET", b""], False),
        (["%W~*"], [b"SET", b"", b"1"], False),
        (["~**"], [b"GET", b""], False),
        (["~"], [b"GET", b""], True),  # the empty pattern matches only the empty key
        (["~"], [b"GET", b"a"], False),
        (["&*"], [b"PUBLISH", b"", b"m"], True),  # ALLCHANNELS is a flag
        (["&**"], [b"PUBLISH", b"", b"m"], False),
        (["&a*"], [b"PUBLISH", b"", b"m"], False),
        (["&"], [b"PUBLISH", b"", b"m"], True),
        (["&"], [b"SUBSCRIBE", b"a"], False),
        (["&a*"], [b"SUBSCRIBE", b"a\x00"], True),
        (["%RW~a*"], [b"GET", HUGE], True),
        (["%RW~b*"], [b"GET", HUGE], False),
    ],
)
def test_acl_decision_on_edge_names(table: CommandTable, rules: list[str], argv: list[bytes], allowed: bool) -> None:
    """Each verdict as Redis 7.0.15's ACL DRYRUN gives it for a user `on nopass +@all <rules>`."""
    user = new_user("u", table, ["on", "nopass", "+@all", *rules])
    cmd = table.lookup(argv)
    assert cmd is not None
    assert (check(user, cmd, argv) is None) is allowed
