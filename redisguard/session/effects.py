"""What a session needs done outside itself, as values: the runtime carries them out.

A session never touches the world (other clients, the users every session shares, the mirror users in
Redis, threads, timers). When a request needs any of that, the session pauses and sets
``Session.effect`` to one of these; the transport (transport/connection.py) carries it out and hands
the outcome back (``offloaded``, ``resume``, ``acknowledged``). So the session is driven by bytes alone
in tests, which carry effects out with :func:`carry_out` (in-line, as a process without a transport).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redisguard.acl import admin
from redisguard.policy.decide import Shared


@dataclass(frozen=True)
class Offload:
    """Decide ``argv`` in a worker thread (``Session.decide_offloaded``), then ``Session.offloaded``."""

    argv: list[bytes]


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` (a throttled AUTH), then ``Session.resume``."""

    seconds: float


@dataclass(frozen=True)
class ChangeUsers:
    """ACL SETUSER / DELUSER / LOAD: put the change in force for every client (and, in mirror mode, in
    Redis; with workers, in every worker), then ``Session.acknowledged(reply)``. ``computed``: (the users
    it was computed from, admin's result) for SETUSER / DELUSER; None for LOAD (read in its turn)."""

    command: str  # "setuser" | "deluser" | "load"
    args: Sequence[bytes]
    computed: Any


Effect = Offload | Sleep | ChangeUsers


def apply_users_change(shared: Shared, change: ChangeUsers) -> tuple[bytes, set[str] | None]:
    """A change of users put in force in this process alone (no sequence, no other worker): the reply,
    and which users changed (None: any). What a runtime without a sequencer, and tests, do."""
    policy = shared.policy
    if change.command == "load":
        new, reply = admin.acl_load(policy.users_file or None, policy.table, require_default=True)[:2]
        if new is not None:
            shared.swap(policy.with_users(new), None, ())
        return reply, None
    result = change.computed[1]
    changed = {change.args[0].decode("utf-8", "surrogateescape")}
    shared.swap(policy.with_users(result[0]), changed, result[2] if change.command == "deluser" else [])
    return result[1], changed


def carry_out(session: Any) -> None:
    """Carry out what ``session`` waits for, in-line, until it waits for nothing (tests; tools)."""
    while (effect := session.effect) is not None:
        if isinstance(effect, Offload):
            session.offloaded(*session.decide_offloaded(effect.argv))
        elif isinstance(effect, Sleep):
            session.resume()
        else:
            reply, changed = apply_users_change(session.shared, effect)
            state, users = session.state, session.shared.policy.users
            if state.user.name in users and (changed is None or state.user.name in changed):
                state.user = users[state.user.name]  # (a transport's sequencer rebinds every client)
            session.acknowledged(reply)

