"""Cost of one ACL decision, in microseconds: `python benchmarks/acl_decision.py [iterations]`.

Three ways in, per (user, command): ``check`` (the ACL rules alone, command already looked up),
``decide`` (what the session asks for a request off the fast path: lookup, arity, NOAUTH, ACL), and
the per-user fast path ``Plan.allowed`` (what an allowed, simply forwarded request costs; for a denied
one it is the cost of handing it on to ``decide``)."""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisguard.acl import check, new_user  # noqa: E402
from redisguard.commands.table import CommandTable  # noqa: E402
from redisguard.policy.decide import Policy, decide  # noqa: E402

USERS = {
    "allcommands, allkeys": ["on", "~*", "&*", "+@all"],
    "categories + 3 key patterns": ["on", "~cache:*", "%R~report:*", "~session:??", "+@read", "+@write"],
    "two selectors": ["on", "~a:*", "+get", "(~b:* +set)"],
}
CASES = [[b"PING"], [b"GET", b"cache:1"], [b"SET", b"session:ab", b"v"], [b"MGET", b"cache:1", b"report:2"]]
COLUMNS = ("check", "decide", "fast path")


def measure(n: int = 200_000) -> list[tuple[str, str, str, dict[str, float]]]:
    """(user, command, verdict, {column: µs per decision}) for every user and case."""
    t = CommandTable.snapshot()
    users = {label: new_user(f"u{i}", t, rules) for i, (label, rules) in enumerate(USERS.items())}
    policy = Policy(t, {u.name: u for u in users.values()})
    rows = []
    for label, user in users.items():
        plan = policy.plan(user, frozenset())
        for argv in CASES:
            cmd = t.lookup(argv)
            assert cmd is not None
            calls = {
                "check": lambda: check(user, cmd, argv),  # noqa: B023
                "decide": lambda: decide(policy, user, argv, False),  # noqa: B023
                "fast path": lambda: plan.allowed(argv),  # noqa: B023
            }
            verdict = decide(policy, user, argv, False).reason or "allowed"
            us = {k: timeit.timeit(f, number=n) / n * 1e6 for k, f in calls.items()}
            rows.append((label, b" ".join(argv).decode(), verdict, us))
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(f"{'user':<30} {'command':<24} {'verdict':<9}" + "".join(f"{c:>12}" for c in COLUMNS) + "   (µs per decision)")
    for user, command, verdict, us in measure(n):
        print(f"{user:<30} {command:<24} {verdict:<9}" + "".join(f"{us[c]:>12.2f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
