# mypy: disable-error-code="attr-defined,misc"
# (a mixin of Session: the attributes it uses are Session's, checked there)
"""The commands that change a session's state: QUIT, RESET, MULTI/EXEC/DISCARD, (P|S)(UN)SUBSCRIBE,
CLIENT REPLY and MONITOR. A mixin of :class:`~redisguard.session.core.Session`, split out by job.

Each tells the reply queue what Redis will answer (or that the answer is swallowed), so replies stay in
request order whatever the mode: transactions (EXEC aborted here aborts Redis's too), pub/sub
(confirmations are pushes, never silenced), CLIENT REPLY SKIP (kept here, never forwarded).
"""

from __future__ import annotations

from typing import Any

from redisguard.commands.table import Command
from redisguard.policy.decide import decide
from redisguard.protocol.resp import OK, encode_command
from redisguard.session.replies import EXEC_SUBS, MONITOR, PUBSUB, SWALLOW

# The stand-in forwarded inside MULTI for a command Redis refuses only when it runs (Verdict.at_exec):
# Redis queues it and it fails at EXEC touching nothing, and the proxy puts the refusal in its place in
# EXEC's reply. For SORT: the same key (already checked) and an option Redis answers with a syntax error
# before it looks the key up — counted as the refused SORT is (a failed call, an ERR error).
STAND_INS = {"sort": lambda argv: [argv[0], argv[1], b"redisguard-refused"],
             "sort_ro": lambda argv: [argv[0], argv[1], b"redisguard-refused"]}  # fmt: skip

EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
# Refused by Redis itself at queue time (GET takes exactly one argument), which flags the transaction.
POISON = encode_command([b"GET"])
# Redis answers each queued command that lost its permission with this NOPERM inside EXEC's reply and
# runs the rest; the proxy, which forwarded them when they were queued, discards the whole transaction.
EXECABORT_ACL = (b"-EXECABORT Transaction discarded because of: NOPERM ACLs rules changed between the moment the "
                 b"transaction was accumulated and the EXEC call\r\n")  # fmt: skip
# Which set of subscriptions each command changes: channels "", patterns "p", shard channels "s".
SUBSCRIBE_KIND = {"subscribe": "", "unsubscribe": "", "psubscribe": "p", "punsubscribe": "p",
                  "ssubscribe": "s", "sunsubscribe": "s"}  # fmt: skip


