"""The fast path (fastpath.Plan) never allows what ``decide`` would not, and it is taken for the
common requests (else the proxy silently loses its speed)."""

from __future__ import annotations

import os
import random

from redisguard.acl import ACLError, new_user
from redisguard.acl.user import printable_name
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, decide
from redisguard.session.machine import Session
from tests.helpers import random_argv, random_rules

USERS = int(os.environ.get("REDISGUARD_FASTPATH_USERS", "1500"))
SPECIAL = Session.special


def _mutate(rng: random.Random, argv: list[bytes]) -> list[bytes]:
    r = rng.random()
    if r < 0.15 and len(argv) > 1:
        return argv[:-1]  # wrong arity, often
    if r < 0.3:
        return [*argv, b"extra"]
    if r < 0.45:  # any spelling of the name
        return [bytes(c ^ 0x20 if chr(c).isalpha() and rng.random() < 0.5 else c for c in argv[0]), *argv[1:]]
    if r < 0.5:
        return [argv[0].upper(), *argv[1:]]
    return argv


def test_fast_path_agrees_with_decide(table: CommandTable) -> None:
    rng = random.Random(20261125)
    names = [c.name for c in table.commands.values()] + [s.name for c in table.commands.values()
                                                         for s in c.subcommands.values()]  # fmt: skip
    common = ["get", "set", "mget", "incr", "hset", "lpush", "del", "exists", "expire", "zadd", "ping", "echo"]
    fast = allowed = 0
    for n in range(USERS):
        try:
            user = new_user(f"u{n}", table, random_rules(rng, table, allow_invalid=False))
        except ACLError:
            continue
        disabled = frozenset(rng.sample(["keys", "flushall", "config", "get", "debug"], rng.randint(0, 2)))
        policy = Policy(table, {user.name: user}, disabled, enable_debug_command=rng.choice(["no", "yes"]))
        plan = policy.plan(user, SPECIAL)
        for _ in range(60):
            name = rng.choice(common) if rng.random() < 0.5 else rng.choice(names)
            argv = _mutate(rng, random_argv(rng, table, name))
            label = plan.allowed(argv)
            verdict = decide(policy, user, argv, False)
            if verdict.error is None:
                allowed += 1
            if label is None:
                continue
            fast += 1
            assert verdict.error is None, (user.describe(), argv, verdict)
            assert verdict.name not in SPECIAL and label == (printable_name(user.name), verdict.name)
        assert len(plan.entries) <= 2 * len(table.commands)  # spellings are folded: bounded
    assert allowed > 1000 and fast > allowed // 3, (fast, allowed)


def test_common_requests_take_the_fast_path(table: CommandTable) -> None:
    user = new_user("app", table, ["on", "~cache:*", "%R~report:*", "+@all", "-@dangerous"])
    policy = Policy(table, {"app": user})  # (it keeps its plans; a plan asks it while it is in force)
    plan = policy.plan(user, SPECIAL)
    for argv in ([b"GET", b"cache:1"], [b"get", b"report:9"], [b"SET", b"cache:1", b"v", b"EX", b"10"],
                 [b"MGET", b"cache:1", b"report:2"], [b"PING"], [b"HSET", b"cache:h", b"f", b"v"]):  # fmt: skip
        assert plan.allowed(argv) is not None, argv
    for argv in ([b"SET", b"report:1", b"v"], [b"GET", b"other"], [b"GET"], [b"FLUSHALL"], [b"AUTH", b"x"],
                 [b"SUBSCRIBE", b"c"], [b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"SORT", b"cache:l", b"BY", b"x"],
                 [b"SET", b"report:1", b"v", b"GET"], [b"nosuch"]):  # fmt: skip
        assert plan.allowed(argv) is None, argv


def test_a_derived_policy_never_reuses_the_old_plans(table: CommandTable) -> None:
    """Policies are swapped whole (dataclasses.replace): the copy must decide with its own switches."""
    from dataclasses import replace

    user = new_user("app", table, ["on", "~*", "+@all"])
    policy = Policy(table, {"app": user})
    assert policy.plan(user, SPECIAL).allowed([b"GET", b"k"]) is not None
    disabled = replace(policy, disabled=frozenset({"get"}))
    assert disabled.plan(user, SPECIAL).allowed([b"GET", b"k"]) is None


def test_plan_entries_stay_bounded_with_unknown_names(table: CommandTable) -> None:
    user = new_user("weak", table, ["on", "nopass", "-@all"])
    policy = Policy(table, {"weak": user})  # (it keeps its plans; a plan asks it while it is in force)
    plan = policy.plan(user, Session.special)
    for i in range(5000):
        plan.allowed([b"nosuch%d" % i])
        plan.allowed([b"NOSUCH%d" % i])
    assert len(plan.entries) <= 2 * len(table.commands)
