"""The users file at scale: describe() against a plain port of Redis's algorithm, fingerprints, the
per-load reply cache, refusing a file without a default user, and loading in worker threads.

Pure: no redis-server. No timing assertions (benchmarks/acl_scale.py measures)."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from redisguard.acl import ACLReplies, UsersFileError, load_users, new_user, parse_users
from redisguard.acl.replies import acl_getuser, acl_list, acl_users
from redisguard.acl.user import Selector, User
from redisguard.commands.table import Command, CommandTable
from tests.helpers import random_rules


def reference_describe_commands(sel: Selector) -> str:
    """ACLDescribeSelectorCommandRules as redisguard first wrote it: a walk over the table per step.

    Slow (milliseconds per selector) and obviously Redis's loop; the fast version must match it byte
    for byte."""
    table = sel.table

    def change(bits: set[str], cmd: Command, allow: bool) -> None:
        for name in [cmd.name, *(s.name for s in cmd.subcommands.values())]:
            if allow:
                bits.add(name)
            else:
                bits.discard(name)

    def set_category(bits: set[str], cat: str, allow: bool) -> None:
        for cmd in table.commands.values():
            if cat in cmd.categories:
                change(bits, cmd, allow)
            for sub in cmd.subcommands.values():
                if cat in sub.categories:
                    change(bits, sub, allow)

    def count(bits: set[str], cat: str) -> tuple[int, int]:
        on = off = 0
        for cmd in table.all_commands():
            if cat in cmd.categories:
                if cmd.name in bits:
                    on += 1
                else:
                    off += 1
        return on, off

    additive = not sel.future
    fake: set[str] = set() if additive else {c.name for c in table.all_commands()}
    temp = set(sel.allowed)
    rules = ["-@all" if additive else "+@all"]
    applied: set[str] = set()
    while True:
        best, mindiff, maxsame = None, 2**31, 0
        for cat in table.categories:
            if cat in applied:
                continue
            on, off = count(temp, cat)
            diff, same = (off, on) if additive else (on, off)
            if same > diff and (diff < mindiff or (diff == mindiff and same > maxsame)):
                best, mindiff, maxsame = cat, diff, same
        if best is None:
            break
        set_category(fake, best, additive)
        set_category(temp, best, not additive)
        rules.append(("+@" if additive else "-@") + best)
        applied.add(best)

    def single(cmd: Command) -> None:
        userbit = cmd.name in sel.allowed
        if userbit != (cmd.name in fake):
            rules.append(("+" if userbit else "-") + cmd.name)
            change(fake, cmd, userbit)
        for sub in cmd.subcommands.values():
            single(sub)
        if not userbit:
            rules.extend(f"+{cmd.name}|{arg}" for arg in sel.firstargs.get(cmd.name, ()))

    for cmd in table.commands.values():
        single(cmd)
    return " ".join(rules)


def reference_describe(user: User) -> str:
    def selector(s: Selector) -> str:
        parts = s.key_rules()
        if not s.allchannels:
            parts.append("resetchannels")
        return " ".join([*parts, *s.channel_rules(), reference_describe_commands(s)])

    parts = [*user.flags(), *("#" + h for h in user.passwords), selector(user.root)]
    parts.extend("(" + selector(s) + ")" for s in user.selectors[1:])
    return " ".join(parts)


# A realistic mix for a big users file: the benchmark's own.
from benchmarks.acl_scale import users_text as big_users_text  # noqa: E402

# -- describe ---------------------------------------------------------------------------------------


def test_describe_matches_reference_on_random_rules(table: CommandTable) -> None:
    """The differential test's rule generator (valid rules only), many more users than it sends Redis."""
    rng = random.Random(20261126)
    checked = 0
    for i in range(1500):
        rules = random_rules(rng, table, allow_invalid=False)
        if rng.random() < 0.3:
            rules.insert(1, "+@all")  # describe from a +@all base as well as from -@all
        try:
            user = new_user(f"r{i}", table, rules)
        except Exception:  # noqa: BLE001 - e.g. a key pattern after allkeys: not what this test is about
            continue
        assert user.describe() == reference_describe(user), rules
        for sel in user.selectors:
            for cat in table.categories:
                on = sum(1 for c in table.all_commands() if cat in c.categories and c.name in sel.allowed)
                off = sum(1 for c in table.all_commands() if cat in c.categories) - on
                assert sel.count_category(cat) == (on, off)
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    "rules",
    [
        [],
        ["+@all"],
        ["-@all"],
        ["+@all", "-@all", "+get"],
        ["+@all", "-config|set", "-debug", "+debug|object"],
        ["+select|0", "+select|1", "+get|a"],
        ["+select", "+select|0"],  # first-arg rules under an allowed command are not shown
        ["+@read", "-@slow", "+config|get", "+client", "-client|kill"],
        ["+@all", "-@read", "+@read", "-get"],
        ["allcommands", "nocommands", "+@dangerous", "-@admin", "+@keyspace", "+acl|whoami"],
    ],
)
def test_describe_matches_reference_on_edge_rules(table: CommandTable, rules: list[str]) -> None:
    user = new_user("e", table, ["on", *rules])
    assert user.describe() == reference_describe(user)


