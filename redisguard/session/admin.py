# mypy: disable-error-code="attr-defined,misc"
# (a mixin of Session: the attributes it uses are Session's, checked there)
"""Logins and ACL, the session's commands answered from redisguard's own users.

AUTH and HELLO's AUTH (with the brute-force throttle: an attempt may wait, never be refused
unchecked), and the ACL subcommands: WHOAMI/USERS/LIST/GETUSER/DRYRUN from the users and the reply
cache, SETUSER/DELUSER/LOAD/SAVE on redisguard's users (their work done in the worker thread), LOG of
redisguard's own denials. A mixin of :class:`~redisguard.session.core.Session`, split out by job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redisguard.acl import User, admin
from redisguard.acl.glob import stringmatch
from redisguard.commands.table import Command
from redisguard.policy.decide import Policy, dryrun
from redisguard.protocol.request import string2ll
from redisguard.protocol.resp import OK, cstr, encode_bulk, error_format
from redisguard.session.replies import AUTHCHECK

WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
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
# ACL subcommands answered by the proxy from its own users (ACL CAT, GENPASS, HELP go to Redis).
ACL_LOCAL = {"acl|whoami", "acl|users", "acl|list", "acl|getuser", "acl|dryrun", "acl|setuser", "acl|deluser",
             "acl|load", "acl|save", "acl|log"}  # fmt: skip
# ... of which these read or write the users file, or rebuild users: done in the worker thread.
ACL_ADMIN = {b"setuser", b"deluser", b"load", b"save"}
# ACL LOG keeps at most this much of a key, channel or user name (Redis keeps all of it).
ACL_LOG_OBJECT_MAX = 4096


def _valid_client_name(name: bytes) -> bool:
    return all(0x21 <= c <= 0x7E for c in name)


class LoginsAndACL:
    __slots__ = ()

    _replay_auth: bool
    _admin_done: Any
    upstream_login: bytes | None

    def _acl_admin(self, name: str, argv: Sequence[bytes], policy: Policy) -> tuple[Any, ...]:
        """ACL SETUSER/DELUSER/LOAD/SAVE against ``policy`` (file I/O included: run off the loop)."""
        users = policy.users
        if name == "acl|setuser":
            return admin.setuser(users, policy.table, argv[2:])
        if name == "acl|deluser":
            return admin.deluser(users, argv[2:])
        if name == "acl|load":
            return admin.acl_load(policy.users_file or None, policy.table, require_default=True)
        reply, err = admin.acl_save(policy.users_file or None, users)
        return (reply, err)

    def _acl_log(self, reason: str, obj: bytes, username: bytes | None = None) -> None:
        """An ACL LOG entry, as Redis adds one for each denial and failed AUTH."""
        info = b"addr=%s laddr=%s user=%s resp=%d" % (
            self.peer.encode(), self.listener.encode(), self.user.name.encode("utf-8", "surrogateescape"), self.resp)
        self.shared.acl_log.add(reason, "multi" if self.in_multi else "toplevel",  # type: ignore[arg-type]
                                obj[:ACL_LOG_OBJECT_MAX], (username if username is not None else
                                self.user.name.encode("utf-8", "surrogateescape"))[:ACL_LOG_OBJECT_MAX],
                                info, time.time())  # fmt: skip

    def login_certificate(self, identity: str) -> bool:
        """A verified client certificate names ``identity``: log in as that user, if it is enabled and may
        log in from here. If not, and the listener has ``unmapped_cert = "refuse"``, the session closes
        (``closing``: the transport closes the connection before reading anything)."""
        self.tls_identity = identity
        user = self.policy.users.get(identity)
        reason = "bad_client_cert" if user is None or not user.enabled else self._login_refusal(identity, "client_cert")
        if reason:
            logins = self.policy.logins
            refuse = self.listener in logins.refuse_unmapped and reason == "bad_client_cert"
            self.shared.observer.auth(self, False, identity if user is not None else "",
                                      "unmapped_cert" if refuse else reason, "client_cert")  # fmt: skip
            if refuse:
                self._close_after_replies()
            return False
        assert user is not None
        self.user = user
        self.authenticated = self.parser.authenticated = True
        self.shared.observer.auth(self, True, user.name, "", "client_cert")
        return True

    def rebind(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> str:
        """The users changed: move to this session's new user, or say why the client must go ("").

        ACL LOAD and SIGHUP (``changed`` None) disconnect clients whose user went or whose rules or
        passwords changed, as Redis's ACL LOAD does; after ACL SETUSER a client keeps its connection
        with the new rules, as in Redis, unless it is subscribed and its channel rules changed
        (Redis 7.0 kills such pub/sub clients); after ACL DELUSER its clients go."""
        name = self.user.name
        if changed is not None and name not in changed and name not in deleted:
            return ""
        new = users.get(name)
        if new is None:
            return "user deleted"
        if changed is None:
            if new.fingerprint != self.user.fingerprint:
                return "user changed by reload"
        elif self.subscribed and not self._subscriptions_allowed(new):
            return "channel permissions changed"
        self.user = new
        return ""

    def _subscriptions_allowed(self, user: User) -> bool:
        """Redis 7.0's ACLKillPubsubClientsIfNeeded: every channel this client is subscribed to must still
        match a channel rule of one of the user's selectors (a pattern subscription: equal one)."""
        if any(sel.allchannels for sel in user.selectors):
            return True
        rules = [p for sel in user.selectors for p in sel.channels]
        channels = self.subscriptions[""] | self.subscriptions["s"]
        return all(any(stringmatch(p, ch) for p in rules) for ch in channels) and all(
            pat in rules for pat in self.subscriptions["p"])

    def _login_refusal(self, name: str, method: str) -> str:
        """[acl] cert_only and user_sources: why this login is refused whatever its credentials ("")."""
        return self.policy.logins.refusal(name, self.address, method)

    def _throttle_wait(self, username: bytes) -> bool:
        """AUTH throttling: True if this attempt must wait first (the session pauses and re-runs it).

        A throttled attempt is delayed, never refused unchecked: a client with the right password
        behind a busy shared address gets in, late; a guesser gets one try per delay per connection."""
        if self._replay_auth:
            self._replay_auth = False
            return False
        delay = self.shared.throttle.delay(self.source, self._throttle_user(username.decode("utf-8", "surrogateescape")))
        if delay <= 0:
            return False
        self.wait = delay
        self._paused = self._replay = self._replay_auth = True
        self.shared.observer.throttled(self, delay)
        return True

    def _throttle_user(self, name: str) -> str:
        """The throttle's key for a user name: names that are not users share one key per source, so a
        client cannot make the throttle hold arbitrary (64 KiB) names."""
        return name if name in self.policy.users else "\x00unknown"

    def _authenticate(self, username: bytes, password: bytes, word: bytes = b"AUTH", method: str = "password") -> bool:
        name = username.decode("utf-8", "surrogateescape")
        user = self.policy.users.get(name)
        if user is None:
            reason = "unknown_user"
        elif not user.enabled:
            reason = "disabled_user"
        elif reason := self._login_refusal(name, method):  # the password is not even checked
            pass
        elif not user.check_password(password):
            reason = "wrong_password"
        else:
            before, self.user = self.user, user
            self.authenticated = True
            if user.name != before.name:
                self._user_changed()
            self.shared.throttle.succeeded(self.source, name)
            self.shared.observer.auth(self, True, name, "", method)
            return True
        self.shared.throttle.failed(self.source, self._throttle_user(name))
        self.shared.observer.auth(self, False, name if user is not None else "", reason, method)
        self._acl_log("auth", word, username)  # Redis logs the command word as sent, and the name tried
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
        if self._throttle_wait(username):
            return
        self._reply(OK if self._authenticate(username, password, argv[0]) else WRONGPASS)

    def _cmd_hello(self, cmd: Command, argv: list[bytes]) -> None:
        if self.in_multi:
            self._reject(cmd, b"-ERR redisguard: HELLO inside MULTI is not supported\r\n", "unsupported")
            return
        ver = 0
        i = 1
        if len(argv) >= 2:
            v = string2ll(argv[1])
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
                self._reply(error_format(b"Syntax error in HELLO option '%s'" % cstr(argv[i])))
                return
        if auth is not None:
            if self._throttle_wait(auth[0]):
                return
            if not self._authenticate(*auth, argv[0]):
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

    def _cmd_acl(self, cmd: Command, argv: list[bytes]) -> None:
        users = self.policy.users
        if self.in_multi and cmd.name in ACL_LOCAL:  # Redis would queue it; the answer is made here
            sub = cmd.name.split("|", 1)[1].upper()
            self._reject(cmd, b"-ERR redisguard: ACL %s inside MULTI is not supported\r\n" % sub.encode(), "unsupported")
            return
        if cmd.name == "acl|whoami":
            self._reply(encode_bulk(self.user.name))
        elif cmd.name == "acl|users":
            self._reply(self.shared.replies().acl_users())
        elif cmd.name == "acl|list":
            self._reply(self.shared.replies().acl_list())
        elif cmd.name == "acl|getuser":
            self._reply(self.shared.replies().acl_getuser(argv[2], self.resp))
        elif cmd.name == "acl|dryrun":
            decided = self._decided
            if decided is not None and decided[0] is argv:
                self._reply(decided[2][0])  # made off the loop with the verdict
            else:
                self._reply(dryrun(self.policy, argv[2:]))
        elif cmd.name == "acl|log":
            self._reply(self.shared.acl_log.reply(argv[2:], self.resp, time.time(), argv[1]))
        elif cmd.name in ("acl|setuser", "acl|deluser", "acl|load", "acl|save"):
            sequencer = self.shared.sequencer
            done, self._admin_done = self._admin_done, None
            if cmd.name == "acl|load" and sequencer is not None:
                self._await_reply(sequencer.submit("load", ()))  # the file is read in its turn in the sequence
                return
            if done is None or done[0] is not users:  # not precomputed, or another client changed the users since
                done = (users, self._acl_admin(cmd.name, argv, self.policy))
            result = done[1]
            if cmd.name == "acl|save":
                self._reply(result[0])
                return
            new = result[0]
            if new is not None and sequencer is not None:
                # applied (with workers: everywhere) in the sequence's order; answered once in force
                answer = sequencer.submit(cmd.name[4:], argv[2:], done)
                if isinstance(answer, bytes):
                    self._reply(answer)
                else:
                    self._await_reply(answer)
                return
            if new is not None:
                deleted = result[2] if cmd.name == "acl|deluser" else []
                changed = None if cmd.name == "acl|load" else {argv[2].decode("utf-8", "surrogateescape")}
                self.shared.swap(self.policy.with_users(new), changed, deleted)
                if self.user.name in new and (changed is None or self.user.name in changed):
                    self.user = new[self.user.name]
            self._reply(result[1])
        else:
            self._forward(argv)

    def _await_reply(self, answer: Any) -> None:
        """The reply is made elsewhere (an ACL change being put in force everywhere): hold the later
        requests, as for a decision off the loop, until the transport hands it to :meth:`acknowledged`."""
        self.awaiting = answer
        self._paused = True

    def acknowledged(self, reply: bytes) -> None:
        """The awaited reply: send it, in its place, and decide the requests held behind it."""
        self.awaiting = None
        self._reply(reply)
        self._paused = False
        self._run()

    def _upstream_login(self, user: User, answered: bool = True) -> None:
        """The upstream connection logs in: as the service user, or (mirror mode) as ``user``'s mirror.
        ``answered``: Redis will reply (not under a CLIENT REPLY OFF it has already been sent)."""
        auth = self.policy.upstream_auth(user)
        first, self.upstream_login = self.upstream_login is None, self.upstream_login or b""
        if first and auth and self.policy.mirror is not None:
            # The link sends it alone and holds the rest until Redis accepts it (upstream_link.py): no
            # request may run upstream as anyone else, and a refused mirror can be re-created and retried.
            self.upstream_login = auth
            return
        if auth:
            self.to_upstream.append(auth)
            if answered:
                self.replies.expect(AUTHCHECK)

    def _user_changed(self) -> None:
        """The client logged in as another user: in mirror mode its open upstream connection follows."""
        if self.upstream_opened and self.policy.mirror is not None:
            self._upstream_login(self.user, answered=not self.reply_off)
