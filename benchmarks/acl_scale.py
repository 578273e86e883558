"""How the users file scales: `python benchmarks/acl_scale.py [N]` (default 10,001 users).

Writes a users file with a realistic mix of rules (password hashes, key and channel patterns,
categories, single commands, subcommands, first-arg rules, selectors), then times load_users,
rendering every user's ACL LIST form, and building the ACL USERS / LIST / GETUSER replies."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisguard.acl import load_users  # noqa: E402
from redisguard.commands.table import CommandTable  # noqa: E402

TEMPLATES = [
    "on #{h} ~app{i}:* %R~shared:* &events:{i} +@read +@write -@dangerous +ping",
    "on #{h} ~* &* +@all -@dangerous -flushall -config|set +debug|object",
    "on #{h} %R~* resetchannels +@read +@connection -keys -scan",
    "on #{h} ~cache:{i}:* +get +set +del +expire +ttl +mget +select|0 +client|setname",
    "on #{h} ~q:{i} &jobs:* +@list +@pubsub -@blocking +blpop (~tmp:{i}:* +@string -append)",
    "off #{h} ~* +@all -@admin (%W~log:* +xadd) (%R~cfg:* +get +@hash -hdel)",
    "on nopass ~public:* +@read -@slow +scan +info",
    "on #{h} #{h2} ~a:{i}* ~b:{i}* %RW~c:* &* +@all -@dangerous -@scripting +eval_ro +memory|usage",
]


def users_text(n: int) -> str:
    lines = ["user default off"]
    for i in range(n - 1):
        h = hashlib.sha256(b"pw%d" % i).hexdigest()
        h2 = hashlib.sha256(b"alt%d" % i).hexdigest()
        lines.append(f"user u{i} " + TEMPLATES[i % len(TEMPLATES)].format(i=i, h=h, h2=h2))
    return "\n".join(lines) + "\n"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_001
    table = CommandTable.snapshot()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users.acl"
        path.write_text(users_text(n))
        t = time.perf_counter()
        users = load_users(path, table)
        t_load = time.perf_counter() - t
    print(f"users: {len(users)}")
    print(f"load_users: {t_load:.3f} s")
    sample = sorted(users)[: int(sys.argv[2])] if len(sys.argv) > 2 else sorted(users)
    t = time.perf_counter()
    for name in sample:
        users[name].describe()
    t_desc = time.perf_counter() - t
    print(f"describe x{len(sample)}: {t_desc:.3f} s ({t_desc / len(sample) * 1e3:.3f} ms per user)")
    try:
        from redisguard.acl.replies import ACLReplies
    except ImportError:
        return
    # The same work on a fresh load, as a reload does it: load, then every reply and fingerprint.
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users.acl"
        path.write_text(users_text(n))
        t = time.perf_counter()
        users = load_users(path, table, require_default=True)
        t_load = time.perf_counter() - t
    t = time.perf_counter()
    replies = ACLReplies(users).prepare()
    t_prepare = time.perf_counter() - t
    t = time.perf_counter()
    for name in users:
        replies.acl_getuser(name.encode(), 2)
        replies.acl_getuser(name.encode(), 3)
    t_get = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(1000):
        replies.acl_list()
    t_cached = (time.perf_counter() - t) / 1000
    print(f"fresh load_users: {t_load:.3f} s")
    print(f"ACLReplies.prepare (USERS + LIST + fingerprints): {t_prepare:.3f} s ({len(replies.acl_list())} bytes)")
    print(f"  load + prepare: {t_load + t_prepare:.3f} s")
    print(f"ACL GETUSER x{2 * len(users)} (RESP2+3), first time each: {t_get:.3f} s")
    print(f"ACL LIST from the cache: {t_cached * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
