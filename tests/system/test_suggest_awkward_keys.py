"""`acl suggest` for keys and channels a users-file rule cannot carry as they are (a space, a quote, NUL,
non-ASCII): narrow patterns that match them (``?`` for each such byte, never ``*``), and a file that a
real redis-server loads (ACL LOAD) and redisguard loads, allowing the same requests as Redis does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redisguard.acl.glob import compile_glob
from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.observe.least_privilege import suggest_file
from redisguard.observe.profile import TrafficProfile, key_pattern, rule_safe
from redisguard.policy.decide import Policy, decide
from tests.helpers import RedisProc, start_redis

AWKWARD = [b"a b", b'x"y', b"\x00k", b"\xe9t", b"it's", b"\xc3\xa9t\xc3\xa9:1", b"sp ace:x", b"\r\n" * 40]
UNRELATED = [b"zz", b"ab", b"other:1", b"k", b"\xe9", b"t"]


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProc, Path]]:
    aclfile = tmp_path_factory.mktemp("aclredis") / "users.acl"
    r = start_redis(aclfile=aclfile)
    yield r, aclfile
    r.stop()


def _acl_load(acl_redis: tuple[RedisProc, Path], suggested: str) -> redis.Redis:
    """The suggestion (with Redis's own service and default lines) given to a real redis-server."""
    r, aclfile = acl_redis
    service, default = aclfile.read_text().splitlines()[:2]
    aclfile.write_text(f"{service}\n{default}\n{suggested}")
    c = redis.Redis(port=r.port)
    assert c.execute_command("ACL", "LOAD") == b"OK"
    return c


def _redis_allows(c: redis.Redis, *argv: bytes) -> bool:
    try:
        return bool(c.execute_command("ACL", "DRYRUN", "app", *argv) == b"OK")
    except redis.ResponseError as e:
        assert "permissions" in str(e), e
        return False


def test_awkward_keys_get_narrow_patterns_that_match_them() -> None:
    for key in AWKWARD:
        pattern = key_pattern(key)
        assert rule_safe(pattern) and pattern != b"*" and compile_glob(pattern)(key), (key, pattern)
    assert key_pattern(b"a b") == b"a?b" and key_pattern(b"\x00k") == b"?k" and key_pattern(b"\xe9t:1") == b"?t:*"
    assert key_pattern(b'"zz +@all"') == b"?zz?+@all?"  # still one token: never a rule of its own
    assert not any(compile_glob(key_pattern(k))(u) for k in AWKWARD for u in UNRELATED)


def test_suggestion_loads_in_redis_and_redisguard_and_both_allow_the_same(
        acl_redis: tuple[RedisProc, Path], table: CommandTable) -> None:  # fmt: skip
    prof = TrafficProfile()
    get, setc, sub, psub = (table.get(n) for n in ("get", "set", "subscribe", "psubscribe"))
    assert get and setc and sub and psub
    for key in AWKWARD:
        prof.record("app", get, [b"get", key], [(1, 1)], [])
    prof.record("app", setc, [b"set", b"\xe9t", b"v"], [(1, 2)], [])
    prof.record("app", sub, [b"subscribe", b"news flash"], [], [(1, False)])
    prof.record("app", psub, [b"psubscribe", b"n\xe9ws*"], [], [(1, True)])  # no rule can carry it but &*
    prof.record("app", sub, [b"subscribe", b"plain"], [], [(1, False)])
    text = suggest_file(prof, None)
    assert "~*" not in text.split() and "%R~*" not in text.split()

    users = parse_users("user default on nopass ~* &* +@all\n" + text, table)  # redisguard loads it
    policy = Policy(table, users)
    c = _acl_load(acl_redis, text)  # ... and so does Redis
    try:
        assert c.execute_command("ACL", "GETUSER", "app") is not None
        for argv in ([b"get", k] for k in AWKWARD + UNRELATED):
            ours = decide(policy, users["app"], argv, False, dry=True).error is None
            assert ours == _redis_allows(c, *argv) == (argv[1] in AWKWARD), argv
        assert _redis_allows(c, b"set", b"\xe9t", b"v") and not _redis_allows(c, b"set", b"a b", b"v")
        assert _redis_allows(c, b"psubscribe", b"n\xe9ws*")
        assert _redis_allows(c, b"subscribe", b"news flash")
    finally:
        c.close()


def test_a_star_next_to_other_patterns_is_one_loadable_rule(acl_redis: tuple[RedisProc, Path],
                                                            table: CommandTable) -> None:  # fmt: skip
    """``*`` (keys collapsed, or an edited file) beside other patterns: Redis refuses any pattern after
    ``~*`` / ``&*``, and what ``*`` allows needs no other rule."""
    prof = TrafficProfile.from_json({"format": 1, "users": {"app": {
        "commands": {"get": 3, "set": 1, "subscribe": 1},
        "keys": {"*": "readwrite", "cache:*": "read", "counter": "write"},
        "channels": ["*", "news"], "uses": {"get": ["*", "cache:*"]}},
        "ro": {"commands": {"get": 1, "set": 1}, "keys": {"*": "read", "cache:*": "read", "jobs:*": "write"}}}})
    text = suggest_file(prof, None)
    line = dict((ln.split()[1], ln.split()) for ln in text.splitlines())
    assert [r for r in line["app"] if "~" in r or "&" in r] == ["~*", "&*"]
    assert [r for r in line["ro"] if "~" in r] == ["%R~*", "%W~jobs:*"]
    parse_users("user default on nopass ~* &* +@all\n" + text, table)
    c = _acl_load(acl_redis, text)
    try:
        assert _redis_allows(c, b"set", b"anything", b"v")
    finally:
        c.close()
