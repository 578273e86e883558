"""The per-client protocol state machine, sans-IO: bytes in, bytes out.

Theory of operation
-------------------
A :class:`Session` sits between one client and its own upstream connection. ``client_data()``
parses requests and decides each one, in Redis's order (processCommand):

    unknown or disabled command → wrong arity → NOAUTH → ACL (command, keys, channels) → run

Requests that pass are forwarded upstream; everything else gets a reply made here. Commands the
proxy owns (AUTH, the AUTH part of HELLO, QUIT, ACL WHOAMI, user-changing ACL subcommands) are never
forwarded: clients never authenticate to Redis, the proxy does, once, as its own service user.

Replies must reach the client in request order: :class:`~redisguard.session.replies.ReplyQueue` (in
``self.replies``) holds what the client is owed and matches Redis's bytes against it; the session tells
it what each request will be answered with (``_expect``, ``_reply``).

CLIENT REPLY OFF/SKIP silence a request's reply whoever makes it (Redis or the proxy), so a silenced
request owes nothing and its refusal is dropped, as Redis does.

Transactions: a command refused inside MULTI answers at once and marks the transaction, as Redis
does; EXEC then answers ``-EXECABORT``, and the proxy makes Redis abort its transaction at EXEC as it
would have (a request Redis refuses at queue time, then EXEC; their replies swallowed). A refusal Redis
makes only when the command runs (``Verdict.at_exec``: SORT's BY/GET) is queued instead: a stand-in
that reaches no key is forwarded, and its element of EXEC's reply becomes the refusal.

Modes (:class:`Mode`, ``Session.mode``): NORMAL → MULTI (MULTI … EXEC/DISCARD/RESET), SUBSCRIBED
(while any subscription is held), MONITOR (until the connection ends), CLOSING (QUIT, a protocol
error, end of input: nothing more is read, the owed replies are sent, then the connection closes).
A RESP3 client may be subscribed and in a transaction at once; ``mode`` names the one that governs
what the client may send next, in the order CLOSING, MONITOR, MULTI, SUBSCRIBED.

The session is split by job: the request pipeline (:mod:`.session_pipeline`), logins and ACL
commands (:mod:`.session_acl`), state-changing commands (:mod:`.session_state`), the reply queue
(:mod:`.reply_queue`). Its outputs are explicit: ``data_for_upstream()``, ``data_for_client()``,
and for the transport ``paused``/``wait``/``offload`` (run this off the loop), ``backlog`` (call
``resume()`` next turn) and ``closing``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redisguard.acl import User
from redisguard.commands.table import Command, get_channels, get_keys
from redisguard.policy.decide import Policy, Shared, Verdict, decide
from redisguard.policy.guards import source_key
from redisguard.protocol.request import RequestParser
from redisguard.protocol.resp import encode_command
from redisguard.session.admin import LoginsAndACL
from redisguard.session.pipeline import RequestPipeline
from redisguard.session.replies import CONFIRMATIONS, PUBSUB, QUIET, RELAY, ReplyQueue
from redisguard.session.state import StateCommands

# The verdicts that are the ACL's (audit mode forwards these; the others are Redis's own answers).
ACL_REASONS = frozenset({"command", "key", "channel"})
# In RESP2 pub/sub mode Redis runs only these (processCommand), refusing the rest after the ACL check.
_SUBSCRIBED_CONTEXT = frozenset({"ping", "quit", "reset", "subscribe", "psubscribe", "ssubscribe",
                                 "unsubscribe", "punsubscribe", "sunsubscribe"})
_SUBSCRIBE = {c.decode() for c in CONFIRMATIONS}


class Mode(enum.Enum):
    NORMAL = "normal"
    MULTI = "multi"
    SUBSCRIBED = "subscribed"
    MONITOR = "monitor"
    CLOSING = "closing"


def take(out: list[bytes]) -> bytes:
    """The bytes queued in ``out``, joined (and ``out`` emptied)."""
    data = out[0] if len(out) == 1 else b"".join(out)
    out.clear()
    return data


class Session(RequestPipeline, LoginsAndACL, StateCommands):
    __slots__ = (
        "_admin_done", "_decided", "_exec_changes", "_last", "_more", "_multi_subs", "_multi_user",
        "_offload_basis", "_paused", "_pending", "_plain_rest", "_queued", "_refused", "_replay", "_replay_auth", "_silent",
        "_skip_next", "_skipping", "_spent", "_unparsed", "authenticated", "awaiting", "in_multi", "listener", "local",
        "multi_dirty", "offload", "parser", "peer", "replies", "reply_off", "resp", "shared", "source",
        "stopped", "subscriptions", "tls_identity", "to_client", "to_upstream", "upstream_login", "upstream_opened",
        "user", "wait", "_watching",
    )  # fmt: skip

    def __init__(
        self,
        shared: Shared,
        listener: str = "",
        peer: str = "",
        tls_identity: str = "",
        local: bool = False,
        source: str = "",
    ) -> None:
        self.shared = shared  # the policy in force and the services every session reports to
        self.local = local  # a loopback or unix-socket client (Redis's "local" for protected commands)
        self.listener = listener
        self.peer = peer
        # the address AUTH throttling keys on (the transport's; else read off the peer string)
        self.source = source or source_key(peer.rpartition(":")[0] or peer)
        self.tls_identity = tls_identity
        self.to_upstream: list[bytes] = []
        self.replies = ReplyQueue(self)  # what the client is owed, in order
        self.to_client = self.replies.to_client  # the queue's output list (the same list, never replaced)
        self.stopped = False
        self.upstream_opened = False
        self.upstream_login: bytes | None = None  # mirror mode: the first upstream AUTH, sent by the link itself
        self.parser = RequestParser(shared.policy.max_request_bytes)
        self.resp = 2
        self.in_multi = False
        self._watching = False  # a WATCH is in force (it can make EXEC abort)
        self.multi_dirty = False
        self.subscriptions: dict[str, set[bytes]] = {"": set(), "p": set(), "s": set()}
        self._multi_subs: list[tuple[str, bytes, bool]] = []  # queued in MULTI: (kind, channel, unsubscribe)
        # per EXEC_SUBS slot: the subscription changes of its transaction, made if it was not aborted
        self._exec_changes: deque[list[tuple[str, bytes, bool]]] = deque()
        self.reply_off = False  # CLIENT REPLY OFF
        self._skip_next = False  # CLIENT REPLY SKIP: the next command gets no reply
        self._silent = False  # the command being handled gets no reply (OFF or SKIP)
        self._skipping = False
        self._last: tuple[Command | None, list[bytes]] = (None, [])
        # Requests parsed but not yet decided: the session waits while an AUTH is throttled or a huge
        # request is decided off the loop (the transport stops reading meanwhile).
        self._pending: deque[list[bytes]] = deque()
        self.wait = 0.0  # > 0: the transport calls resume() after this many seconds
        self.offload: list[bytes] | None = None  # a request the transport decides in a worker thread
        self.awaiting: Any = None  # a reply the transport awaits (an ACL change put in force everywhere)
        self._paused = False
        self._replay = False  # the request at the head of _pending was started before the pause
        self._more = False  # the last batch ran out of budget with requests left to parse or decide
        self._unparsed: list[bytes] = []  # bytes that arrived while requests were waiting
        self._spent = 0.0  # estimated ns of ACL checks this event-loop turn (TURN_NS)
        self._plain_rest: list[list[bytes]] = []  # fast-path requests past the last turn's TURN_NS
        self._replay_auth = False  # ... and it is an AUTH whose throttle delay has been served
        self._decided: tuple[list[bytes], Verdict, list[bytes]] | None = None
        self._offload_basis: tuple[User, Policy, bool] | None = None  # whom and what offload is decided for
        self._multi_user: User | None = None
        self._queued: list[list[bytes]] = []  # the commands queued since MULTI
        self._refused: dict[int, bytes] = {}  # of those, by position: what Redis will answer at EXEC instead
        self._admin_done: Any = None  # (users it was computed from, result) of an offloaded ACL admin command
        self.user: User
        self._become_default()
        self.parser.authenticated = self.authenticated or not self._auth_required()

    # -- helpers ----------------------------------------------------------------------------------
    def _become_default(self) -> None:
        d = self.policy.default_user
        self.user = d
        self.authenticated = d.nopass and d.enabled

    def _auth_required(self) -> bool:
        d = self.policy.default_user
        return (not d.nopass or not d.enabled) and not self.authenticated

    @property
    def address(self) -> str:
        """The client's IP address without the port, or "unix" (what [acl.user_sources] matches)."""
        return self.peer.rpartition(":")[0].strip("[]") if ":" in self.peer else self.peer or "unix"

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    @property
    def username(self) -> str:
        return self.user.name

    @property
    def mode(self) -> Mode:
        if self.stopped or self.closing:
            return Mode.CLOSING
        if self.monitoring:
            return Mode.MONITOR
        if self.in_multi:
            return Mode.MULTI
        return Mode.SUBSCRIBED if self.subscribed else Mode.NORMAL

    @property
    def at_rest(self) -> bool:
        """Nothing owed, nothing waiting, no reply half relayed: closing now cuts no reply (a drain
        closes a client only then)."""
        r = self.replies
        return (not r.slots and not self._pending and not self._unparsed and not self._paused and not self._more
                and not self._plain_rest
                and r.scanner.idle and not r.carry and not r.held)  # fmt: skip

    @property
    def idle(self) -> bool:
        """Nothing owed to the client (not blocked, not waiting for replies), not subscribed nor
        monitoring: Redis's `timeout` may close it. Read from the state itself, not from ``mode``: a
        RESP3 client can be subscribed inside MULTI (mode MULTI), and Redis's CLIENT_PUBSUB spares it."""
        return (not self.replies.slots and not self._pending and not self._plain_rest and not self.subscribed
                and not self.monitoring)

    @property
    def subscribed(self) -> bool:
        """In RESP2 pub/sub mode, where replies and messages are both plain arrays."""
        subs = self.subscriptions
        return bool(subs[""] or subs["p"] or subs["s"])

    def upstream_auth_refused(self) -> None:
        self.shared.observer.upstream_auth_failed(self)

    def reply_latency(self, seconds: float) -> None:
        self.shared.observer.reply_latency(seconds)

    def _open_upstream(self) -> None:
        """Before the first request goes upstream: the service user's AUTH goes first.

        The upstream connection itself is opened by the transport when ``to_upstream`` first has
        bytes, so a client that never gets a request through (unauthenticated, refused) costs Redis
        no connection."""
        if self.upstream_opened:
            return
        self.upstream_opened = True
        self._upstream_login(self.user)

    def _reply(self, data: bytes) -> None:
        """A reply made here, in order behind whatever upstream replies are still owed."""
        if not self._silent:
            self.replies.synth(data)

    def _expect(self, kind: int, n: int = 1) -> None:
        self.replies.expect(kind, n)

    def _forward(self, argv: Sequence[bytes], replies: int = 1, kind: int = RELAY) -> None:
        """Send ``argv`` upstream, canonically encoded: Redis reads exactly the argv that was checked."""
        self._open_upstream()
        decided = self._decided
        if decided is not None and decided[0] is argv and decided[2]:
            self.to_upstream.extend(decided[2])  # encoded off the loop with its verdict
        else:
            self.to_upstream.append(encode_command(argv))
        if kind != PUBSUB:  # (un)subscribe confirmations are pushes: OFF and SKIP never silence them
            if not replies or self.reply_off:  # Redis sends nothing while CLIENT REPLY is OFF
                return
            if self._skipping:  # CLIENT REPLY SKIP is the proxy's: Redis answers, the client gets nothing
                kind = QUIET[kind]
        self._expect(kind, replies)

    def _close_after_replies(self) -> None:
        self.stopped = True  # nothing the client sends after this is read
        self.replies.close_after()

    def _reject(self, cmd: Command | None, error: bytes, reason: str, name: str = "") -> None:
        """Refuse a request the way Redis's rejectCommand does."""
        name = name or (cmd.name if cmd is not None else "unknown")
        self.shared.observer.command(self, name, False, reason)
        if cmd is not None and cmd.name == "exec":
            msg = error[5:] if error.startswith(b"-ERR ") else error[1:]
            self._abort_exec(b"-EXECABORT Transaction discarded because of: " + msg)
            return
        if self.in_multi:
            self.multi_dirty = True
        self._reply(error)

    def last_keys(self) -> list[str]:
        """Key names of the request being decided (for audit logs that opt in to key names)."""
        cmd, argv = self._last
        if cmd is None:
            return []
        return [argv[i].decode("utf-8", "replace")[:200] for i, _ in get_keys(cmd, argv)][:16]

    def _command(self, argv: list[bytes]) -> None:
        replay, self._replay = self._replay, False
        if not replay:
            # CLIENT REPLY: like Redis's resetClient(), SKIP applies to the very next request, whatever it is.
            self._skipping = self._skip_next
            self._silent = self.reply_off or self._skipping
            self._skip_next = False
        decided = self._decided
        if decided is not None and decided[0] is argv:
            verdict = decided[1]
        elif self._offloads(argv):
            self.offload = argv  # checking (and encoding) this many arguments is done off the loop
            # ... against the user and users of this moment: if they change before the verdict is
            # used (a revocation, ACL LOAD, a reload), the verdict is stale and is made again
            self._offload_basis = (self.user, self.policy, self._auth_required())
            self._paused = self._replay = True
            return
        else:
            verdict = decide(self.policy, self.user, argv, self._auth_required(), self.local)
        cmd = verdict.cmd
        self._last = (cmd, argv)
        at_exec: bytes | None = None  # a refusal Redis makes when the command runs, after the checks below
        if verdict.error is not None:
            if verdict.reason in ACL_REASONS and cmd is not None and cmd.name not in self.special \
                    and self.policy.audits(self.user):  # fmt: skip
                # audit mode: what the policy would deny is forwarded to Redis, and logged and counted
                # as such. Never the commands redisguard answers itself (ACL SETUSER, ACL LIST, AUTH,
                # ...): those act on redisguard's own users, beyond the audited user.
                self.shared.observer.would_deny(self, verdict.name, verdict.reason)
            elif verdict.at_exec:
                at_exec = verdict.error
            else:
                if verdict.reason in ACL_REASONS:
                    self._acl_log(verdict.reason, verdict.name.encode() if verdict.reason == "command" else argv[verdict.index])
                self._reject(cmd, verdict.error, verdict.reason, verdict.name)
                return
        assert cmd is not None
        if self.resp == 2 and self.subscribed and cmd.name not in _SUBSCRIBED_CONTEXT:
            self._reject(cmd, b"-ERR Can't execute '%s': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / "
                         b"RESET are allowed in this context\r\n" % cmd.name.encode(), "context")  # fmt: skip
            return
        if self.in_multi and "no_multi" in cmd.flags:  # Redis refuses it at queueing (and EXEC aborts)
            self._reject(cmd, b"-ERR Command not allowed inside a transaction\r\n", "context")
            return
        if at_exec is not None:
            if self.in_multi:
                self._queue_refused(cmd, argv, at_exec, verdict.reason)  # queued; the error comes inside EXEC's reply
            else:
                self._reject(cmd, at_exec, verdict.reason, verdict.name)  # (no ACL LOG entry, as in Redis)
            return
        if not self._replay_auth:  # a throttled AUTH was counted when it first arrived
            self.shared.observer.command(self, cmd.name, True, "")
            if self.shared.profile is not None and self.authenticated:
                self.shared.profile.record(self.user.name, cmd, argv, get_keys(cmd, argv), get_channels(cmd, argv))
        if self.in_multi and cmd.name not in ("exec", "discard"):
            self._queued.append(argv)  # EXEC checks them again if the user's rules changed meanwhile
        handler = _HANDLERS.get(cmd.name)
        if handler is not None:
            handler(self, cmd, argv)
        else:
            self._forward(argv)

    # -- commands the proxy handles ---------------------------------------------------------------
    # -- upstream → client: the reply queue ------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.replies.data(data)

    def upstream_failed(self, message: str) -> None:
        """The upstream is gone or unusable: say so in one line and close."""
        self._exec_changes.clear()
        self.replies.failed(message)

    def data_for_client(self) -> bytes:
        """What to send the client now (and forget it)."""
        return take(self.to_client)

    def data_for_upstream(self) -> bytes:
        """What to send Redis now (and forget it)."""
        return take(self.to_upstream)

    @property
    def closing(self) -> bool:
        """Close the client once to_client is flushed."""
        return self.replies.closing

    @property
    def monitoring(self) -> bool:
        return self.replies.monitoring


_HANDLERS: dict[str, Callable[[Session, Command, list[bytes]], None]] = {
    "auth": Session._cmd_auth,
    "hello": Session._cmd_hello,
    "quit": Session._cmd_quit,
    "reset": Session._cmd_reset,
    "multi": Session._cmd_multi,
    "exec": Session._cmd_exec,
    "discard": Session._cmd_discard,
    **{name: Session._cmd_acl for name in ["acl|" + s for s in
       ("whoami", "setuser", "deluser", "load", "save", "list", "users", "getuser", "dryrun", "log")]},
    "client|reply": Session._cmd_client,
    "monitor": Session._cmd_monitor,
    "watch": Session._cmd_watch,
    "unwatch": Session._cmd_watch,
    **{name: Session._cmd_subscribe for name in _SUBSCRIBE},
}  # fmt: skip
Session.special = frozenset(_HANDLERS)
