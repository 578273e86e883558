"""A session's state and outputs, and the steps every handler shares: reply, forward, refuse.

:class:`Core` holds the one :class:`~.state.ClientState` and :class:`~.state.Suspension` of a client,
the bytes owed to Redis (``to_upstream``) and the reply queue (what the client is owed, in order).
Handlers (:mod:`.logins`, :mod:`.admin`, :mod:`.transactions`, :mod:`.pubsub`, :mod:`.connection`) are
functions of a Core and a request; :class:`~.machine.Session` composes it with the pipeline.

CLIENT REPLY OFF/SKIP silence a request's reply whoever makes it (Redis or the proxy), so a silenced
request owes nothing and its refusal is dropped, as Redis does. A command refused inside MULTI
answers at once and marks the transaction, as Redis does; EXEC then answers ``-EXECABORT``, and the
proxy makes Redis abort its transaction at EXEC as it would have (:meth:`Core.abort_exec`). A refusal
Redis makes only when the command runs (``Verdict.at_exec``: SORT's BY/GET) is queued instead: a
stand-in that reaches no key is forwarded, and its element of EXEC's reply becomes the refusal
(:mod:`.transactions`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from redisguard.acl import User
from redisguard.acl.admin import Reason
from redisguard.commands.table import Command
from redisguard.policy.decide import Policy, Shared
from redisguard.policy.ports import ClientInfo
from redisguard.protocol.resp import encode_command
from redisguard.session.replies import AUTHCHECK, PUBSUB, QUIET, RELAY, SWALLOW, ReplyQueue
from redisguard.session.state import ClientState, Suspension

# The commands the session answers or follows itself (the handlers of machine.py): never on the
# fast path, never forwarded by audit mode without their handler.
ACL_HANDLED = ("whoami", "setuser", "deluser", "load", "save", "list", "users", "getuser", "dryrun", "log")
SPECIAL = frozenset({"auth", "hello", "quit", "reset", "multi", "exec", "discard", "client|reply", "monitor", "watch",
                     "client|list", "client|info", "client|kill", "cluster|shards",
                     "unwatch", "subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe",
                     *("acl|" + s for s in ACL_HANDLED)})  # fmt: skip
# Refused by Redis itself at queue time (GET takes exactly one argument), which flags the transaction.
POISON = encode_command([b"GET"])
# ACL LOG keeps at most this much of a key, channel or user name (Redis keeps all of it).
ACL_LOG_OBJECT_MAX = 4096


class Core:
    __slots__ = ("client", "peers", "shared", "state", "susp", "replies", "to_upstream", "to_client")

    def __init__(self, shared: Shared, state: ClientState, replies: ReplyQueue, client: ClientInfo) -> None:
        self.client = client  # what observers are told about (the session)
        self.shared = shared  # the policy in force and the services every session reports to
        self.state = state
        self.susp = Suspension()
        self.replies = replies
        self.to_upstream: list[bytes] = []
        self.to_client = replies.to_client  # the queue's output list (the same list, never replaced)
        # This process's proxied clients by their upstream socket (Redis's addr=), shared by all of them
        # and kept by the transport: what CLIENT LIST/INFO/KILL may show and kill (session/clients.py).
        self.peers: dict[bytes, ClientState] = {}

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    @property
    def address(self) -> str:
        """The client's IP address without the port, or "unix" (what [acl.user_sources] matches)."""
        peer = self.state.peer
        return peer.rpartition(":")[0].strip("[]") if ":" in peer else peer or "unix"

    def become_default(self) -> None:
        d = self.policy.default_user
        self.state.user = d
        self.state.authenticated = d.nopass and d.enabled

    def auth_required(self) -> bool:
        d = self.policy.default_user
        return (not d.nopass or not d.enabled) and not self.state.authenticated

    def reply(self, data: bytes) -> None:
        """A reply made here, in order behind whatever upstream replies are still owed."""
        if not self.state.silent:
            self.replies.synth(data)

    def expect(self, kind: int, n: int = 1) -> None:
        self.replies.expect(kind, n)

    def open_upstream(self) -> None:
        """Before the first request goes upstream: the service user's AUTH goes first.

        The upstream connection itself is opened by the transport when ``to_upstream`` first has
        bytes, so a client that never gets a request through (unauthenticated, refused) costs Redis
        no connection."""
        if self.state.upstream_opened:
            return
        self.state.upstream_opened = True
        self.upstream_login(self.state.user)

    def upstream_login(self, user: User, answered: bool = True) -> None:
        """The upstream connection logs in: as the service user, or (mirror mode) as ``user``'s mirror.
        ``answered``: Redis will reply (not under a CLIENT REPLY OFF it has already been sent)."""
        st = self.state
        auth = self.policy.upstream_auth(user)
        first, st.upstream_login = st.upstream_login is None, st.upstream_login or b""
        if first and auth and self.policy.mirror is not None:
            # The link sends it alone and holds the rest until Redis accepts it (upstream_link.py): no
            # request may run upstream as anyone else, and a refused mirror can be re-created and retried.
            st.upstream_login = auth
            return
        if auth:
            self.to_upstream.append(auth)
            if answered:
                self.replies.expect(AUTHCHECK)

    def forward(self, argv: Sequence[bytes], replies: int = 1, kind: int = RELAY) -> None:
        """Send ``argv`` upstream, canonically encoded: Redis reads exactly the argv that was checked."""
        self.open_upstream()
        decided = self.susp.decided
        if decided is not None and decided[0] is argv and decided[2]:
            self.to_upstream.extend(decided[2])  # encoded off the loop with its verdict
        else:
            self.to_upstream.append(encode_command(argv))
        if kind != PUBSUB:  # (un)subscribe confirmations are pushes: OFF and SKIP never silence them
            if not replies or self.state.reply_off:  # Redis sends nothing while CLIENT REPLY is OFF
                return
            if self.state.skipping:  # CLIENT REPLY SKIP is the proxy's: Redis answers, the client gets nothing
                kind = QUIET[kind]
        self.expect(kind, replies)

    def close_after_replies(self) -> None:
        self.state.stopped = True  # nothing the client sends after this is read
        self.replies.close_after()

    def reject(self, cmd: Command | None, error: bytes, reason: str, name: str = "") -> None:
        """Refuse a request the way Redis's rejectCommand does."""
        name = name or (cmd.name if cmd is not None else "unknown")
        self.shared.observer.command(self.client, name, False, reason)
        if cmd is not None and cmd.name == "exec":
            msg = error[5:] if error.startswith(b"-ERR ") else error[1:]
            self.abort_exec(b"-EXECABORT Transaction discarded because of: " + msg)
            return
        if self.state.in_multi:
            self.state.multi_dirty = True
        self.reply(error)

    def end_multi(self) -> None:
        """The transaction is over (EXEC, DISCARD, an aborted EXEC, RESET): forget what it queued."""
        st = self.state
        st.in_multi = st.multi_dirty = st.watching = False  # (each of these also ends a WATCH)
        st.multi_user = None
        st.queued = []
        st.refused = {}
        st.multi_subs = []

    def abort_exec(self, reply: bytes) -> None:
        """EXEC fails here: make the upstream abort its transaction the way Redis would have, so MONITOR,
        replication and the stats see the failed EXEC (not a DISCARD): a request Redis itself refuses at
        queue time (wrong arity: never fed to MONITOR) marks the transaction, and EXEC then aborts
        without running anything. Its replies are swallowed; the client gets ``reply``."""
        st = self.state
        self.open_upstream()
        if st.in_multi:  # (EXEC as the client wrote it: MONITOR shows the bytes it was sent)
            last = st.last[1]
            exec_argv = last if last[:1] and last[0].lower() == b"exec" else [b"EXEC"]
            self.to_upstream += [POISON, encode_command(exec_argv)]
        else:
            self.to_upstream.append(encode_command([b"UNWATCH"]))  # (a WATCH in force: EXEC ends it too)
        if not st.reply_off:  # Redis sends no reply to these either while CLIENT REPLY is OFF
            self.expect(SWALLOW, 2 if st.in_multi else 1)
        self.end_multi()
        self.reply(reply)

    def acl_log(self, reason: Reason, obj: bytes, username: bytes | None = None) -> None:
        """An ACL LOG entry, as Redis adds one for each denial and failed AUTH."""
        st = self.state
        name = st.user.name.encode("utf-8", "surrogateescape")
        info = b"addr=%s laddr=%s user=%s resp=%d" % (st.peer.encode(), st.listener.encode(), name, st.resp)
        self.shared.acl_log.add(reason, "multi" if st.in_multi else "toplevel", obj[:ACL_LOG_OBJECT_MAX],
                                (username if username is not None else name)[:ACL_LOG_OBJECT_MAX], info,
                                time.time())  # fmt: skip