def test_describe_is_recomputed_after_a_rule(table: CommandTable) -> None:
    user = new_user("m", table, ["on", "+get"])
    assert user.describe().endswith("-@all +get")
    fp = user.fingerprint
    user.apply("+set")
    assert user.describe() == reference_describe(user)
    assert "+set" in user.describe() and user.fingerprint != fp
    user.apply("+select|0")
    assert "+select|0" in user.describe() and user.describe() == reference_describe(user)


# -- fingerprint ------------------------------------------------------------------------------------


BASE_RULES = ["on", ">pw", "~a:*", "%R~b:*", "&c", "+@read", "-keys", "+config|get", "(~x +set)"]


def test_fingerprint_equal_for_identical_rules(table: CommandTable) -> None:
    a = new_user("a", table, BASE_RULES)
    b = new_user("b", table, BASE_RULES)  # the name is not part of it
    assert a.fingerprint == b.fingerprint
    # Different spellings of the same rules: same canonical form, same fingerprint.
    c = new_user("a", table, ["+@read", "~a:*", "-keys", "%R~b:*", "&c", "+config|get", "#" + _h("pw"), "on", "(~x +set)"])
    assert c.describe() == a.describe() and c.fingerprint == a.fingerprint
    # Loaded from a file (the reload path) the same as built rule by rule.
    users = parse_users("user default off\nuser a " + " ".join(BASE_RULES) + "\n", table)
    assert users["a"].fingerprint == a.fingerprint
    assert len(a.fingerprint) == 64 and int(a.fingerprint, 16) >= 0


def _h(pw: str) -> str:
    return hashlib.sha256(pw.encode()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        ["off"], ["nopass"], [">other"], ["<pw", ">pw2"], ["resetpass"], ["sanitize-payload"],
        ["skip-sanitize-payload"], ["~a:1"], ["%W~b:*"], ["allkeys"], ["resetkeys"], ["&d"], ["allchannels"],
        ["resetchannels"], ["+set"], ["-get"], ["+@write"], ["-@read"], ["+@all"], ["+select|0"], ["+config|set"],
        ["(~y +get)"], ["clearselectors"], ["reset"],
    ],
)  # fmt: skip
def test_fingerprint_differs_for_any_change(table: CommandTable, change: list[str]) -> None:
    a = new_user("a", table, BASE_RULES)
    b = new_user("a", table, BASE_RULES + change)
    assert b.describe() != a.describe()
    assert b.fingerprint != a.fingerprint


def test_fingerprint_sees_switches_describe_folds_together(table: CommandTable) -> None:
    """`%RW~*` prints as `~*` but is a pattern, not allkeys; `+@all -get +get` prints as `+@all` but
    no longer covers commands added later: equal rules print equally, different state differs."""
    a = new_user("a", table, ["on", "nopass", "~*", "+@all"])
    b = new_user("a", table, ["on", "nopass", "%RW~*", "+@all"])
    c = new_user("a", table, ["on", "nopass", "~*", "+@all", "-get", "+get"])
    assert a.describe() == b.describe() == c.describe()
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


# -- the reply cache --------------------------------------------------------------------------------


