"""A client's state: the only place it lives.

Rules
-----
1. Everything that affects how a client's next request is decided or answered lives in a
   :class:`ClientState` (who it is, its RESP version, MULTI, pub/sub, CLIENT REPLY) or in its one
   :class:`Suspension` (the requests it has sent that are not decided yet, and what they wait for).
   Handlers (logins, admin, transactions, pubsub, connection) change it; nothing else does.
2. A :class:`~redisguard.acl.User` never changes: a change of rights makes a new one, so
   ``state.user is state.multi_user`` and ``state.multi_generation`` still the policy's generation
   say the rules did not change since MULTI (the user alone does not: the same User can come back).
3. ``in_multi`` ⇒ ``queued`` holds the commands queued since MULTI (EXEC checks them again) and
   ``multi_subs`` the subscription changes they make, applied only when EXEC's reply says it ran
   (``exec_changes``, one list per EXEC still owed).
4. ``subscriptions`` is what Redis has confirmed or will confirm: RESP2 ``subscribed`` ⇔ any is held.
5. ``silent``: the request being handled gets no reply (CLIENT REPLY OFF, or SKIP for this one:
   ``skipping``); ``skip_next`` arms SKIP for the request after.
6. ``stopped``: nothing the client sends any more is read (QUIT, a protocol error, end of input,
   a disconnect); the replies owed are still sent.
7. At most one suspension at a time: while ``paused``, requests wait in order (``pending``, then
   ``unparsed`` bytes) until what the session waits for (``effect``) is carried out, or an upstream
   reply (an EXEC's outcome) comes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redisguard.acl import User
from redisguard.commands.table import Command
from redisguard.policy.decide import Policy, Verdict

NO_REQUEST: tuple[Command | None, list[bytes]] = (None, [])  # ``last`` between requests


@dataclass(eq=False)
class ClientState:
    # who: where the client is, and as whom it is logged in
    listener: str
    peer: str
    source: str  # the address AUTH throttling keys on
    tls_identity: str
    local: bool  # a loopback or unix-socket client (Redis's "local" for protected commands)
    user: User
    authenticated: bool = False
    upstream_opened: bool = False
    upstream_login: bytes | None = None  # mirror mode: the first upstream AUTH, sent by the link itself
    resp: int = 2
    # MULTI
    in_multi: bool = False
    multi_dirty: bool = False  # a command was refused while queueing: EXEC answers EXECABORT
    watching: bool = False  # a WATCH is in force (it can make EXEC abort)
    multi_user: User | None = None
    multi_generation: int = 0  # Shared.generation at MULTI: the policy in force then
    queued: list[list[bytes]] = field(default_factory=list)
    refused: dict[int, bytes] = field(default_factory=dict)  # of those, by position: what EXEC answers instead
    multi_subs: list[tuple[str, bytes, bool]] = field(default_factory=list)  # (kind, channel, unsubscribe)
    exec_changes: deque[list[tuple[str, bytes, bool]]] = field(default_factory=deque)
    # pub/sub: channels "", patterns "p", shard channels "s"
    subscriptions: dict[str, set[bytes]] = field(default_factory=lambda: {"": set(), "p": set(), "s": set()})
    # CLIENT REPLY
    reply_off: bool = False
    skip_next: bool = False
    silent: bool = False
    skipping: bool = False
    stopped: bool = False
    last: tuple[Command | None, list[bytes]] = NO_REQUEST  # the request being decided (audit keys, EXEC's argv)
    # What CLIENT LIST/INFO/KILL show of it (session/clients.py), set by the transport: (addr, laddr) as
    # Redis would show this client, and its upstream socket as Redis shows it (b"": none yet).
    addrs: tuple[bytes, bytes] = (b"", b"")
    upstream_addr: bytes = b""

    @property
    def subscribed(self) -> bool:
        """In RESP2 pub/sub mode, where replies and messages are both plain arrays."""
        subs = self.subscriptions
        return bool(subs[""] or subs["p"] or subs["s"])


@dataclass(eq=False)
class Suspension:
    """The requests a client sent that are not decided yet, and what they wait for (rule 7)."""

    pending: deque[list[bytes]] = field(default_factory=deque)  # parsed, in order
    unparsed: list[bytes] = field(default_factory=list)  # bytes that arrived while requests waited
    plain_rest: list[list[bytes]] = field(default_factory=list)  # fast-path requests past the turn's budget
    paused: bool = False
    replay: bool = False  # the request at the head of ``pending`` was started before the pause
    replay_auth: bool = False  # ... and it is an AUTH whose throttle delay has been served
    more: bool = False  # the last batch ran out of budget with requests left
    spent: float = 0.0  # estimated ns of ACL checks this event-loop turn (pipeline.TURN_NS)
    effect: Any = None  # what the session waits for (an effects.Effect), carried out by the runtime
    # whom and what an offloaded decision is made for: if they change before it is used, it is made again
    basis: tuple[User, Policy, bool] | None = None
    decided: tuple[list[bytes], Verdict, list[bytes]] | None = None  # an offloaded decision, in use
    admin_done: Any = None  # (users it was computed from, result) of an offloaded ACL admin command
