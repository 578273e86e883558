"""Logins: AUTH, HELLO (and its AUTH), client certificates, the brute-force throttle.

An attempt over the throttle waits (the session pauses with a Sleep effect and runs it again), it is
never refused unchecked: a client with the right password behind a busy shared address gets in, late;
a guesser gets one try per delay per connection. AUTH is answered here and never forwarded.
"""

from __future__ import annotations

from redisguard.commands.table import Command
from redisguard.protocol.request import string2ll
from redisguard.protocol.resp import OK, cstr, error_format
from redisguard.session.core import Core
from redisguard.session.effects import Sleep

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


def _valid_client_name(name: bytes) -> bool:
    return all(0x21 <= c <= 0x7E for c in name)


def login_refusal(c: Core, name: str, method: str) -> str:
    """[acl] cert_only and user_sources: why this login is refused whatever its credentials ("")."""
    return c.policy.logins.refusal(name, c.address, method)


def _throttle_user(c: Core, name: str) -> str:
    """The throttle's key for a user name: names that are not users share one key per source, so a
    client cannot make the throttle hold arbitrary (64 KiB) names."""
    return name if name in c.policy.users else "\x00unknown"


def _throttle_wait(c: Core, username: bytes) -> bool:
    """True if this attempt must wait first (the session pauses and runs it again after the delay)."""
    susp = c.susp
    if susp.replay_auth:
        susp.replay_auth = False
        return False
    delay = c.shared.throttle.delay(c.state.source, _throttle_user(c, username.decode("utf-8", "surrogateescape")))
    if delay <= 0:
        return False
    susp.effect = Sleep(delay)
    susp.paused = susp.replay = susp.replay_auth = True
    c.shared.observer.throttled(c.client, delay)
    return True


def authenticate(c: Core, username: bytes, password: bytes, word: bytes = b"AUTH", method: str = "password") -> bool:
    st = c.state
    name = username.decode("utf-8", "surrogateescape")
    user = c.policy.users.get(name)
    if user is None:
        reason = "unknown_user"
    elif not user.enabled:
        reason = "disabled_user"
    elif reason := login_refusal(c, name, method):  # the password is not even checked
        pass
    elif not user.check_password(password):
        reason = "wrong_password"
    else:
        before, st.user = st.user, user
        st.authenticated = True
        if user.name != before.name and st.upstream_opened and c.policy.mirror is not None:
            c.upstream_login(user, answered=not st.reply_off)  # mirror mode: the upstream follows
        c.shared.throttle.succeeded(st.source, name)
        c.shared.observer.auth(c.client, True, name, "", method)
        return True
    c.shared.throttle.failed(st.source, _throttle_user(c, name))
    c.shared.observer.auth(c.client, False, name if user is not None else "", reason, method)
    c.acl_log("auth", word, username)  # Redis logs the command word as sent, and the name tried
    return False


def auth(c: Core, cmd: Command, argv: list[bytes]) -> None:
    if c.state.in_multi:
        c.reject(cmd, b"-ERR redisguard: AUTH inside MULTI is not supported\r\n", "unsupported")
        return
    if len(argv) > 3:
        c.reply(SYNTAX)
        return
    if len(argv) == 2:
        if c.policy.default_user.nopass:
            c.reply(AUTH_NOPASS)
            return
        username, password = b"default", argv[1]
    else:
        username, password = argv[1], argv[2]
    if _throttle_wait(c, username):
        return
    c.reply(OK if authenticate(c, username, password, argv[0]) else WRONGPASS)


def hello(c: Core, cmd: Command, argv: list[bytes]) -> None:
    if c.state.in_multi:
        c.reject(cmd, b"-ERR redisguard: HELLO inside MULTI is not supported\r\n", "unsupported")
        return
    ver = 0
    i = 1
    if len(argv) >= 2:
        v = string2ll(argv[1])
        if v is None:
            c.reply(b"-ERR Protocol version is not an integer or out of range\r\n")
            return
        if v < 2 or v > 3:
            c.reply(b"-NOPROTO unsupported protocol version\r\n")
            return
        ver, i = v, 2
    creds: tuple[bytes, bytes] | None = None
    setname: bytes | None = None
    while i < len(argv):
        more = len(argv) - 1 - i
        opt = argv[i].lower()
        if opt == b"auth" and more >= 2:
            creds = (argv[i + 1], argv[i + 2])
            i += 3
        elif opt == b"setname" and more:
            setname = argv[i + 1]
            if not _valid_client_name(setname):
                c.reply(b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n")
                return
            i += 2
        else:
            c.reply(error_format(b"Syntax error in HELLO option '%s'" % cstr(argv[i])))
            return
    if creds is not None:
        if _throttle_wait(c, creds[0]):
            return
        if not authenticate(c, *creds, argv[0]):
            c.reply(WRONGPASS)
            return
    if not c.state.authenticated:
        c.reply(HELLO_NOAUTH)
        return
    fwd = [argv[0]]
    if ver:
        fwd.append(argv[1])
        c.state.resp = ver
    if setname is not None:
        fwd += [b"SETNAME", setname]
    c.forward(fwd)


def login_certificate(c: Core, identity: str) -> bool:
    """A verified client certificate names ``identity``: log in as that user, if it is enabled and may
    log in from here. If not, and the listener has ``unmapped_cert = "refuse"``, the session closes."""
    st = c.state
    st.tls_identity = identity
    user = c.policy.users.get(identity)
    reason = "bad_client_cert" if user is None or not user.enabled else login_refusal(c, identity, "client_cert")
    if reason:
        refuse = st.listener in c.policy.logins.refuse_unmapped and reason == "bad_client_cert"
        c.shared.observer.auth(c.client, False, identity if user is not None else "",
                               "unmapped_cert" if refuse else reason, "client_cert")  # fmt: skip
        if refuse:
            c.close_after_replies()
        return False
    assert user is not None
    st.user = user
    st.authenticated = True
    c.shared.observer.auth(c.client, True, user.name, "", "client_cert")
    return True