def test_reply_cache_same_bytes_as_renderers(table: CommandTable) -> None:
    text = big_users_text(200) + "user weird on nopass ~caf\xe9* &\xe9 +get\n"
    users = parse_users(text, table)
    fresh = parse_users(text, table)  # nothing memoized: the reference renders from scratch
    replies = ACLReplies(users).prepare()
    assert replies.acl_users() == acl_users(fresh)
    assert replies.acl_list() == acl_list(fresh)
    assert replies.acl_list() is replies.acl_list()  # built once
    for name in [*users, "nosuch", "\xff"]:
        for resp in (2, 3):
            raw = name.encode("utf-8", "surrogateescape")
            assert replies.acl_getuser(raw, resp) == acl_getuser(fresh, raw, resp), (name, resp)
            assert replies.acl_getuser(raw, resp) == acl_getuser(fresh, raw, resp)  # cached the same
    assert len(replies._getuser) == 2 * len(users)  # unknown names are not cached


def test_reply_cache_is_lazy_without_prepare(table: CommandTable) -> None:
    users = parse_users("user default off\nuser a on nopass +get ~k\n", table)
    replies = ACLReplies(users)
    assert replies._list_reply is None
    assert replies.acl_list() == acl_list(parse_users("user default off\nuser a on nopass +get ~k\n", table))
    assert replies._list_reply is not None


def test_ten_thousand_users_acl_list_equals_uncached_renderer(table: CommandTable, tmp_path: Path) -> None:
    path = tmp_path / "users.acl"
    path.write_text(big_users_text(10_001))
    users = load_users(path, table, require_default=True)
    replies = ACLReplies(users).prepare()
    assert len(users) == 10_001
    fresh = load_users(path, table)
    assert replies.acl_list() == acl_list(fresh)
    assert replies.acl_users() == acl_users(fresh)
    # And the fast describe against the plain port of Redis's loop, on every shape in the file.
    for name in ["default", *(f"u{i}" for i in range(0, 10_000, 97))]:
        assert fresh[name].describe() == reference_describe(fresh[name]), name
        assert users[name].fingerprint == fresh[name].fingerprint


# -- require_default --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n# here\n", "user alice on >pw ~* +@all\n", "user defaults off\n"])
def test_require_default_refuses_files_without_default(table: CommandTable, tmp_path: Path, text: str) -> None:
    path = tmp_path / "users.acl"
    path.write_text(text)
    with pytest.raises(UsersFileError) as e:
        load_users(path, table, require_default=True)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "add `user default off` (or `user default on nopass ...` to keep it open) explicitly" in msg
    # Without the switch: Redis's behaviour, the built-in open default, marked implicit.
    users = load_users(path, table)
    assert users["default"].implicit and users["default"].describe() == "on nopass ~* &* +@all"


@pytest.mark.parametrize("line", ["user default off", "user default on nopass ~* &* +@all", "user default on >pw +@read"])
def test_require_default_accepts_an_explicit_default(table: CommandTable, tmp_path: Path, line: str) -> None:
    path = tmp_path / "users.acl"
    path.write_text(f"# users\nuser alice on >pw ~* +@all\n{line}\n")
    users = load_users(path, table, require_default=True)
    assert not users["default"].implicit
    assert users["default"].describe() == new_user("default", table, line.split()[2:]).describe()


def test_require_default_reports_other_errors_too(table: CommandTable) -> None:
    with pytest.raises(UsersFileError) as e:
        parse_users("user alice on +nosuch\n", table, "u.acl", require_default=True)
    assert "u.acl:1: Error in applying operation '+nosuch': Unknown command or category name in ACL" in str(e.value)
    assert "u.acl: no 'user default' line" in str(e.value)


# -- worker threads ---------------------------------------------------------------------------------


def test_load_users_in_worker_threads(table: CommandTable, tmp_path: Path) -> None:
    """Pure: concurrent loads of the same file (and the replies built with them) agree with a serial
    one. Against other command tables each load reads every line itself (a line read before over the
    same table is that same user: users never change)."""
    path = tmp_path / "users.acl"
    path.write_text(big_users_text(400))

    def load(t: CommandTable) -> tuple[dict[str, User], bytes]:
        users = load_users(path, t, require_default=True)
        return users, ACLReplies(users).prepare().acl_list()

    serial_users, serial_list = load(table)
    tables = [table] * 4 + [CommandTable.snapshot() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(load, tables))
    for t, (users, listing) in zip(tables, results, strict=True):
        assert listing == serial_list
        assert {n: u.fingerprint for n, u in users.items()} == {n: u.fingerprint for n, u in serial_users.items()}
        assert all((users[n] is serial_users[n]) == (t is table) for n in users)
