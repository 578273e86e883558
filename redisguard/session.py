"""The per-client protocol state machine, sans-IO: bytes in, bytes out.

Theory of operation
-------------------
A :class:`Session` sits between one client and its own upstream connection. ``client_data()``
parses requests and decides each one, in Redis's order (processCommand):

    unknown or disabled command → wrong arity → NOAUTH → ACL (command, keys, channels) → run

Requests that pass are forwarded upstream; everything else gets a reply made here. Commands the
proxy owns (AUTH, the AUTH part of HELLO, QUIT, ACL WHOAMI, user-changing ACL subcommands) are never
forwarded: clients never authenticate to Redis, the proxy does, once, as its own service user.

Replies must reach the client in request order. ``_slots`` is the queue of what the client is owed:
``RELAY n`` (the next n upstream replies, relayed unchanged), ``SYNTH bytes`` (a reply made here),
``SWALLOW n`` (upstream replies the client never asked for, e.g. the DISCARD behind an aborted
EXEC), ``AUTHCHECK`` (the service user's AUTH: an error closes the session). Upstream bytes are
scanned for frame ends (:class:`~redisguard.resp.ReplyScanner`), never decoded; push frames are
out-of-band and relayed as they come. With no synthetic reply waiting, bytes stream straight through.

Transactions: a command refused inside MULTI answers at once and marks the transaction, as Redis
does; EXEC then answers ``-EXECABORT`` and the proxy sends DISCARD upstream (swallowing its +OK).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .acl import User, check
from .acl.check import sort_restriction
from .commands import Command, CommandTable, get_keys, unknown_command_error
from .resp import ProtocolError, ReplyScanner, RequestParser, encode_command

RELAY, SYNTH, SWALLOW, AUTHCHECK, CLOSE = range(5)
# One forwarded request in this many is timed until its reply (redisguard_upstream_reply_seconds).
LATENCY_SAMPLE_EVERY = 64

NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
OK = b"+OK\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
AUTH_NOPASS = (
    b"-ERR AUTH <password> called without any password configured for the default user. "
    b"Are you sure your configuration is correct?\r\n"
)
HELLO_NOAUTH = (
    b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO "
    b"AUTH <user> <pass> option can be used to authenticate the client and select the RESP "
    b"protocol version at the same time\r\n"
)
SYNTAX = b"-ERR syntax error\r\n"
_PUSH, _ATTR = ord(">"), ord("|")
_PUBSUB_MESSAGES = (b"message", b"pmessage", b"smessage")
_SUBSCRIBE = {"subscribe", "psubscribe", "ssubscribe", "unsubscribe", "punsubscribe", "sunsubscribe"}
# ACL subcommands that would change or reveal the upstream's users: never forwarded.
_ACL_LOCAL = {"acl|setuser", "acl|deluser", "acl|load", "acl|save", "acl|list", "acl|users",
              "acl|getuser", "acl|dryrun", "acl|log"}  # fmt: skip


class Observer(Protocol):
    """What a session reports; metrics and audit implement it (no-ops by default)."""

    def command(self, session: Session, cmd: str, allowed: bool, reason: str) -> None: ...
    def auth(self, session: Session, ok: bool, username: str, reason: str, method: str) -> None: ...
    def reply_latency(self, seconds: float) -> None: ...


class _NullObserver:
    def command(self, session: Session, cmd: str, allowed: bool, reason: str) -> None:
        pass

    def auth(self, session: Session, ok: bool, username: str, reason: str, method: str) -> None:
        pass

    def reply_latency(self, seconds: float) -> None:
        pass


@dataclass
class Policy:
    """Everything sessions share: the command table, the users, the global switches."""

    table: CommandTable
    users: dict[str, User]
    disabled: frozenset[str] = frozenset()
    upstream_username: str = ""
    upstream_password: str = field(default="", repr=False)
    max_request_bytes: int = 512 * 1024 * 1024 + 64 * 1024
    observer: Observer = field(default_factory=_NullObserver)

    @property
    def default_user(self) -> User:
        return self.users["default"]

    def upstream_auth(self) -> bytes:
        return self.auth_command(self.upstream_username, self.upstream_password)

    @staticmethod
    def auth_command(username: str, password: str) -> bytes:
        """The service user's AUTH, or b"" when Redis needs none."""
        if username:
            return encode_command([b"AUTH", username.encode(), password.encode()])
        if password:
            return encode_command([b"AUTH", password.encode()])
        return b""

    def resolve(self, argv: Sequence[bytes]) -> Command | None:
        """The command argv names, or None if unknown to Redis or disabled here."""
        cmd = self.table.lookup(argv)
        if cmd is None or not self.disabled:
            return cmd
        if cmd.name in self.disabled or (cmd.parent is not None and cmd.parent.name in self.disabled):
            return None
        return cmd

    def unknown_error(self, argv: Sequence[bytes]) -> bytes:
        """Redis's reply to an unknown command; a disabled one is unknown, as after rename-command."""
        if self.table.lookup(argv) is not None:
            return unknown_command_error(argv)
        return self.table.unknown_error(argv)


