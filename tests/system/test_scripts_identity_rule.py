"""Scripts never run with more rights than their caller (issue 21 §1), the rule, pure: what a script
can reach (covers), decide refusing scripts to users narrower than the service user, one answer to what
the service user may run, and the rules of a mirror user."""

from __future__ import annotations

import pytest

from redisguard.acl import User, new_user
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, covers, decide, dryrun, refused_commands, script_callable, service_may_run
from redisguard.policy.plan import Plan
from redisguard.upstream.mirror_users import mirror_rules
from redisguard.upstream.service import runnable_refused


def test_covers_compares_what_a_script_can_reach(table: CommandTable) -> None:
    scriptable = script_callable(table)
    assert "flushall" in scriptable and "keys" in scriptable and "get" in scriptable
    assert not {"eval", "config|get", "debug", "module|load", "acl|setuser", "shutdown"} & scriptable  # noscript

    def u(rules: str) -> User:
        return new_user("u", table, rules.split())

    svc = u("~* &* +@all -flushall")
    assert covers(u("~* &* +@all"), svc, ["flushall"], scriptable)  # same as the service user, less FLUSHALL
    noscript = u("~* &* +@all -config|set -config|get -debug -shutdown -module|load")  # what scripts cannot call
    assert covers(noscript, svc, ["flushall"], scriptable)
    assert not covers(u("~* &* +@all -@admin"), svc, ["flushall"], scriptable)  # LASTSAVE, SLOWLOG: script-callable
    assert not covers(u("~* &* +@all"), u("~* &* +@all"), ["flushall"], scriptable)  # the service user can FLUSHALL
    assert not covers(u("~* &* +@all -@dangerous -flushall"), svc, ["flushall"], scriptable)  # KEYS, SWAPDB
    assert not covers(u("~u:* +@all -@dangerous"), svc, [], scriptable)
    assert not covers(u("~* +@all"), svc, ["flushall"], scriptable)  # no channels: PUBLISH in a script
    assert not covers(u("~* &* +@all"), None, ["flushall"], scriptable)  # unknown service user: every right
    assert covers(u("~* &* +@all"), None, [], scriptable)
    narrow_svc = u("~app:* %R~ro:* &ev +@all")
    assert covers(u("~app:* ~ro:* &ev &x +@all"), narrow_svc, [], scriptable)  # same patterns, perms at least
    assert not covers(u("~app:* %W~ro:* &ev +@all"), narrow_svc, [], scriptable)
    assert not covers(u("~ap* ~ro:* &ev +@all"), narrow_svc, [], scriptable)  # patterns compare as text
    assert covers(u("~nothing +get (~* &* +@all)"), narrow_svc, [], scriptable)  # one selector covers it


