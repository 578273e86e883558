"""Replies to the ACL subcommands redisguard answers from its own users (RESP2 and RESP3 shapes).

The shapes are Redis 7.0's: ``ACL USERS`` and ``ACL LIST`` in name order, ``ACL GETUSER`` as a map
(an array of pairs in RESP2), ``ACL DRYRUN`` answering ``+OK`` or the reason as a bulk string.

USERS, LIST and GETUSER depend only on the users file, so :class:`ACLReplies` builds each once per
load: on the event loop an ACL LIST then costs a dict lookup, whatever the number of users. The
module-level functions render from scratch (the reference the cache is tested against).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from redisguard.protocol.resp import encode_bulk

from .user import Selector, User


def array(items: Sequence[bytes], kind: bytes = b"*") -> bytes:
    return kind + b"%d\r\n" % len(items) + b"".join(items)


def _names(users: Mapping[str, User]) -> list[str]:
    """Names in Redis's order (its rax of users: byte order). Names decoded from client bytes carry
    surrogateescape characters, so sort on the bytes."""
    return sorted(users, key=lambda n: n.encode("utf-8", "surrogateescape"))


def acl_users(users: Mapping[str, User]) -> bytes:
    return array([encode_bulk(n) for n in _names(users)])


def acl_list(users: Mapping[str, User]) -> bytes:
    return array([encode_bulk(f"user {n} {users[n].describe()}") for n in _names(users)])


def _map(pairs: list[tuple[str, bytes]], resp: int) -> bytes:
    flat = [x for k, v in pairs for x in (encode_bulk(k), v)]
    if resp == 3:
        return b"%" + b"%d\r\n" % len(pairs) + b"".join(flat)
    return array(flat)


def acl_getuser(users: Mapping[str, User], name: bytes, resp: int) -> bytes:
    user = users.get(name.decode("utf-8", "surrogateescape"))
    if user is None:
        return b"_\r\n" if resp == 3 else b"$-1\r\n"
    return _getuser(user, resp)


def _getuser(user: User, resp: int) -> bytes:
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


class ACLReplies:
    """The USERS / LIST / GETUSER replies of one load of the users file, each built once.

    Build it next to the users (``ACLReplies(users).prepare()`` in the worker thread that loaded
    them) and swap both in together; never mutate ``users`` afterwards. USERS and LIST are built by
    :meth:`prepare` (or at first use); GETUSER per (user, RESP2/RESP3) at first use, so the cache
    holds at most two replies per user: names that are not users are answered without caching."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self.users = users
        self._users_reply: bytes | None = None
        self._list_reply: bytes | None = None
        self._getuser: dict[tuple[str, bool], bytes] = {}

    def prepare(self) -> ACLReplies:
        """Build USERS and LIST and every user's fingerprint now (off the event loop); returns self."""
        self.acl_users()
        self.acl_list()
        for user in self.users.values():
            _ = user.fingerprint
        return self

    def acl_users(self) -> bytes:
        if self._users_reply is None:
            self._users_reply = acl_users(self.users)
        return self._users_reply

    @property
    def listed(self) -> bytes | None:
        """The ACL LIST reply if it is built (never builds it: safe on the event loop whatever the users)."""
        return self._list_reply

    def acl_list(self) -> bytes:
        if self._list_reply is None:
            self._list_reply = acl_list(self.users)
        return self._list_reply

    def acl_getuser(self, name: bytes, resp: int) -> bytes:
        key = (name.decode("utf-8", "surrogateescape"), resp == 3)
        reply = self._getuser.get(key)
        if reply is None:
            user = self.users.get(key[0])
            if user is None:
                return b"_\r\n" if resp == 3 else b"$-1\r\n"
            reply = self._getuser[key] = _getuser(user, resp)
        return reply

