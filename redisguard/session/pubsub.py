"""(P|S)(UN)SUBSCRIBE: what the client is subscribed to, as Redis will confirm it.

Confirmations are pushes (CLIENT REPLY OFF and SKIP never silence them), one per channel named, or per
subscription held for an UNSUBSCRIBE without channels. Inside MULTI a subscription is queued (one
+QUEUED now; EXEC's reply then carries the confirmation) and changes the state only if EXEC runs.
"""

from __future__ import annotations

from redisguard.acl import User
from redisguard.acl.glob import stringmatch
from redisguard.commands.table import Command
from redisguard.session.core import Core
from redisguard.session.replies import PUBSUB
from redisguard.session.state import ClientState

# Which set of subscriptions each command changes: channels "", patterns "p", shard channels "s".
SUBSCRIBE_KIND = {"subscribe": "", "unsubscribe": "", "psubscribe": "p", "punsubscribe": "p",
                  "ssubscribe": "s", "sunsubscribe": "s"}  # fmt: skip


def apply_subscriptions(st: ClientState, changes: list[tuple[str, bytes, bool]]) -> None:
    for kind, channel, unsubscribe in changes:
        if unsubscribe:
            st.subscriptions[kind].discard(channel)
        else:
            st.subscriptions[kind].add(channel)


def subscriptions_allowed(st: ClientState, user: User) -> bool:
    """Redis 7.0's ACLKillPubsubClientsIfNeeded: every channel this client is subscribed to must still
    match a channel rule of one of the user's selectors (a pattern subscription: equal one)."""
    if any(sel.allchannels for sel in user.selectors):
        return True
    rules = [p for sel in user.selectors for p in sel.channels]
    channels = st.subscriptions[""] | st.subscriptions["s"]
    return all(any(stringmatch(p, ch) for p in rules) for ch in channels) and all(
        pat in rules for pat in st.subscriptions["p"])


def subscribe(c: Core, cmd: Command, argv: list[bytes]) -> None:
    st = c.state
    kind = SUBSCRIBE_KIND[cmd.name]
    subs = st.subscriptions[kind]
    channels = argv[1:]
    if st.in_multi:
        # With more than one confirmation Redis's EXEC reply holds more frames than its array says: refused.
        if st.reply_off and st.watching:
            # Under OFF nothing would tell whether EXEC ran (a WATCH can abort it), so whether the
            # client ends up subscribed: refused rather than guessed (replies would go astray).
            c.reject(cmd, b"-ERR redisguard: %s inside MULTI after WATCH while CLIENT REPLY is OFF is not supported\r\n"
                     % cmd.name.upper().encode(), "unsupported")  # fmt: skip
            return
        if len(channels) != 1:
            c.reject(cmd, b"-ERR redisguard: %s inside MULTI takes exactly one channel here\r\n"
                     % cmd.name.upper().encode(), "unsupported")  # fmt: skip
            return
        st.multi_subs.append((kind, channels[0], cmd.name.endswith("unsubscribe")))
        c.forward(argv)
        return
    if cmd.name.endswith("unsubscribe"):
        n = len(channels) or max(1, len(subs))
        if channels:
            subs.difference_update(channels)
        else:
            subs.clear()
    else:
        n = len(channels)
        subs.update(channels)
    c.forward(argv, n, PUBSUB)
