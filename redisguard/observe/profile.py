"""The traffic profile: per user, what was used — commands, key patterns, channels — never values.

It is what `redisguard acl suggest` turns into the tightest ACL rules that would have allowed all of
it, and what `redisguard acl diff --against` checks a new users file against.

Key names are collapsed into patterns as they are recorded (the heuristic, stated once):

* a key with a separator (``:``, ``/``, ``.``, ``|``, ``-``, ``_``, ``#``) keeps its text up to and
  including the first one, plus ``*`` — ``session:ab12`` → ``session:*``, ``cache/img/1`` → ``cache/*``;
* a key without one is kept as a literal pattern (glob characters escaped) — ``counter`` → ``counter``;
* a byte that a users-file rule cannot carry as is (anything but printable ASCII; a space, a quote)
  becomes ``?``, which matches it (Redis's ACL file splits on spaces and has no quoting) — ``a b`` →
  ``a?b``, ``\xe9t:1`` → ``?t:*`` — so a key name can never become a rule of its own in what ``acl
  suggest`` prints (``"zz +@all"`` → ``zz?+@all``), nor widen to ``*``;
* a key is cut, and ends in ``*``, after ``MAX_PATTERN_BYTES`` bytes;
* a user holds at most ``MAX_PATTERNS`` key patterns (and channel patterns): past that, the user's
  keys (channels) collapse to ``*`` and the profile says so (``keys_truncated``).

Each key pattern remembers whether it was read, written or both, so the suggestion can use ``%R~``,
``%W~`` or ``~``. Channels are collapsed the same way. Memory is bounded: users × (commands in the
command table + MAX_PATTERNS + MAX_USES), whatever the traffic. ``uses`` (which command touched which key
pattern) lets ``acl diff --against`` probe exactly the pairs that were seen.

Profiles add up (:meth:`TrafficProfile.merge`, within the same bounds): a process records into its own
profile, and :mod:`.profile_store` adds what it :meth:`~TrafficProfile.take`-s of it to the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from redisguard.commands.table import READ, WRITE, Command

MAX_PATTERNS = 256
MAX_USES = 1024  # (command, key pattern) pairs kept per user (acl diff probes these)
MAX_PATTERN_BYTES = 64
# Over all users: new patterns past these collapse to "*" (bounds the profile whatever the user count).
MAX_TOTAL_PATTERNS = 65536
MAX_TOTAL_USES = 262144
_SEPARATOR = re.compile(rb"[:/.|\-_#]")
_UNSAFE = re.compile(rb"[^!#-&(-~]")  # bytes a rule token cannot hold: not printable ASCII, space, " and '
_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")
FORMAT = 1


def rule_safe(pattern: bytes) -> bool:
    """Can this pattern follow ``~``/``&`` in a users-file rule as one token, meaning what it says?"""
    return _UNSAFE.search(pattern) is None


def key_pattern(key: bytes) -> bytes:
    """The pattern a key is recorded under (see the module's heuristic)."""
    m = _SEPARATOR.search(key)
    cut = min(m.end() if m is not None else len(key), MAX_PATTERN_BYTES)
    literal = _UNSAFE.sub(b"?", _GLOB_SPECIAL.sub(rb"\\\1", key[:cut]))
    return literal + b"*" if cut < len(key) else literal


class UserProfile:
    __slots__ = ("commands", "keys", "channels", "uses", "n_uses", "keys_truncated", "channels_truncated")

    def __init__(self) -> None:
        self.commands: dict[str, int] = {}  # command name ("get", "config|get") -> count
        self.keys: dict[bytes, int] = {}  # key pattern -> READ|WRITE bits seen
        self.channels: set[bytes] = set()
        self.uses: dict[str, set[bytes]] = {}  # command -> the key patterns it touched (for acl diff)
        self.n_uses = 0
        self.keys_truncated = False
        self.channels_truncated = False

    def add_key(self, cmd: str, key: bytes, access: int, budget: Budget) -> None:
        self.add_use(cmd, self.add_pattern(key_pattern(key), access, budget), budget)

    def add_pattern(self, pattern: bytes, bits: int, budget: Budget) -> bytes:
        """Record a key pattern with the access seen; the pattern it is held under (``*`` once collapsed)."""
        if self.keys_truncated:
            pattern = b"*"
        elif pattern not in self.keys and (len(self.keys) >= MAX_PATTERNS or not budget.take_pattern()):
            self._collapse_keys()
            pattern = b"*"
        self.keys[pattern] = self.keys.get(pattern, 0) | bits
        return pattern

    def add_use(self, cmd: str, pattern: bytes, budget: Budget) -> None:
        if self.keys_truncated:
            pattern = b"*"
        seen = self.uses.get(cmd)
        if seen is None:
            seen = self.uses[cmd] = set()
        if pattern not in seen and self.n_uses < MAX_USES and budget.take_use():
            seen.add(pattern)
            self.n_uses += 1

    def _collapse_keys(self) -> None:
        """Too many patterns (this user's, or all users'): the user's keys become ``*``."""
        if self.keys_truncated:
            return
        merged = 0
        for bits in self.keys.values():
            merged |= bits
        self.keys = {b"*": merged}
        self.uses = {c: {b"*"} for c in self.uses}
        self.n_uses = len(self.uses)
        self.keys_truncated = True

    def add_channel(self, channel: bytes, is_pattern: bool, budget: Budget) -> None:
        if not is_pattern:
            self.add_channel_name(key_pattern(channel), budget)
        elif len(channel) <= MAX_PATTERN_BYTES and _UNSAFE.search(channel) is None:
            self.add_channel_name(channel, budget)  # a PSUBSCRIBE pattern is allowed only literally: as sent
        else:  # ... or by &*, when no rule can carry it
            self.add_channel_name(b"*", budget)

    def add_channel_name(self, name: bytes, budget: Budget) -> None:
        if self.channels_truncated:
            return
        if name not in self.channels and (len(self.channels) >= MAX_PATTERNS or not budget.take_pattern()):
            self.channels = {b"*"}
            self.channels_truncated = True
            return
        self.channels.add(name)


class Budget:
    """Patterns and (command, pattern) pairs left for all users together."""

    __slots__ = ("patterns", "uses")

    def __init__(self) -> None:
        self.patterns = MAX_TOTAL_PATTERNS
        self.uses = MAX_TOTAL_USES

    def take_pattern(self) -> bool:
        self.patterns -= 1
        return self.patterns >= 0

    def take_use(self) -> bool:
        self.uses -= 1
        return self.uses >= 0


class TrafficProfile:
    """What each user did, bounded (see the module docstring)."""

    def __init__(self) -> None:
        self.users: dict[str, UserProfile] = {}
        self.changed = False
        self.budget = Budget()
        self.forgotten: set[str] = set()  # users gone since the last take(): the file forgets them too
        self.in_flight: TrafficProfile | None = None  # taken, not yet in the file (the reload guard adds it)

    def record(self, user: str, cmd: Command, argv: Sequence[bytes], keys: Iterable[tuple[int, int]],
               channels: Iterable[tuple[int, bool]]) -> None:  # fmt: skip
        """One request ``user`` made (allowed, or forwarded in audit mode); ``user`` is a configured name."""
        up = self.users.get(user)
        if up is None:
            up = self.users[user] = UserProfile()
        up.commands[cmd.name] = up.commands.get(cmd.name, 0) + 1
        for idx, access in keys:
            up.add_key(cmd.name, argv[idx], access or READ, self.budget)
        for idx, is_pattern in channels:
            up.add_channel(argv[idx], is_pattern, self.budget)
        self.changed = True

    def forget(self, names: Iterable[str]) -> None:
        """Users that no longer exist (a reload, ACL DELUSER): their profile goes with them."""
        for name in names:
            self.users.pop(name, None)
            self.forgotten.add(name)
            self.changed = True
        self._recount()

    def take(self) -> TrafficProfile:
        """What was recorded (and forgotten) since the last take, moved out; this profile starts empty.
        O(1) on the loop: the taken profile is no longer changed, so a thread may read it."""
        out = TrafficProfile()
        out.users, out.forgotten, out.budget = self.users, self.forgotten, self.budget
        self.users, self.forgotten, self.budget = {}, set(), Budget()
        self.changed = False
        return out

    def give_back(self, taken: TrafficProfile) -> None:
        """A take() that could not be written: its counts are added back (no count is lost), except
        users forgotten since."""
        self.merge(taken, skip=self.forgotten)
        self.forgotten |= taken.forgotten
        self.changed = True

    def _recount(self) -> None:
        """The global budget from what is held now (after users went, or a file was merged in)."""
        self.budget = Budget()
        for up in self.users.values():
            self.budget.patterns -= len(up.keys) + len(up.channels)
            self.budget.uses -= up.n_uses

    # -- the file ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """All of it as JSON-able data (see ProfileStore.snapshot for the event loop's way)."""
        return {"format": FORMAT, "users": {name: user_json(up) for name, up in sorted(self.users.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrafficProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("users"), dict):
            raise ValueError("not a redisguard traffic profile (format 1)")
        prof = cls()
        for name, u in data["users"].items():
            up = prof.users[name] = UserProfile()
            up.commands = {str(k): int(v) for k, v in u.get("commands", {}).items()}
            up.keys = {_bytes(p): _ACCESS[a] for p, a in u.get("keys", {}).items()}
            up.channels = {_bytes(c) for c in u.get("channels", [])}
            up.uses = {str(c): {_bytes(p) for p in ps} for c, ps in u.get("uses", {}).items()}
            up.n_uses = sum(map(len, up.uses.values()))
            up.keys_truncated = bool(u.get("keys_truncated"))
            up.channels_truncated = bool(u.get("channels_truncated"))
        prof._recount()
        return prof

    def merge(self, other: TrafficProfile, skip: Iterable[str] = ()) -> None:
        """Add another profile (the file, another process's, one not written yet) to this one, within
        this one's bounds: new patterns past them collapse to ``*`` as when recorded."""
        skipped = set(skip)
        for name, o in other.users.items():
            if name in skipped:
                continue
            up = self.users.get(name)
            if up is None:
                up = self.users[name] = UserProfile()
            for c, n in o.commands.items():
                up.commands[c] = up.commands.get(c, 0) + n
            if o.keys_truncated:
                up._collapse_keys()
            for p, bits in o.keys.items():
                up.add_pattern(p, bits, self.budget)
            for c, ps in o.uses.items():
                for p in ps:
                    up.add_use(c, p, self.budget)
            if o.channels_truncated:
                up.channels, up.channels_truncated = {b"*"}, True
            for ch in o.channels:
                up.add_channel_name(ch, self.budget)
        self.changed = True

    def dumps(self) -> str:
        return serialize(self.to_json())


def serialize(data: dict[str, Any]) -> str:
    """The profile file's text (of to_json()'s data, or of a snapshot made a slice at a time)."""
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def user_json(up: UserProfile) -> dict[str, Any]:
    """One user's profile as JSON-able data (a copy: at most MAX_PATTERNS keys and MAX_USES uses)."""
    return {
        "commands": dict(sorted(up.commands.items())),
        "keys": {_text(p): _access(bits) for p, bits in sorted(up.keys.items())},
        "channels": sorted(_text(c) for c in up.channels),
        "uses": {c: sorted(_text(p) for p in ps) for c, ps in sorted(up.uses.items())},
        "keys_truncated": up.keys_truncated,
        "channels_truncated": up.channels_truncated,
    }


_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE}


def _access(bits: int) -> str:
    return {READ: "read", WRITE: "write"}.get(bits, "readwrite")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")
