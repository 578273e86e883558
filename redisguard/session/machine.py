"""The per-client protocol state machine, sans-IO: bytes in, bytes out, and effects.

Theory of operation
-------------------
A :class:`Session` sits between one client and its own upstream connection. ``client_data()``
parses requests and decides each one, in Redis's order (processCommand):

    unknown or disabled command → wrong arity → NOAUTH → ACL (command, keys, channels) → run

Requests that pass are forwarded upstream; everything else gets a reply made here. Commands the
proxy owns (AUTH, the AUTH part of HELLO, QUIT, ACL WHOAMI, user-changing ACL subcommands) are never
forwarded: clients never authenticate to Redis, the proxy does, once, as its own service user.

The parts: the client's state (:mod:`.state`: one ClientState, one Suspension), the steps every
handler shares and the outputs (:mod:`.core`), the pipeline that parses and decides in bounded batches
(:mod:`.pipeline`), the reply queue that matches Redis's bytes to requests (:mod:`.replies`), and one
module of handlers per concern (:mod:`.logins`, :mod:`.admin`, :mod:`.transactions`, :mod:`.pubsub`,
:mod:`.connection`), dispatched from ``HANDLERS``. What the session needs from the world (a decision
off the loop, a timer, a change of users for every client) is an effect (:mod:`.effects`) in
``effect``, carried out by the runtime. Outputs: ``data_for_upstream()``, ``data_for_client()``,
``paused``/``effect``, ``backlog`` (call ``resume()`` next turn) and ``closing``.

Modes (:class:`Mode`, ``Session.mode``): NORMAL → MULTI (MULTI … EXEC/DISCARD/RESET), SUBSCRIBED
(while any subscription is held), MONITOR (until the connection ends), CLOSING (QUIT, a protocol
error, end of input: nothing more is read, the owed replies are sent, then the connection closes).
A RESP3 client may be subscribed and in a transaction at once; ``mode`` names the one that governs
what the client may send next, in the order CLOSING, MONITOR, MULTI, SUBSCRIBED.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

from redisguard.acl import User
from redisguard.acl.admin import Reason
from redisguard.commands.table import Command, get_channels, get_keys
from redisguard.policy.decide import Policy, Shared, Verdict, decide
from redisguard.policy.guards import source_key
from redisguard.protocol.request import RequestParser
from redisguard.session import admin, clients, connection, logins, pubsub, transactions
from redisguard.session.core import SPECIAL, Core
from redisguard.session.effects import Effect
from redisguard.session.pipeline import Pipeline
from redisguard.session.replies import ReplyQueue
from redisguard.session.state import NO_REQUEST, ClientState

# The verdicts that are the ACL's (audit mode forwards these; the others are Redis's own answers).
ACL_REASONS: dict[str, Reason] = {"command": "command", "key": "key", "channel": "channel"}
# In RESP2 pub/sub mode Redis runs only these (processCommand), refusing the rest after the ACL check.
_SUBSCRIBED_CONTEXT = frozenset({"ping", "quit", "reset", "subscribe", "psubscribe", "ssubscribe",
                                 "unsubscribe", "punsubscribe", "sunsubscribe"})

Handler = Callable[[Core, Command, list[bytes]], None]
HANDLERS: dict[str, Handler] = {
    "auth": logins.auth,
    "hello": logins.hello,
    "quit": connection.quit_,
    "reset": connection.reset,
    "client|reply": connection.client_reply,
    "monitor": connection.monitor,
    **{name: clients.proxied_view for name in ("client|list", "client|info", "cluster|shards")},
    "client|kill": clients.client_kill,
    "multi": transactions.multi,
    "exec": transactions.exec_,
    "discard": transactions.discard,
    "watch": transactions.watch,
    "unwatch": transactions.watch,
    **{name: pubsub.subscribe for name in pubsub.SUBSCRIBE_KIND},
    **{name: admin.acl for name in SPECIAL if name.startswith("acl|")},
}  # fmt: skip
assert set(HANDLERS) == SPECIAL, "core.SPECIAL names the commands the handlers answer"


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


class Session:
    special = SPECIAL  # commands the session handles itself (never on the fast path)

    __slots__ = ("core", "pipeline", "replies", "state", "susp")

    def __init__(self, shared: Shared, listener: str = "", peer: str = "", tls_identity: str = "",
                 local: bool = False, source: str = "") -> None:  # fmt: skip
        self.state = ClientState(listener, peer, source or source_key(peer.rpartition(":")[0] or peer), tls_identity,
                                 local, shared.policy.default_user, addrs=(peer.encode(), b""))  # fmt: skip
        self.replies = ReplyQueue(self)  # what the client is owed, in order
        self.core = Core(shared, self.state, self.replies, self)
        self.susp = self.core.susp
        self.pipeline = Pipeline(self.core, functools.partial(command, self), RequestParser(shared.policy.max_request_bytes))
        self.core.become_default()
        self.pipeline.parser.authenticated = self.state.authenticated or not self.core.auth_required()

    # -- what the transport, the runtime and the observers read ---------------------------------
    @property
    def shared(self) -> Shared:
        return self.core.shared

    @property
    def policy(self) -> Policy:
        return self.core.shared.policy

    @property
    def user(self) -> User:
        return self.state.user

    @property
    def authenticated(self) -> bool:
        return self.state.authenticated

    @property
    def listener(self) -> str:
        return self.state.listener

    @property
    def peer(self) -> str:
        return self.state.peer

    @property
    def tls_identity(self) -> str:
        return self.state.tls_identity

    @property
    def address(self) -> str:
        """The client's IP address without the port, or "unix" (what [acl.user_sources] matches)."""
        return self.core.address

    @property
    def resp(self) -> int:
        return self.state.resp

    @property
    def subscribed(self) -> bool:
        return self.state.subscribed

    @property
    def stopped(self) -> bool:
        return self.state.stopped

    @property
    def upstream_login(self) -> bytes | None:
        return self.state.upstream_login

    @property
    def to_upstream(self) -> list[bytes]:
        return self.core.to_upstream

    @property
    def to_client(self) -> list[bytes]:
        return self.core.to_client

    @property
    def effect(self) -> Effect | None:
        """What the session waits for, to be carried out by the runtime (None: nothing)."""
        effect: Effect | None = self.susp.effect
        return effect

    @property
    def paused(self) -> bool:
        """Waiting for ``effect`` (or an EXEC's reply): the transport should not read from the client."""
        return self.susp.paused

    @property
    def backlog(self) -> bool:
        return self.pipeline.backlog

    @property
    def closing(self) -> bool:
        """Close the client once to_client is flushed."""
        return self.replies.closing

    @property
    def monitoring(self) -> bool:
        return self.replies.monitoring

    @property
    def mode(self) -> Mode:
        if self.state.stopped or self.closing:
            return Mode.CLOSING
        if self.monitoring:
            return Mode.MONITOR
        if self.state.in_multi:
            return Mode.MULTI
        return Mode.SUBSCRIBED if self.state.subscribed else Mode.NORMAL

    @property
    def at_rest(self) -> bool:
        """Nothing owed, nothing waiting, no reply half relayed: closing now cuts no reply (a drain
        closes a client only then)."""
        r, s = self.replies, self.susp
        return (not r.slots and not s.pending and not s.unparsed and not s.paused and not s.more
                and not s.plain_rest and r.scanner.idle and not r.carry and not r.held)  # fmt: skip

    @property
    def idle(self) -> bool:
        """Nothing owed to the client (not blocked, not waiting for replies), not subscribed nor
        monitoring: Redis's `timeout` may close it. Read from the state itself, not from ``mode``: a
        RESP3 client can be subscribed inside MULTI (mode MULTI), and Redis's CLIENT_PUBSUB spares it."""
        s = self.susp
        return (not self.replies.slots and not s.pending and not s.plain_rest and not self.state.subscribed
                and not self.monitoring)

    def last_keys(self) -> list[str]:
        """Key names of the request being decided (for audit logs that opt in to key names)."""
        cmd, argv = self.state.last
        if cmd is None:
            return []
        return [argv[i].decode("utf-8", "replace")[:200] for i, _ in get_keys(cmd, argv)][:16]

    # -- client → session ----------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        self.pipeline.client_data(data)

    def resume(self) -> None:
        self.pipeline.resume()

    def offloaded(self, verdict: Verdict, encoded: list[bytes], extra: Any = None) -> None:
        self.pipeline.offloaded(verdict, encoded, extra)

    def decide_offloaded(self, argv: list[bytes]) -> tuple[Verdict, list[bytes], Any]:
        return self.pipeline.decide_offloaded(argv)

    def acknowledged(self, reply: bytes) -> None:
        """The runtime put the ChangeUsers effect in force: its reply, in its place; then the requests
        held behind it are decided."""
        self.susp.effect = None
        self.core.reply(reply)
        self.susp.paused = False
        self.pipeline.run()

    def login_certificate(self, identity: str) -> bool:
        ok = logins.login_certificate(self.core, identity)
        if ok:
            self.pipeline.parser.authenticated = True
        return ok

    def rebind(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> str:
        """The users changed (a reload, an ACL change): see :func:`.admin.rebind`."""
        return admin.rebind(self.state, users, changed, deleted)

    def kill(self) -> None:
        self.pipeline.kill()

    def end_of_input(self) -> None:
        """The client sent its last byte: close once every reply it is owed has been sent."""
        if not self.state.stopped and not self.closing:
            self.core.close_after_replies()

    # -- upstream → client: the reply queue (ReplyOwner) ----------------------------------------
    def upstream_data(self, data: bytes) -> None:
        self.replies.data(data)

    def upstream_failed(self, message: str) -> None:
        """The upstream is gone or unusable: say so in one line and close."""
        self.state.exec_changes.clear()
        self.replies.failed(message)

    def exec_done(self, frame: bytes) -> None:
        transactions.exec_done(self.core, frame)

    def upstream_auth_refused(self) -> None:
        self.core.shared.observer.upstream_auth_failed(self)

    def reply_latency(self, seconds: float) -> None:
        self.core.shared.observer.reply_latency(seconds)

    def data_for_client(self) -> bytes:
        """What to send the client now (and forget it)."""
        return take(self.core.to_client)

    def data_for_upstream(self) -> bytes:
        """What to send Redis now (and forget it)."""
        return take(self.core.to_upstream)


def command(session: Session, argv: list[bytes]) -> None:
    """Decide one request and run it: a handler, or forwarded (the pipeline calls it for each request
    the fast path does not take)."""
    try:
        _command(session, argv)
    finally:
        # ``last`` is the request being decided, no longer: kept, one huge request would stay in memory
        # (and be walked by every GC pass) as long as the connection lives.
        session.state.last = NO_REQUEST


def _command(session: Session, argv: list[bytes]) -> None:
    c, st, s = session.core, session.state, session.susp
    replay, s.replay = s.replay, False
    if not replay:
        # CLIENT REPLY: like Redis's resetClient(), SKIP applies to the very next request, whatever it is.
        st.skipping = st.skip_next
        st.silent = st.reply_off or st.skipping
        st.skip_next = False
    decided = s.decided
    if decided is not None and decided[0] is argv:
        verdict: Verdict = decided[1]
    elif session.pipeline.offloads(argv):
        session.pipeline.offload(argv)  # checking (and encoding) this many arguments is done off the loop
        return
    else:
        verdict = decide(c.policy, st.user, argv, c.auth_required(), st.local)
    cmd = verdict.cmd
    st.last = (cmd, argv)
    observer = c.shared.observer
    at_exec: bytes | None = None  # a refusal Redis makes when the command runs, after the checks below
    if verdict.error is not None:
        if verdict.reason in ACL_REASONS and cmd is not None and cmd.name not in SPECIAL \
                and c.policy.audits(st.user):  # fmt: skip
            # audit mode: what the policy would deny is forwarded to Redis, and logged and counted
            # as such. Never the commands redisguard answers itself (ACL SETUSER, ACL LIST, AUTH,
            # ...): those act on redisguard's own users, beyond the audited user.
            observer.would_deny(session, verdict.name, verdict.reason)
        elif verdict.at_exec:
            at_exec = verdict.error
        else:
            if (why := ACL_REASONS.get(verdict.reason)) is not None:
                c.acl_log(why, verdict.name.encode() if why == "command" else argv[verdict.index])
            c.reject(cmd, verdict.error, verdict.reason, verdict.name)
            return
    assert cmd is not None
    if st.resp == 2 and st.subscribed and cmd.name not in _SUBSCRIBED_CONTEXT:
        c.reject(cmd, b"-ERR Can't execute '%s': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / "
                 b"RESET are allowed in this context\r\n" % cmd.name.encode(), "context")  # fmt: skip
        return
    if st.in_multi and "no_multi" in cmd.flags:  # Redis refuses it at queueing (and EXEC aborts)
        c.reject(cmd, b"-ERR Command not allowed inside a transaction\r\n", "context")
        return
    if at_exec is not None:
        if st.in_multi:
            transactions.queue_refused(c, cmd, argv, at_exec, verdict.reason)  # its error comes inside EXEC's reply
        else:
            c.reject(cmd, at_exec, verdict.reason, verdict.name)  # (no ACL LOG entry, as in Redis)
        return
    if not s.replay_auth:  # a throttled AUTH was counted when it first arrived
        observer.command(session, cmd.name, True, "")
        if c.shared.profile is not None and st.authenticated:
            c.shared.profile.record(st.user.name, cmd, argv, get_keys(cmd, argv), get_channels(cmd, argv))
    if st.in_multi and cmd.name not in ("exec", "discard"):
        st.queued.append(argv)  # EXEC checks them again if the user's rules changed meanwhile
    handler = HANDLERS.get(cmd.name)
    if handler is not None:
        handler(c, cmd, argv)
    else:
        c.forward(argv)
