"""Replies to the ACL subcommands redisguard answers from its own users (RESP2 and RESP3 shapes).

The shapes are Redis 7.0's: ``ACL USERS`` and ``ACL LIST`` in name order, ``ACL GETUSER`` as a map
(an array of pairs in RESP2), ``ACL DRYRUN`` answering ``+OK`` or the reason as a bulk string.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..commands import CommandTable
from ..resp import encode_bulk, encode_error
from .check import check
from .user import Selector, User


def array(items: Sequence[bytes], kind: bytes = b"*") -> bytes:
    return kind + b"%d\r\n" % len(items) + b"".join(items)


def acl_users(users: dict[str, User]) -> bytes:
    return array([encode_bulk(n) for n in sorted(users)])


def acl_list(users: dict[str, User]) -> bytes:
    return array([encode_bulk(f"user {n} {users[n].describe()}") for n in sorted(users)])


def _map(pairs: list[tuple[str, bytes]], resp: int) -> bytes:
    flat = [x for k, v in pairs for x in (encode_bulk(k), v)]
    if resp == 3:
        return b"%" + b"%d\r\n" % len(pairs) + b"".join(flat)
    return array(flat)


def acl_getuser(users: dict[str, User], name: bytes, resp: int) -> bytes:
    user = users.get(name.decode("utf-8", "replace"))
    if user is None:
        return b"_\r\n" if resp == 3 else b"$-1\r\n"

    def rules(s: Selector) -> list[tuple[str, bytes]]:
        return [
            ("commands", encode_bulk(s.describe_commands())),
            ("keys", encode_bulk(" ".join(s.key_rules()))),
            ("channels", encode_bulk(" ".join(s.channel_rules()))),
        ]

    return _map(
        [
            ("flags", array([encode_bulk(f) for f in user.flags()], b"~" if resp == 3 else b"*")),
            ("passwords", array([encode_bulk(h) for h in user.passwords])),
            *rules(user.root),
            ("selectors", array([_map(rules(s), resp) for s in user.selectors[1:]])),
        ],
        resp,
    )


def acl_dryrun(users: dict[str, User], table: CommandTable, argv: Sequence[bytes]) -> bytes:
    """ACL DRYRUN <user> <command> [arg ...] against redisguard's users."""
    user = users.get(argv[0].decode("utf-8", "replace"))
    if user is None:
        return encode_error("ERR User '%s' not found" % argv[0].decode("utf-8", "replace"))
    cmd_argv = list(argv[1:])
    cmd = table.lookup(cmd_argv)
    if cmd is None:
        return encode_error("ERR Command '%s' not found" % cmd_argv[0].decode("utf-8", "replace"))
    arity = CommandTable.arity_error(cmd, len(cmd_argv))
    if arity:
        return arity
    denied = check(user, cmd, cmd_argv)
    if denied is None:
        return b"+OK\r\n"
    if denied.reason == "command":
        return encode_bulk(f"This user has no permissions to run the '{cmd.name}' command")
    what = "key" if denied.reason == "key" else "channel"
    return encode_bulk(b"This user has no permissions to access the '%s' %s" % (cmd_argv[denied.index], what.encode()))
