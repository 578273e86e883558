"""ACL SETUSER and DELUSER in redisguard.acl.admin against a real redis-server 7.0: every command is
sent to the oracle and to the pure functions; the replies and the ACL LIST / GETUSER that follow are
compared byte for byte (single-command rules as multisets: see conftest's ``canon``)."""

from __future__ import annotations

from redisguard.acl.admin import deluser
from redisguard.commands.table import CommandTable
from tests.acl.conftest import SETUSER_CASES, Pair, Raw


def test_setuser_matches_redis(raw: Raw, table: CommandTable) -> None:
    pair = Pair(raw, table)
    assert len(SETUSER_CASES) >= 60
    errors = 0
    for case in SETUSER_CASES:
        reply = pair.setuser(*case)
        errors += reply.startswith(b"-")
        name = case[0] if isinstance(case[0], str) else case[0].decode("utf-8", "surrogateescape")
        pair.check_views([name, "default"])
    assert errors >= 30 and len(SETUSER_CASES) - errors >= 40
    assert pair.exact >= len(SETUSER_CASES) // 2  # most LIST replies equal without any reordering


def test_setuser_errors_name_the_rule(raw: Raw, table: CommandTable) -> None:
    pair = Pair(raw, table)
    assert pair.setuser("x", "on", "bogus") == b"-ERR Error in ACL SETUSER modifier 'bogus': Syntax error\r\n"
    assert "x" not in pair.users  # all or nothing: not even created
    assert pair.setuser("x", "on", b"bo\r\ngus") == b"-ERR Error in ACL SETUSER modifier 'bo  gus': Syntax error\r\n"
    assert pair.setuser("x", "(~x", "+get") == b"-ERR Unmatched parenthesis in acl selector starting at '(~x'.\r\n"
    assert pair.setuser("a b") == b"-ERR Usernames can't contain spaces or null characters\r\n"
    assert pair.setuser("x", "~a", "allkeys", "~b") == (
        b"-ERR Error in ACL SETUSER modifier '~b': Adding a pattern after the * pattern (or the 'allkeys' flag) is "
        b"not valid and does not have any effect. Try 'resetkeys' to start with an empty list of patterns\r\n"
    )
    assert pair.setuser("x", "on", ">pw") == b"+OK\r\n"
    assert pair.setuser("x", "off", "<nope") == (
        b"-ERR Error in ACL SETUSER modifier '<nope': The password you are trying to remove from the user does not exist\r\n"
    )
    pair.check_views(["x"])
    assert pair.users["x"].enabled  # the failed "off" was not applied


def test_random_setuser_sequences(raw: Raw, table: CommandTable) -> None:
    import random

    rng = random.Random(7)
    cmds = ["get", "set", "del", "keys", "client|kill", "config|get", "acl", "select|0", "debug|object", "hset"]
    cats = ["read", "write", "hash", "dangerous", "admin", "slow", "fast", "pubsub", "keyspace", "all"]
    atoms = ["on", "off", "nopass", "resetpass", ">pw", "<pw", "reset", "resetkeys", "allkeys", "~k:*", "%R~r*", "%W~w*",
             "&c*", "allchannels", "resetchannels", "clearselectors", "~*", "&*", "bogus", "+nosuch"]  # fmt: skip
    pair = Pair(raw, table)
    for _ in range(120):
        rules: list[str] = []
        for _ in range(rng.randint(0, 5)):
            k = rng.random()
            if k < 0.3:
                rules.append(rng.choice("+-") + rng.choice(cmds))
            elif k < 0.5:
                rules.append(rng.choice("+-") + "@" + rng.choice(cats))
            elif k < 0.6:
                rules.append("(" + " ".join(rng.choice(["~s*", "+get", "-@all", "+@read", "&x", "allkeys"])
                                            for _ in range(rng.randint(1, 3))) + ")")  # fmt: skip
            else:
                rules.append(rng.choice(atoms))
        pair.setuser(rng.choice(["r1", "r2", "r3"]), *rules)
    pair.check_views(["r1", "r2", "r3"])


def test_deluser_matches_redis(raw: Raw, table: CommandTable) -> None:
    pair = Pair(raw, table)
    for name in ("a", "b", "c", "\udcff"):
        pair.setuser(name, "on")
    for argv, deleted in [
        ([b"nosuch"], []),
        ([b"a", b"a", b"nosuch"], ["a"]),
        ([b"default"], None),
        ([b"b", b"default"], None),  # nothing deleted
        ([b"default\x00x"], None),  # strcmp
        ([b"Default", b"B"], []),  # names are case-sensitive
        ([b"b", b"c", b"\xff"], ["b", "c", "\udcff"]),
    ]:
        want = raw("ACL", "DELUSER", *argv)
        new, got, names = deluser(pair.users, argv)
        assert got == want, (argv, want, got)
        if deleted is None:
            assert new is None and got == b"-ERR The 'default' user cannot be removed\r\n"
        else:
            assert new is not None and names == deleted and got == b":%d\r\n" % len(deleted)
            assert all(new[n] is u for n, u in pair.users.items() if n not in deleted)
            pair.users = new
        pair.check_views(["a", "b"])
