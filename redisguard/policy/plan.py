"""The decision for the common request, precomputed per user: "allowed, simply forwarded", or "ask
:func:`~redisguard.policy.decide.decide`".

A :class:`Plan` belongs to one user under one :class:`~redisguard.policy.decide.Policy` (the policy keeps
them; a new policy starts with none). For each command name it holds what does not depend on the
arguments: whether the command may take this path at all, which of the user's selectors allow it,
and — for commands whose keys sit at positions fixed by the argument count — those positions per
argument count. What remains per request is the arity test and one pattern match per key.

The path only ever answers *allowed*; anything else (unknown, disabled, wrong arity, a denial,
channels, SORT's BY/GET, commands the session handles itself, containers whose subcommand is in
argv[1], first-argument rules) returns None and the request goes to ``decide``, which gives Redis's
exact answer. ``tests/policy/test_plan.py`` checks that the two never disagree on what is allowed.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol

from redisguard.acl.check import denied_key
from redisguard.acl.selector import Selector
from redisguard.acl.user import User
from redisguard.commands.getkeys import get_keys, keys_by_argc, keys_from_specs
from redisguard.commands.table import Command, CommandTable

# Key positions are cached for argument counts below this (a client chooses argc: keep it bounded).
_ARGC_CACHED = 64


class Entry:
    __slots__ = ("cmd", "arity", "selectors", "free", "static", "positions", "metric")

    def __init__(self, cmd: Command, selectors: tuple[Selector, ...], label: str) -> None:
        self.cmd = cmd
        self.arity = cmd.arity
        self.selectors = selectors
        # some selector that allows the command needs no key check: allowed whatever the keys
        self.free = not cmd.has_keys or any(s.allkeys for s in selectors)
        self.static = keys_by_argc(cmd)
        self.positions: dict[int, list[tuple[int, int]]] = {}
        self.metric = (label, cmd.name)  # the (user, command) labels its allowed count goes under


class Rules(Protocol):
    """What a plan reads of the policy it belongs to (:class:`~redisguard.policy.decide.Policy`)."""

    @property
    def table(self) -> CommandTable: ...
    def resolve(self, argv: Sequence[bytes]) -> Command | None: ...
    def refuses_script(self, user: User, name: str) -> bool: ...


class Plan:
    """One user's precomputed decisions. Entries are keyed by the command name as sent, for the
    all-lowercase and all-uppercase spellings only (so a client cannot grow the table: at most twice
    the command table); other spellings are folded first."""

    __slots__ = ("_policy", "table", "user", "label", "entries", "_special")

    def __init__(self, policy: Rules, user: User, label: str, special: frozenset[str]) -> None:
        # Weakly: the policy keeps its plans, and a cycle would outlive the policy (the reload's
        # gc.freeze() exempts it from every later collection, and it holds users that are gone).
        self._policy = weakref.ref(policy)
        self.table = policy.table
        self.user = user
        self.label = label
        self.entries: dict[bytes, Entry | None] = {}
        self._special = special

    def allowed(self, argv: Sequence[bytes]) -> tuple[str, str] | None:
        """The metric labels if ``argv`` is allowed and simply forwarded; None: ask ``decide``."""
        try:
            e = self.entries[argv[0]]
        except KeyError:
            e = self._entry(argv[0])
        if e is None:
            return None
        argc = len(argv)
        arity = e.arity
        if (arity > 0 and arity != argc) or argc < -arity:
            return None
        if e.free:
            return e.metric
        keys = e.positions.get(argc) if e.static else None
        if keys is None:
            found = keys_from_specs(e.cmd, argv) if e.static else None
            if found is not None and argc < _ARGC_CACHED:
                e.positions[argc] = found  # a function of argc alone for these specs
            keys = found if found is not None else get_keys(e.cmd, argv)
        for sel in e.selectors:
            if denied_key(sel, argv, keys) is None:
                return e.metric
        return None

    def _entry(self, name: bytes) -> Entry | None:
        low = name.lower()
        if low in self.entries:
            e = self.entries[low]
        elif self.table.lookup([low]) is None:
            return None  # unknown to Redis: never stored, so a client cannot grow the table with names
        else:
            e = self.entries[low] = self._build(low)
        if name == low.upper():
            self.entries[name] = e
        return e

    def _build(self, low: bytes) -> Entry | None:
        policy = self._policy()
        cmd = None if policy is None else policy.resolve([low])  # (a policy gone: decide() answers)
        if (
            policy is None
            or cmd is None
            or cmd.subcommands  # the command Redis runs depends on argv[1]
            or cmd.no_auth
            or cmd.channels is not None
            or cmd.name in self._special
            or cmd.name in _DECIDED_ELSEWHERE
            or policy.refuses_script(self.user, cmd.name)  # decide gives the refusal
        ):
            return None
        selectors = tuple(s for s in self.user.selectors if s.allcommands or cmd.name in s.allowed)
        if not selectors:
            return None
        return Entry(cmd, selectors, self.label)


# Commands whose verdict needs more than command, arity and keys: protected settings (DEBUG, MODULE)
# and SORT's own BY/GET check.
_DECIDED_ELSEWHERE = frozenset({"debug", "module", "sort", "sort_ro"})