def _valid_client_name(name: bytes) -> bool:
    return all(0x21 <= c <= 0x7E for c in name)


class Session:
    def __init__(
        self,
        policy: Policy,
        listener: str = "",
        peer: str = "",
        cert_user: User | None = None,
        tls_identity: str = "",
    ) -> None:
        self.policy = policy
        self.listener = listener
        self.peer = peer
        self.tls_identity = tls_identity
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.closing = False  # close the client once to_client is flushed
        self.stopped = False
        self.parser = RequestParser(policy.max_request_bytes)
        self.scanner = ReplyScanner()
        self._carry = b""  # a partial reply header line held over to the next upstream chunk
        self._held: list[bytes] = []  # bytes of an unfinished frame that is not to be relayed yet
        self._slots: deque[list] = deque()
        self.resp = 2
        self.in_multi = False
        self.multi_dirty = False
        self.subscribed = False
        self.clock = time.perf_counter
        self._relayed_owed = 0  # replies ever expected through RELAY slots
        self._relayed_done = 0
        self._sample: tuple[int, float] | None = None  # (reply number, send time) being timed
        self._last: tuple[Command | None, list[bytes]] = (None, [])
        if cert_user is not None:
            self.user: User = cert_user
            self.authenticated = True
        else:
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
    def username(self) -> str:
        return self.user.name

    def start(self) -> None:
        """Queue the service user's AUTH; call once, before any client data."""
        auth = self.policy.upstream_auth()
        if auth:
            self.to_upstream.append(auth)
            self._slots.append([AUTHCHECK, 1])

    def _reply(self, data: bytes) -> None:
        """A reply made here, in order behind whatever upstream replies are still owed."""
        if not self._slots:
            self.to_client.append(data)
        elif self._slots[-1][0] == SYNTH:
            self._slots[-1][1] += data
        else:
            self._slots.append([SYNTH, data])

    def _expect(self, kind: int, n: int = 1) -> None:
        if kind == RELAY:
            owed = self._relayed_owed
            if self._sample is None and owed // LATENCY_SAMPLE_EVERY != (owed + n) // LATENCY_SAMPLE_EVERY:
                self._sample = (owed + n, self.clock())
            self._relayed_owed = owed + n
        if self._slots and self._slots[-1][0] == kind:
            self._slots[-1][1] += n
        else:
            self._slots.append([kind, n])

    def _forward(self, argv: Sequence[bytes], replies: int = 1) -> None:
        self.to_upstream.append(encode_command(argv))
        if replies:
            self._expect(RELAY, replies)

    def _close_after_replies(self) -> None:
        self.stopped = True  # nothing the client sends after this is read
        if self._slots:
            self._slots.append([CLOSE, 0])
        else:
            self.closing = True

    # -- client → upstream ------------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        if self.stopped or self.closing:
            return
        try:
            requests, clean = self.parser.feed(data)
            while requests:
                if clean and self._all_plain(requests):
                    # The fast path: every request is forwarded as sent; no re-encoding.
                    self.to_upstream.append(data)
                    self._expect(RELAY, len(requests))
                    return
                for argv in requests:
                    if self.stopped:
                        return
                    self._command(argv)
                    self.parser.authenticated = self.authenticated or not self._auth_required()
                clean = False
                requests = self.parser.feed(b"")[0] if self.parser.buffered and not self.closing else []
        except ProtocolError as e:
            self.policy.observer.command(self, "unknown", False, "protocol")
            self._reply(e.reply())
            self._close_after_replies()
            self.parser = RequestParser(0)

    def _all_plain(self, requests: list[list[bytes]]) -> bool:
        """True if every request is simply forwarded (then their verdicts are recorded)."""
        names = []
        for argv in requests:
            cmd = self._plain(argv)
            if cmd is None:
                return False
            names.append(cmd.name)
        for name in names:
            self.policy.observer.command(self, name, True, "")
        return True

    def _plain(self, argv: list[bytes]) -> Command | None:
        """The command, if this request needs nothing but forwarding (allowed, no state change)."""
        if not self.authenticated or self.in_multi or self.subscribed:
            return None
        cmd = self.policy.resolve(argv)
        if cmd is None or cmd.name in _SPECIAL or (cmd.parent and cmd.parent.name in _SPECIAL):
            return None
        if CommandTable.arity_error(cmd, len(argv)) or check(self.user, cmd, argv) is not None:
            return None
        return cmd

    def _reject(self, cmd: Command | None, error: bytes, reason: str, name: str = "") -> None:
        """Refuse a request the way Redis's rejectCommand does."""
        name = name or (cmd.name if cmd is not None else "unknown")
        self.policy.observer.command(self, name, False, reason)
        if cmd is not None and cmd.name == "exec":
            msg = error[5:] if error.startswith(b"-ERR ") else error[1:]
            self._abort_exec(b"-EXECABORT Transaction discarded because of: " + msg)
            return
        if self.in_multi:
            self.multi_dirty = True
        self._reply(error)

    def _abort_exec(self, reply: bytes) -> None:
        """EXEC fails here: Redis discards the transaction, so make the upstream do the same."""
        self.to_upstream.append(encode_command([b"DISCARD" if self.in_multi else b"UNWATCH"]))
        self._expect(SWALLOW)
        self.in_multi = self.multi_dirty = False
        self._reply(reply)

    def last_keys(self) -> list[str]:
        """Key names of the request being decided (for audit logs that opt in to key names)."""
        cmd, argv = self._last
        if cmd is None:
            return []
        return [argv[i].decode("utf-8", "replace")[:200] for i, _ in get_keys(cmd, argv)][:16]

    def _command(self, argv: list[bytes]) -> None:
        cmd = self.policy.resolve(argv)
        self._last = (cmd, argv)
        if cmd is None:
            known = self.policy.table.lookup(argv)
            self._reject(None, self.policy.unknown_error(argv), "disabled" if known else "unknown_command",
                         known.name if known else "unknown")  # fmt: skip
            return
        err = CommandTable.arity_error(cmd, len(argv))
        if err:
            self._reject(cmd, err, "arity")
            return
        if not cmd.no_auth and self._auth_required():
            self._reject(cmd, NOAUTH, "noauth")
            return
        denied = check(self.user, cmd, argv)
        if denied is not None:
            self._reject(cmd, denied.error, denied.reason)
            return
        self.policy.observer.command(self, cmd.name, True, "")
        handler = _HANDLERS.get(cmd.name)
        if handler is not None:
            handler(self, cmd, argv)
        else:
            self._forward(argv)

    # -- commands the proxy handles ---------------------------------------------------------------
    def _authenticate(self, username: bytes, password: bytes, method: str = "password") -> bool:
        name = username.decode("utf-8", "replace")
        user = self.policy.users.get(name)
        if user is None:
            reason = "unknown_user"
        elif not user.enabled:
            reason = "disabled_user"
        elif not user.check_password(password):
            reason = "wrong_password"
        else:
            self.user = user
            self.authenticated = True
            self.policy.observer.auth(self, True, name, "", method)
            return True
        self.policy.observer.auth(self, False, name if user is not None else "", reason, method)
        return False

    def _cmd_auth(self, cmd: Command, argv: list[bytes]) -> None:
        if self.in_multi:
            self._reject(cmd, b"-ERR redisguard: AUTH inside MULTI is not supported\r\n", "unsupported")
            return
        if len(argv) > 3:
            self._reply(SYNTAX)
            return
        if len(argv) == 2:
            if self.policy.default_user.nopass:
                self._reply(AUTH_NOPASS)
                return
            username, password = b"default", argv[1]
        else:
            username, password = argv[1], argv[2]
        self._reply(OK if self._authenticate(username, password) else WRONGPASS)

    def _cmd_hello(self, cmd: Command, argv: list[bytes]) -> None:
        if self.in_multi:
            self._reject(cmd, b"-ERR redisguard: HELLO inside MULTI is not supported\r\n", "unsupported")
            return
        ver = 0
        i = 1
        if len(argv) >= 2:
            from .resp import _string2ll

            v = _string2ll(argv[1])
            if v is None:
                self._reply(b"-ERR Protocol version is not an integer or out of range\r\n")
                return
            if v < 2 or v > 3:
                self._reply(b"-NOPROTO unsupported protocol version\r\n")
                return
            ver, i = v, 2
        auth: tuple[bytes, bytes] | None = None
        setname: bytes | None = None
        while i < len(argv):
            more = len(argv) - 1 - i
            opt = argv[i].lower()
            if opt == b"auth" and more >= 2:
                auth = (argv[i + 1], argv[i + 2])
                i += 3
            elif opt == b"setname" and more:
                setname = argv[i + 1]
                if not _valid_client_name(setname):
                    self._reply(b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n")
                    return
                i += 2
            else:
                self._reply(b"-ERR Syntax error in HELLO option '%s'\r\n" % argv[i])
                return
        if auth is not None and not self._authenticate(*auth):
            self._reply(WRONGPASS)
            return
        if not self.authenticated:
            self._reply(HELLO_NOAUTH)
            return
        fwd = [argv[0]]
        if ver:
            fwd.append(argv[1])
            self.resp = ver
        if setname is not None:
            fwd += [b"SETNAME", setname]
        self._forward(fwd)

    def _cmd_quit(self, cmd: Command, argv: list[bytes]) -> None:
        self._reply(OK)
        self._close_after_replies()

    def _cmd_reset(self, cmd: Command, argv: list[bytes]) -> None:
        # Redis's RESET also logs the connection out; the upstream must log in again as the
        # service user, and this session goes back to redisguard's default user.
        self._forward(argv)
        auth = self.policy.upstream_auth()
        if auth:
            self.to_upstream.append(auth)
            self._expect(AUTHCHECK)
        self.resp = 2
        self.in_multi = self.multi_dirty = self.subscribed = False
        self._become_default()

    def _cmd_multi(self, cmd: Command, argv: list[bytes]) -> None:
        self._forward(argv)
        self.in_multi = True

    def _cmd_exec(self, cmd: Command, argv: list[bytes]) -> None:
        if self.in_multi and self.multi_dirty:
            self._abort_exec(EXECABORT)
            return
        self._forward(argv)
        self.in_multi = self.multi_dirty = False

    def _cmd_discard(self, cmd: Command, argv: list[bytes]) -> None:
        self._forward(argv)
        self.in_multi = self.multi_dirty = False

    def _cmd_sort(self, cmd: Command, argv: list[bytes]) -> None:
        err = sort_restriction(self.user, cmd, argv)
        if err:
            self._reject(cmd, err, "key")
        else:
            self._forward(argv)

    def _cmd_acl(self, cmd: Command, argv: list[bytes]) -> None:
        if cmd.name == "acl|whoami":
            name = self.user.name.encode()
            self._reply(b"$%d\r\n%s\r\n" % (len(name), name))
        elif cmd.name in _ACL_LOCAL:
            sub = cmd.name.split("|", 1)[1].upper()
            self._reject(
                cmd,
                b"-ERR redisguard: ACL %s is not available through the proxy; users are managed in "
                b"redisguard's users file\r\n" % sub.encode(),
                "unsupported",
            )
        else:
            self._forward(argv)

    def _cmd_subscribe(self, cmd: Command, argv: list[bytes]) -> None:
        # One confirmation per channel; without arguments an unsubscribe confirms each
        # subscription (or once if there were none) — counted as one here.
        self._forward(argv, max(1, len(argv) - 1))
        if cmd.name in ("subscribe", "psubscribe", "ssubscribe"):
            self.subscribed = True

    # -- upstream → client ------------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self._carry + data if self._carry else data
        try:
            frames, consumed = self.scanner.scan(buf)
        except (ProtocolError, ValueError):
            self.upstream_failed("redisguard: unexpected reply from upstream")
            return
        self._carry = buf[consumed:]
        cut = 0
        slots = self._slots
        for fr in frames:
            head = slots[0] if slots else None
            seg = buf[cut : fr.end]
            cut = fr.end
            if fr.kind == _ATTR or head is None or self._is_push(fr):
                self._emit(seg)  # attribute (belongs to the next reply) or out-of-band push
                continue
            kind = head[0]
            if kind == RELAY:
                self._emit(seg)
                self._relayed_done += 1
                if self._sample is not None and self._relayed_done >= self._sample[0]:
                    self.policy.observer.reply_latency(self.clock() - self._sample[1])
                    self._sample = None
            elif kind == AUTHCHECK:
                frame = b"".join(self._held) + seg
                self._held.clear()
                if frame.startswith(b"-"):
                    self.upstream_failed(
                        "redisguard: upstream authentication failed; check [upstream] username and password"
                    )
                    return
            else:  # SWALLOW
                self._held.clear()
            head[1] -= 1
            if head[1] == 0:
                slots.popleft()
                self._drain_synthetic()
                if self.closing:
                    return
        if cut < consumed:
            head = slots[0] if slots else None
            if head is None or head[0] == RELAY:
                self._emit(buf[cut:consumed])
            else:
                self._held.append(buf[cut:consumed])

    def _is_push(self, fr: object) -> bool:
        kind = fr.kind  # type: ignore[attr-defined]
        if kind == _PUSH:
            return True
        # RESP2 pub/sub: messages are plain arrays, told apart by their first element.
        return self.subscribed and kind == 0x2A and fr.first in _PUBSUB_MESSAGES  # type: ignore[attr-defined]

    def _emit(self, seg: bytes) -> None:
        if self._held:
            self.to_client.extend(self._held)
            self._held.clear()
        self.to_client.append(seg)

    def _drain_synthetic(self) -> None:
        slots = self._slots
        while slots and slots[0][0] in (SYNTH, CLOSE):
            kind, value = slots.popleft()
            if kind == SYNTH:
                self.to_client.append(value)
            else:
                self.closing = True
                slots.clear()

    def upstream_failed(self, message: str) -> None:
        """The upstream is gone or unusable: say so in one line and close."""
        if self.closing:
            return
        self._slots.clear()
        self._held.clear()
        self._sample = None
        self.to_client.append(b"-ERR " + message.encode() + b"\r\n")
        self.closing = True


_HANDLERS = {
    "auth": Session._cmd_auth,
    "hello": Session._cmd_hello,
    "quit": Session._cmd_quit,
    "reset": Session._cmd_reset,
    "multi": Session._cmd_multi,
    "exec": Session._cmd_exec,
    "discard": Session._cmd_discard,
    "sort": Session._cmd_sort,
    "sort_ro": Session._cmd_sort,
    **{name: Session._cmd_acl for name in ["acl|" + s for s in
       ("whoami", "setuser", "deluser", "load", "save", "list", "users", "getuser", "dryrun", "log")]},
    **{name: Session._cmd_subscribe for name in _SUBSCRIBE},
}  # fmt: skip
_SPECIAL = frozenset(_HANDLERS) | {"acl"}
