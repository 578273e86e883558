"""MULTI / EXEC / DISCARD / WATCH / UNWATCH.

Commands are forwarded as they are queued; EXEC is refused here (``-EXECABORT``) when a command was
refused while queueing or the user's rules changed since MULTI, and Redis's own transaction is then
aborted the way Redis would have aborted it (:meth:`~.core.Core.abort_exec`). Subscriptions queued in
the transaction change only if EXEC runs (WATCH can abort it), which only EXEC's reply tells: they are
applied when it arrives (:func:`exec_done`), and until then the session decides nothing more.
"""

from __future__ import annotations

from redisguard.commands.table import Command
from redisguard.policy.decide import decide
from redisguard.session.core import SPECIAL, Core
from redisguard.session.pubsub import apply_subscriptions
from redisguard.session.replies import EXEC_SUBS, PUBSUB

# The stand-in forwarded inside MULTI for a command Redis refuses only when it runs (Verdict.at_exec):
# Redis queues it and it fails at EXEC touching nothing, and the proxy puts the refusal in its place in
# EXEC's reply. For SORT: the same key (already checked) and an option Redis answers with a syntax error
# before it looks the key up — counted as the refused SORT is (a failed call, an ERR error).
STAND_INS = {"sort": lambda argv: [argv[0], argv[1], b"redisguard-refused"],
             "sort_ro": lambda argv: [argv[0], argv[1], b"redisguard-refused"]}  # fmt: skip

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
# Redis answers each queued command that lost its permission with this NOPERM inside EXEC's reply and
# runs the rest; the proxy, which forwarded them when they were queued, discards the whole transaction.
EXECABORT_ACL = (b"-EXECABORT Transaction discarded because of: NOPERM ACLs rules changed between the moment the "
                 b"transaction was accumulated and the EXEC call\r\n")  # fmt: skip


def multi(c: Core, cmd: Command, argv: list[bytes]) -> None:
    c.forward(argv)
    c.state.in_multi = True
    c.state.multi_user = c.state.user  # (a User never changes: ACL changes make a new one)
    c.state.multi_generation = c.shared.generation


def _rules_changed_since_multi(c: Core) -> bool:
    """Redis's EXEC checks every queued command's ACL again: the user's rules may have changed since
    (ACL SETUSER, LOAD, a reload). If any is no longer allowed here, the transaction goes. A command
    refused at run time stays as it is if it would be refused the same way; if it would now run, the
    proxy (which forwarded its stand-in) cannot run it: that too discards."""
    st = c.state
    # The same user under the same policy: nothing could decide otherwise. (The same user alone is not
    # enough: rights granted and revoked again, then a reload, give back the very User of MULTI.)
    if st.user is st.multi_user and st.multi_generation == c.shared.generation:
        return False
    audit = c.policy.audits(st.user)  # audit mode: ACL verdicts on forwarded commands stop nothing
    refused = st.refused
    return any((v := decide(c.policy, st.user, q, False, st.local)).error != refused.get(i)
               and not (audit and v.reason in ("command", "key", "channel") and v.name not in SPECIAL)
               for i, q in enumerate(st.queued))  # fmt: skip


def queue_refused(c: Core, cmd: Command, argv: list[bytes], error: bytes, reason: str) -> None:
    """Inside MULTI, a command Redis refuses only when it runs: queued (Redis answers +QUEUED to its
    stand-in), and ``error`` is its element of EXEC's reply."""
    st = c.state
    c.shared.observer.command(c.client, cmd.name, False, reason)
    st.refused[len(st.queued)] = error
    st.queued.append(argv)
    c.forward(STAND_INS[cmd.name](argv))


def exec_(c: Core, cmd: Command, argv: list[bytes]) -> None:
    st = c.state
    if st.in_multi and st.multi_dirty:
        c.abort_exec(EXECABORT)
        return
    if st.in_multi and _rules_changed_since_multi(c):
        c.abort_exec(EXECABORT_ACL)
        return
    changes = list(st.multi_subs)
    # A silenced EXEC's reply is never seen: only one the client gets needs the run-time refusals.
    refused = {} if st.reply_off or st.skipping else st.refused
    if changes and st.reply_off:
        # No reply to EXEC under OFF. No WATCH is in force (SUBSCRIBE after one was refused), so it
        # runs, and the confirmations inside it are pushes, sent anyway.
        apply_subscriptions(st, changes)
        c.forward(argv)
        c.expect(PUBSUB, len(changes))
    elif changes or refused:  # (a SKIP hides EXEC's reply from the client: the proxy still reads it)
        if changes:
            st.exec_changes.append(changes)
            c.susp.paused = True  # (held, not started: the next request is decided after the reply)
        if refused:
            c.forward(argv, 0)
            c.replies.expect_exec(refused, bool(changes))
        else:
            c.forward(argv, 1, EXEC_SUBS)
    else:
        c.forward(argv)
    c.end_multi()


def exec_done(c: Core, frame: bytes) -> None:
    """EXEC's reply arrived: unless the transaction was aborted (null, EXECABORT), its subscription
    changes happen now; and the requests held behind it are decided."""
    st = c.state
    changes = st.exec_changes.popleft()
    if not frame.startswith((b"*-1", b"_", b"-")):
        apply_subscriptions(st, changes)
    if not st.exec_changes and c.susp.effect is None:
        c.susp.paused = False  # the transport sees it and resumes the pipeline


def watch(c: Core, cmd: Command, argv: list[bytes]) -> None:
    """WATCH / UNWATCH: forwarded; the session remembers a WATCH in force, which can make EXEC abort
    (WATCH inside MULTI is refused by Redis and changes nothing)."""
    if cmd.name == "unwatch":
        c.state.watching = False
    elif not c.state.in_multi:
        c.state.watching = True
    c.forward(argv)


def discard(c: Core, cmd: Command, argv: list[bytes]) -> None:
    c.forward(argv)
    c.end_multi()