class StateCommands:
    __slots__ = ()

    _multi_subs: list[tuple[str, bytes, bool]]
    _multi_user: Any
    _queued: list[list[bytes]]
    _refused: dict[int, bytes]
    _exec_changes: Any
    _watching: bool
    _skipping: bool
    resp: int

    def _cmd_quit(self, cmd: Command, argv: list[bytes]) -> None:
        self._reply(OK)
        self._close_after_replies()

    def _cmd_reset(self, cmd: Command, argv: list[bytes]) -> None:
        # Redis's RESET also logs the connection out; the upstream must log in again as the
        # service user, and this session goes back to redisguard's default user. It clears
        # CLIENT REPLY OFF before answering (a SKIP in force still swallows the answer).
        self.reply_off = False
        self._silent = self._skipping
        self._forward(argv)
        self._upstream_login(self.policy.default_user)  # (reply_off was cleared above)
        self.resp = 2
        # (monitoring ends when RESET's own reply arrives: MONITOR's +OK may still be on its way)
        self.reply_off = self._skip_next = False
        self._end_multi()
        for subs in self.subscriptions.values():
            subs.clear()
        self._become_default()

    def _cmd_multi(self, cmd: Command, argv: list[bytes]) -> None:
        self._forward(argv)
        self.in_multi = True
        self._multi_user = self.user  # (a User never changes: ACL changes make a new one)

    def _end_multi(self) -> None:
        """The transaction is over (EXEC, DISCARD, an aborted EXEC, RESET): forget what it queued."""
        self.in_multi = self.multi_dirty = self._watching = False  # (each of these also ends a WATCH)
        self._queued = []
        self._refused = {}
        self._multi_subs = []

    def _rules_changed_since_multi(self) -> bool:
        """Redis's EXEC checks every queued command's ACL again: the user's rules may have changed
        since (ACL SETUSER, LOAD, a reload). If any is no longer allowed here, the transaction goes.
        A command refused at run time stays as it is if it would be refused the same way; if it would
        now run, the proxy (which forwarded its stand-in) cannot run it: that too discards."""
        if self.user is self._multi_user:
            return False
        audit = self.policy.audits(self.user)  # audit mode: ACL verdicts on forwarded commands stop nothing
        refused = self._refused
        return any((v := decide(self.policy, self.user, q, False, self.local)).error != refused.get(i)
                   and not (audit and v.reason in ("command", "key", "channel") and v.name not in self.special)
                   for i, q in enumerate(self._queued))  # fmt: skip

    def _queue_refused(self, cmd: Command, argv: list[bytes], error: bytes, reason: str) -> None:
        """Inside MULTI, a command Redis refuses only when it runs: queued (Redis answers +QUEUED to
        its stand-in), and ``error`` is its element of EXEC's reply."""
        self.shared.observer.command(self, cmd.name, False, reason)
        self._refused[len(self._queued)] = error
        self._queued.append(argv)
        self._forward(STAND_INS[cmd.name](argv))

    def _cmd_exec(self, cmd: Command, argv: list[bytes]) -> None:
        if self.in_multi and self.multi_dirty:
            self._abort_exec(EXECABORT)
            return
        if self.in_multi and self._rules_changed_since_multi():
            self._abort_exec(EXECABORT_ACL)
            return
        # Subscriptions queued in the transaction change only if EXEC runs (WATCH can abort it), which
        # only EXEC's reply tells: they are applied when it arrives (exec_done), and until then the
        # session decides nothing more (in RESP2 whether it is subscribed changes what Redis accepts
        # and how its replies read).
        changes = list(self._multi_subs)
        # A silenced EXEC's reply is never seen: only one the client gets needs the run-time refusals.
        refused = {} if self.reply_off or self._skipping else self._refused
        if changes and self.reply_off:
            # No reply to EXEC under OFF. No WATCH is in force (SUBSCRIBE after one was refused), so it
            # runs, and the confirmations inside it are pushes, sent anyway.
            self._apply_subscriptions(changes)
            self._forward(argv)
            self._expect(PUBSUB, len(changes))
        elif changes or refused:  # (a SKIP hides EXEC's reply from the client: the proxy still reads it)
            if changes:
                self._exec_changes.append(changes)
                self._paused = True  # (held, not started: the next request is decided after the reply)
            if refused:
                self._forward(argv, 0)
                self.replies.expect_exec(refused, bool(changes))
            else:
                self._forward(argv, 1, EXEC_SUBS)
        else:
            self._forward(argv)
        self._end_multi()

    def _cmd_watch(self, cmd: Command, argv: list[bytes]) -> None:
        """WATCH / UNWATCH: forwarded; the session remembers a WATCH in force, which can make EXEC abort
        (WATCH inside MULTI is refused by Redis and changes nothing)."""
        if cmd.name == "unwatch":
            self._watching = False
        elif not self.in_multi:
            self._watching = True
        self._forward(argv)

    def _cmd_discard(self, cmd: Command, argv: list[bytes]) -> None:
        self._forward(argv)
        self._end_multi()

    def exec_done(self, frame: bytes) -> None:
        """EXEC's reply arrived: unless the transaction was aborted (null, EXECABORT), its subscription
        changes happen now; and the requests held behind it are decided."""
        changes = self._exec_changes.popleft()
        if not frame.startswith((b"*-1", b"_", b"-")):
            self._apply_subscriptions(changes)
        if not self._exec_changes and self.offload is None and not self.wait:
            self._paused = False  # the transport sees it and resumes the pipeline

    def _apply_subscriptions(self, changes: list[tuple[str, bytes, bool]]) -> None:
        for kind, channel, unsubscribe in changes:
            if unsubscribe:
                self.subscriptions[kind].discard(channel)
            else:
                self.subscriptions[kind].add(channel)

    def _cmd_subscribe(self, cmd: Command, argv: list[bytes]) -> None:
        kind = SUBSCRIBE_KIND[cmd.name]
        subs = self.subscriptions[kind]
        channels = argv[1:]
        if self.in_multi:
            # Queued: one +QUEUED now; EXEC's array then carries the confirmations. With more than one
            # confirmation Redis's EXEC reply holds more frames than its array says: refuse that case.
            if self.reply_off and self._watching:
                # Under OFF nothing would tell whether EXEC ran (a WATCH can abort it), so whether the
                # client ends up subscribed: refused rather than guessed (replies would go astray).
                self._reject(cmd, b"-ERR redisguard: %s inside MULTI after WATCH while CLIENT REPLY is OFF is not supported\r\n"
                             % cmd.name.upper().encode(), "unsupported")  # fmt: skip
                return
            if len(channels) != 1:
                self._reject(cmd, b"-ERR redisguard: %s inside MULTI takes exactly one channel here\r\n"
                             % cmd.name.upper().encode(), "unsupported")  # fmt: skip
                return
            self._multi_subs.append((kind, channels[0], cmd.name.endswith("unsubscribe")))
            self._forward(argv)
            return
        if cmd.name.endswith("unsubscribe"):
            # One confirmation per named channel; with none, one per subscription (one if none).
            n = len(channels) or max(1, len(subs))
            if channels:
                subs.difference_update(channels)
            else:
                subs.clear()
        else:
            n = len(channels)
            subs.update(channels)
        self._forward(argv, n, PUBSUB)

    def _cmd_client(self, cmd: Command, argv: list[bytes]) -> None:
        """CLIENT REPLY. ON and OFF go to Redis too (both sides then agree for good); SKIP stays here,
        because a request the proxy answers itself would never consume Redis's one-shot SKIP and
        every later reply would go to the wrong request. The skipped request's upstream reply is
        swallowed (see _forward)."""
        if self.in_multi:  # queued, it would change the reply mode at EXEC time, out of our sight
            self._reject(cmd, b"-ERR redisguard: CLIENT REPLY inside MULTI is not supported\r\n", "unsupported")
            return
        mode = argv[2].lower()
        if mode == b"on":
            self.reply_off = False
            self._silent = self._skipping = False  # Redis clears the flags before it replies +OK
            self._forward(argv)
        elif mode == b"off":
            self.reply_off = True
            self._silent = True
            self._forward(argv)
        elif mode == b"skip":
            self._skip_next = not self.reply_off  # no reply of its own, as in Redis
        else:
            self._forward(argv)  # Redis answers the syntax error

    def _cmd_monitor(self, cmd: Command, argv: list[bytes]) -> None:
        # After its +OK, everything Redis sends is the monitor stream: relayed, never counted.
        self._forward(argv, 1, MONITOR)

    def _abort_exec(self, reply: bytes) -> None:
        """EXEC fails here: make the upstream abort its transaction the way Redis would have, so MONITOR,
        replication and the stats see the failed EXEC (not a DISCARD): a request Redis itself refuses at
        queue time (wrong arity: never fed to MONITOR) marks the transaction, and EXEC then aborts
        without running anything. Its replies are swallowed; the client gets ``reply``."""
        self._open_upstream()
        if self.in_multi:  # (EXEC as the client wrote it: MONITOR shows the bytes it was sent)
            exec_argv = self._last[1] if self._last[1][:1] and self._last[1][0].lower() == b"exec" else [b"EXEC"]
            self.to_upstream += [POISON, encode_command(exec_argv)]
        else:
            self.to_upstream.append(encode_command([b"UNWATCH"]))  # (a WATCH in force: EXEC ends it too)
        if not self.reply_off:  # Redis sends no reply to these either while CLIENT REPLY is OFF
            self._expect(SWALLOW, 2 if self.in_multi else 1)
        self._end_multi()
        self._reply(reply)
