"""What a mirror user is (mirror mode): its name, its rules, its password, and the ACL commands that
make it. Computed here, sent to Redis by :mod:`~redisguard.upstream.mirror_sync`.

The mirror password of a user is ``HMAC-SHA256(key, name, rules)`` over the exact rules text pushed
(:func:`mirror_rules`), so a mirror Redis holds with other rules (an ACL LOAD of an older file, a restart
or failover to older ACLs) refuses our AUTH and is pushed again. The key is :func:`mirror_key`: derived
from the service user's password, so every instance sharing the service user (an HA pair, a rolling
deploy, a restart) computes the same passwords; without a service password, a random key made at start
(held in memory only). Redis is sent the password's SHA-256 (``#<hash>``), never the password, and
neither is ever logged. The service user is never a mirror (``config.mirror_prefix_conflict``, and
``protected``) and never deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import weakref
from collections.abc import Mapping, Sequence

from redisguard.acl import User
from redisguard.config.model import Config
from redisguard.protocol.resp import encode_command

# The key mirror passwords derive from when the service user has no password, made once per process
# start. Made at import, so with [server] workers the supervisor makes it before it forks and every
# worker (and every restarted one) shares it: workers never reset each other's mirror passwords.
PROCESS_KEY = secrets.token_bytes(32)
# Domain separation of the mirror key derived from the service password (mirror_key).
KEY_CONTEXT = b"redisguard mirror passwords v1\x00"


def mirror_rules(user: User, refused: Sequence[str] = ()) -> list[str]:
    """``user``'s rules as ACL SETUSER arguments, without its passwords and on/off (the mirror gets
    ``on`` and its own password): the canonical ``ACL LIST`` form of :meth:`User.describe`, less the
    ``refused`` commands (redisguard's for everyone: :func:`~redisguard.policy.decide.refused_commands`) in
    every selector, so a script cannot call them either."""
    minus = [f"-{c}" for c in refused]
    flags = [f for f in user.flags() if f not in ("on", "off", "nopass")]
    return [*flags, *user.root.describe().split(" "), *minus,
            *("(" + " ".join([s.describe(), *minus]) + ")" for s in user.selectors[1:])]  # fmt: skip


def mirror_key(config: Config) -> bytes | None:
    """The key of the mirror passwords, from the service user's credentials (None without a password):
    every instance logging in as the same service user derives the same mirror passwords."""
    up = config.upstream
    if not up.password:
        return None
    who = (up.username or "default").encode("utf-8", "surrogateescape")
    return hmac.new(up.password.encode("utf-8", "surrogateescape"), KEY_CONTEXT + who, hashlib.sha256).digest()


class MirrorUsers:
    """The mirrors of redisguard's users, as Redis should have them."""

    def __init__(self, config: Config, key: bytes | None = None) -> None:
        self.prefix = config.upstream.mirror_prefix
        # Redis users a mirror push must never set nor delete, whatever the prefix and the user names.
        self.protected = frozenset({config.upstream.username or "default", "default"})
        # Several processes sharing the mirrors must share the key (mirror_key: from the service password).
        self._key = key or mirror_key(config) or secrets.token_bytes(32)
        # Per user (users never change once they serve clients: a change makes a new User), its AUTH for
        # the rules it had with these refused commands; bounded by the users alive.
        self._auth: weakref.WeakKeyDictionary[User, tuple[Sequence[str], bytes]] = weakref.WeakKeyDictionary()
        self.refused: Sequence[str] = ()  # taken from every mirror (mirror_rules); set by install and Shared.swap

    def mirror_name(self, name: str) -> str:
        return self.prefix + name

    def password(self, name: str, rules: str) -> str:
        """The mirror password of user ``name`` with ``rules`` (the pushed mirror_rules text): a mirror
        Redis holds with other rules refuses it. (The name's length first: no two pairs share a message.)"""
        raw = name.encode("utf-8", "surrogateescape")
        msg = len(raw).to_bytes(4, "big") + raw + rules.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def rules_text(self, user: User) -> str:
        return " ".join(mirror_rules(user, self.refused))

    def auth(self, user: User) -> bytes:
        """``AUTH <mirror> <password>`` for ``user`` as it is now (encoded once per user and refused commands)."""
        cached = self._auth.get(user)
        if cached is not None and cached[0] == self.refused:
            return cached[1]
        cmd = self._auth_command(user.name, self.rules_text(user))
        self._auth[user] = (self.refused, cmd)
        return cmd

    def _auth_command(self, name: str, rules: str) -> bytes:
        return encode_command([b"AUTH", self.mirror_name(name).encode("utf-8", "surrogateescape"),
                               self.password(name, rules).encode()])  # fmt: skip

    def setuser(self, user: User, rules: Sequence[str]) -> list[bytes]:
        pw_hash = hashlib.sha256(self.password(user.name, " ".join(rules)).encode()).hexdigest()
        return [b"ACL", b"SETUSER", self.mirror_name(user.name).encode("utf-8", "surrogateescape"), b"reset", b"on",
                b"#" + pw_hash.encode(), *(r.encode("utf-8", "surrogateescape") for r in rules)]  # fmt: skip

    def plan(self, users: list[tuple[str, User]], synced: Mapping[str, str]
             ) -> tuple[list[list[bytes]], list[tuple[str, str]], list[str]]:  # fmt: skip
        """(in a worker thread) The ACL SETUSERs for users whose rules Redis does not have yet (``synced``:
        mirror name → the rules Redis has), with (mirror, rules) for each, and the mirrors of users that
        are gone."""
        commands: list[list[bytes]] = []
        names: list[tuple[str, str]] = []
        for name, user in users:
            if self.mirror_name(name) in self.protected:  # (refused at start: never overwrite the service user)
                continue
            rules = mirror_rules(user, self.refused)
            text = " ".join(rules)
            if synced.get(self.mirror_name(name)) != text:
                commands.append(self.setuser(user, rules))
                names.append((self.mirror_name(name), text))
        wanted = {self.mirror_name(n) for n, _ in users}
        return commands, names, [m for m in synced if m not in wanted]