def test_decide_refuses_scripts_to_narrower_users(table: CommandTable) -> None:
    users = {n: new_user(n, table, r.split()) for n, r in
             (("wide", "on ~* &* +@all"), ("narrow", "on ~u:* +@all -@dangerous"), ("plain", "on ~u:* +get"))}  # fmt: skip
    svc = new_user("svc", table, ["~*", "&*", "+@all", "-flushall"])
    policy = Policy(table, users, frozenset({"flushall"}), service_user=svc)
    evals = ([b"EVAL", b"return 1", b"0"], [b"EVALSHA", b"a" * 40, b"0"], [b"EVAL_RO", b"return 1", b"0"],
             [b"EVALSHA_RO", b"a" * 40, b"0"], [b"FCALL", b"f", b"0"], [b"FCALL_RO", b"f", b"0"],
             [b"FUNCTION", b"LOAD", b"x"], [b"FUNCTION", b"RESTORE", b"x"])  # fmt: skip
    for argv in evals:
        v = decide(policy, users["narrow"], argv, False)
        assert v.reason == "script" and v.error is not None and v.error.startswith(b"-NOPERM this user has no permissions")
        assert b'identity = "mirror"' in v.error and v.error.endswith(b"\r\n") and v.error.count(b"\r\n") == 1
        assert decide(policy, users["wide"], argv, False).error is None
        assert decide(replace_scripts(policy, "allow"), users["narrow"], argv, False).error is None  # the opt-in
    # its own rules first: Redis's refusal, as before
    assert decide(policy, users["plain"], evals[0], False).reason == "command"
    assert decide(policy, users["narrow"], [b"EVAL", b"return 1", b"1", b"sec:1"], False).reason == "key"
    # SCRIPT LOAD runs nothing, FUNCTION LIST/DELETE/FLUSH no code: the user's own rules decide
    for argv in ([b"SCRIPT", b"LOAD", b"return 1"], [b"FUNCTION", b"LIST"], [b"FUNCTION", b"DELETE", b"lib"]):
        assert decide(policy, users["narrow"], argv, False).error is None, argv
    # ACL DRYRUN through redisguard says so in DRYRUN's shape for a denial: a bulk string, Redis's words first
    refusal = dryrun(policy, [b"narrow", b"EVAL", b"return 1", b"0"])
    why = decide(policy, users["narrow"], [b"EVAL", b"return 1", b"0"], False).error
    assert why is not None and refusal.startswith(b"$") and refusal.count(b"\r\n") == 2
    assert refusal.split(b"\r\n")[1] == b"T" + why[len(b"-NOPERM t"):-2]
    assert refusal.split(b"\r\n")[1].startswith(b"This user has no permissions to run the 'eval' command: ")
    assert dryrun(policy, [b"wide", b"EVAL", b"return 1", b"0"]) == b"+OK\r\n"
    # a disabled command is unknown to DRYRUN too, as after rename-command
    assert dryrun(policy, [b"wide", b"FLUSHALL"]) == b"-ERR Command 'FLUSHALL' not found\r\n"
    assert dryrun(policy, [b"wide", b"flushall", b"async"]) == b"-ERR Command 'flushall' not found\r\n"
    # the fast path never forwards a refused script, however often it is asked
    plan = Plan(policy, users["narrow"], "narrow", frozenset())
    for _ in range(3):
        assert plan.allowed([b"EVAL", b"return 1", b"0"]) is None and plan.allowed([b"FCALL_RO", b"f", b"0"]) is None
    assert Plan(policy, users["wide"], "wide", frozenset()).allowed([b"EVAL", b"return 1", b"0"]) is not None


def replace_scripts(policy: Policy, how: str) -> Policy:
    from dataclasses import replace

    return replace(policy, service_scripts=how)


@pytest.mark.parametrize(("rules", "refused", "runs"), [
    ("-flushall", "flushall", False),
    ("-flushall +flushall|async", "flushall", True),  # a first-argument rule
    ("-flushall (~* +flushall|sync)", "flushall", True),  # ... in a selector
    ("-select +select|0", "select", True),
    ("-object +object|encoding", "object", True),  # a subcommand rule of a refused container
    ("-object +object|encoding", "object|freq", False),
    ("-object", "object", False),
])  # fmt: skip
def test_one_answer_to_what_the_service_user_may_run(table: CommandTable, rules: str, refused: str, runs: bool) -> None:
    """The start-up check (runnable_refused) and the scripts rule (covers) ask the same function."""
    svc = new_user("svc", table, ["~*", "&*", "+@all", *rules.split()])
    scriptable = script_callable(table)
    assert (table.acl.family.get(refused, frozenset({refused})) & service_may_run(svc, scriptable) != set()) is runs
    assert runnable_refused(svc, [refused], table) == ([refused] if runs else [])
    # a user with every right but the refused one covers the service user exactly when it cannot run it
    assert covers(new_user("u", table, ["~*", "&*", "+@all"]), svc, [refused], scriptable) is not runs
    assert runnable_refused(None, [refused], table) == [refused]  # unknown: every right


def test_mirror_rules_take_what_redisguard_refuses(table: CommandTable) -> None:
    user = new_user("a", table, ["on", "~a:*", "+@all", "(~b:* +get +flushall)"])
    policy = Policy(table, {}, frozenset({"flushall", "keys", "nosuchcommand"}), enable_debug_command="local")
    refused = refused_commands(policy)
    assert refused == ("flushall", "keys", "module|load", "module|loadex", "module|unload")  # DEBUG: allowed locally
    rules = mirror_rules(user, refused)
    assert rules[-1] == "(~b:* resetchannels -@all +flushall +get -flushall -keys -module|load -module|loadex -module|unload)"
    assert "-flushall" in rules[: rules.index(rules[-1])]  # the root selector too
    assert mirror_rules(user) == [*user.root.describe().split(" "), "(" + user.selectors[1].describe() + ")"]
