"""Cost of one ACL decision, in microseconds: `python benchmarks/acl_decision.py`."""

from __future__ import annotations

import timeit

from redisguard.acl import check, new_user
from redisguard.commands import CommandTable


def main() -> None:
    t = CommandTable.snapshot()
    users = {
        "allcommands, allkeys": new_user("a", t, ["on", "~*", "&*", "+@all"]),
        "categories + 3 key patterns": new_user("b", t, ["on", "~cache:*", "%R~report:*", "~session:??", "+@read", "+@write"]),
        "two selectors": new_user("c", t, ["on", "~a:*", "+get", "(~b:* +set)"]),
    }
    cases = [[b"PING"], [b"GET", b"cache:1"], [b"SET", b"session:ab", b"v"], [b"MGET", b"cache:1", b"report:2"]]
    print(f"{'user':<30} {'command':<28} {'µs/decision':>12}")
    for uname, user in users.items():
        for argv in cases:
            cmd = t.lookup(argv)
            n = 200_000
            sec = timeit.timeit(lambda: check(user, cmd, argv), number=n)  # noqa: B023
            print(f"{uname:<30} {' '.join(a.decode() for a in argv):<28} {sec / n * 1e6:>12.2f}")


if __name__ == "__main__":
    main()
