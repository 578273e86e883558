"""The connection's own commands: QUIT, RESET, CLIENT REPLY, MONITOR.

CLIENT REPLY ON and OFF go to Redis too (both sides then agree for good); SKIP stays here, because a
request the proxy answers itself would never consume Redis's one-shot SKIP and every later reply would
go to the wrong request. The skipped request's upstream reply is swallowed (``Core.forward``).
"""

from __future__ import annotations

from redisguard.commands.table import Command
from redisguard.protocol.resp import OK
from redisguard.session.core import Core
from redisguard.session.replies import MONITOR


def quit_(c: Core, cmd: Command, argv: list[bytes]) -> None:
    c.reply(OK)
    c.close_after_replies()


def reset(c: Core, cmd: Command, argv: list[bytes]) -> None:
    # Redis's RESET also logs the connection out; the upstream must log in again as the service user,
    # and this session goes back to redisguard's default user. It clears CLIENT REPLY OFF before
    # answering (a SKIP in force still swallows the answer).
    st = c.state
    st.reply_off = False
    st.silent = st.skipping
    c.forward(argv)
    c.upstream_login(c.policy.default_user)  # (reply_off was cleared above)
    st.resp = 2
    # (monitoring ends when RESET's own reply arrives: MONITOR's +OK may still be on its way)
    st.reply_off = st.skip_next = False
    c.end_multi()
    for subs in st.subscriptions.values():
        subs.clear()
    c.become_default()


def client_reply(c: Core, cmd: Command, argv: list[bytes]) -> None:
    st = c.state
    if st.in_multi:  # queued, it would change the reply mode at EXEC time, out of our sight
        c.reject(cmd, b"-ERR redisguard: CLIENT REPLY inside MULTI is not supported\r\n", "unsupported")
        return
    mode = argv[2].lower()
    if mode == b"on":
        st.reply_off = False
        st.silent = st.skipping = False  # Redis clears the flags before it replies +OK
        c.forward(argv)
    elif mode == b"off":
        st.reply_off = True
        st.silent = True
        c.forward(argv)
    elif mode == b"skip":
        st.skip_next = not st.reply_off  # no reply of its own, as in Redis
    else:
        c.forward(argv)  # Redis answers the syntax error


def monitor(c: Core, cmd: Command, argv: list[bytes]) -> None:
    # After its +OK, everything Redis sends is the monitor stream: relayed, never counted.
    c.forward(argv, 1, MONITOR)
