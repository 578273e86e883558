"""The request side of a session: parse, decide in order, in bounded batches, some off the loop.

The :class:`Pipeline` owns the client's one :class:`~.state.Suspension`. ``client_data`` parses what
arrived; when the bytes are exactly the canonical encoding of requests that are all simply forwarded,
they go upstream as sent (the fast path); otherwise each request is decided in order by
the session's ``command``. Per event-loop turn a session decides at most ``BATCH`` requests and at most
``TURN_NS`` of estimated ACL-check work, fast path included; the rest waits for the next turn. A
request that waits (a throttled AUTH, a huge request decided in a worker thread) pauses the session:
the transport stops reading until ``resume()`` or ``offloaded()``, and bytes that arrive meanwhile are
parsed only after it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from redisguard.acl.glob import needs_matcher
from redisguard.acl.user import User
from redisguard.fast import COMPILED
from redisguard.policy.decide import Verdict, decide, dryrun
from redisguard.protocol.request import RequestParser
from redisguard.protocol.resp import encode_command_pieces, encode_requests
from redisguard.session import admin
from redisguard.session.core import SPECIAL, Core
from redisguard.session.effects import Offload
from redisguard.session.replies import RELAY

# Requests decided per call before the session yields to the event loop (the transport calls
# resume() on the next turn): a write of 100,000 tiny requests must not hold the loop.
BATCH = 256
# Estimated ACL-check work (see OFFLOAD_NS) a session may do per event-loop turn, fast path included:
# thousands of requests each far below OFFLOAD_NS (a GET against a thousand patterns) add up to
# seconds of one turn otherwise. Once spent, the rest waits for the next turn (at least one a turn).
TURN_NS = 1_000_000
# A request whose ACL check is estimated to cost more than OFFLOAD_NS is decided (and re-encoded) off
# the event loop, in a worker thread, so one huge MGET, or a 512 KiB key matched against a hundred
# `*x*` patterns, cannot stall other clients; cheap requests, however large, stay on the loop.
# The estimate (generous, in ns) is per argument, per argument and pattern (a matcher call), and per
# byte of the request: copying, plus the general matcher's worst case, which is linear in the key's
# length times the pattern's (skipLongerMatches: each '*' retries only until the next one is reached),
# for each pattern that needs it (compile_glob's `==`/`startswith` shapes cost nothing per byte).
# Every argument counts as a key: values are not told apart, that would cost more.
OFFLOAD_NS = 1_000_000
OFFLOAD_ARGC = 4096  # this many arguments alone reach OFFLOAD_NS, whatever the user
_ARG_NS = OFFLOAD_NS / OFFLOAD_ARGC
_CALL_NS = 150.0
_BYTE_NS = 0.1
# The general matcher per key byte and pattern byte, at its worst (a recursion at every key byte, e.g.
# `*?:p0:*` against a run of ':'): ~1.2 ns compiled, ~45 ns in the pure twin.
_MATCH_NS = 1.5 if COMPILED else 60.0


class _Cost:
    """What a user's rules make each argument and byte of a request cost to check (see OFFLOAD_NS)."""

    __slots__ = ("per_arg", "per_byte")

    def __init__(self, user: User | None) -> None:
        patterns = general = 0  # how many; the general matcher's pattern bytes
        for sel in user.selectors if user is not None else ():
            if not sel.allkeys:
                patterns += len(sel.keys)
                general += sum(len(kp.pattern) for kp in sel.keys if needs_matcher(kp.pattern))
            if not sel.allchannels:  # channels use the general matcher
                patterns += len(sel.channels)
                general += sum(map(len, sel.channels))
        self.per_arg = _ARG_NS + patterns * _CALL_NS
        self.per_byte = _BYTE_NS + general * _MATCH_NS

    def of(self, argv: Sequence[bytes]) -> float:
        """The estimated ns to check ``argv``; over OFFLOAD_NS, without a look at each argument, when
        there are more than OFFLOAD_ARGC (the estimate itself would be work in proportion to them)."""
        if len(argv) > OFFLOAD_ARGC:
            return OFFLOAD_NS + 1.0
        return len(argv) * self.per_arg + sum(map(len, argv)) * self.per_byte

    def over(self, argv: Sequence[bytes]) -> bool:
        return self.of(argv) > OFFLOAD_NS


# Users never change once they serve clients (a change makes a new User), so their cost is computed once.
_costs: weakref.WeakKeyDictionary[User, _Cost] = weakref.WeakKeyDictionary()


def cost_of(user: User | None) -> _Cost:
    if user is None:
        return _Cost(None)
    cost = _costs.get(user)
    if cost is None:
        cost = _costs[user] = _Cost(user)
    return cost


class Pipeline:
    """Parse, then decide in order: the fast path for runs of simply forwarded requests, ``command``
    (the session's) for each of the others, in bounded batches; the suspension when one must wait."""

    __slots__ = ("c", "command", "parser")

    def __init__(self, core: Core, command: Callable[[list[bytes]], None], parser: RequestParser) -> None:
        self.c = core
        self.command = command
        self.parser = parser

    def offloads(self, argv: Sequence[bytes]) -> bool:
        """Decided in a worker thread: requests costly to check, and the ACL subcommands that are work of their own."""
        return cost_of(self.c.state.user).over(argv) or (
            len(argv) > 1 and argv[0].lower() == b"acl" and argv[1].lower() in admin.ACL_ADMIN)

    def offload(self, argv: list[bytes]) -> None:
        """Check (and encode) ``argv`` off the loop, against the user and users of this moment: if they
        change before the verdict is used (a revocation, ACL LOAD, a reload), it is made again."""
        c = self.c
        susp = c.susp
        susp.effect = Offload(argv)
        susp.basis = (c.state.user, c.policy, c.auth_required())
        susp.paused = susp.replay = True

    @property
    def backlog(self) -> bool:
        """Requests are waiting for the next event-loop turn (the transport calls resume())."""
        s = self.c.susp
        waiting = s.more or bool(s.pending) or bool(s.unparsed) or bool(s.plain_rest)
        return waiting and not s.paused and not self.c.state.stopped

    def client_data(self, data: bytes) -> None:
        c, s = self.c, self.c.susp
        if c.state.stopped or c.replies.closing:
            return
        if s.pending or s.paused or s.unparsed or s.plain_rest:
            # Requests are waiting (a throttled AUTH, a decision off the loop, the next batch): parse
            # these bytes only once those are done, with the limits (pre-auth or not) in force then.
            s.unparsed.append(data)
            return
        requests = self.parser.feed(data)
        raw = self.parser.raw
        if raw is not None and requests and self._fast_path(requests, raw):
            return
        s.pending.extend(requests)
        self.run()

    def _fast_path(self, requests: list[list[bytes]], raw: bytes | None) -> bool:
        """Forward the requests if they are all simply forwarded (as sent: ``raw``, their canonical
        encoding); False leaves every one of them to ``decide``. Those past this turn's TURN_NS wait
        in ``plain_rest`` and are looked at again, with the rules in force then, on the next turn."""
        c = self.c
        n = self._plain(requests)
        if n is None:
            return False
        if n:
            c.open_upstream()
            # A part is re-encoded: the same bytes, but for the "*0" requests Redis skips anyway.
            c.to_upstream.append(raw if n == len(requests) and raw is not None else encode_requests(requests[:n]))
            c.replies.expect(RELAY, n)
        if n < len(requests):
            c.susp.plain_rest = requests[n:]
            c.susp.more = True  # the transport sees ``backlog`` and calls resume() next turn
        return True

    def run(self) -> None:
        """Decide the pending requests in order, until done or paused; then a protocol error, if any."""
        c, s = self.c, self.c.susp
        st = c.state
        pending = s.pending
        parser = self.parser
        budget = BATCH
        if s.plain_rest and not s.paused and not st.stopped:
            rest, s.plain_rest = s.plain_rest, []
            if not self._fast_path(rest, None):
                pending.extend(rest)  # to decide: nothing was pending before them
            elif s.plain_rest:
                return  # this turn's TURN_NS is spent
        while True:
            while pending and not s.paused:
                if st.stopped:
                    pending.clear()
                    return
                if budget == 0 or s.spent >= TURN_NS:
                    s.more = True  # more next turn: the transport sees ``backlog`` and calls resume()
                    return
                budget -= 1
                spent = cost_of(st.user).of(pending[0])  # the user in force for it (an AUTH changes it)
                if spent <= OFFLOAD_NS:  # a costlier one is decided off the loop
                    s.spent += spent
                self.command(pending[0])
                if not s.replay:
                    pending.popleft()
                parser.authenticated = st.authenticated or not c.auth_required()
            if s.paused or st.stopped:
                return
            # Bytes that waited behind those requests, and requests the parser held back before AUTH
            # lifted the pre-auth limits: parsed now, with the limits in force now.
            if parser.error is None and not c.replies.closing and (s.unparsed or parser.buffered):
                if budget == 0 or s.spent >= TURN_NS:
                    s.more = True
                    return
                data = b"".join(s.unparsed)
                s.unparsed.clear()
                more = parser.feed(data)
                if more:
                    pending.extend(more)
                    continue
            break
        if parser.error is not None and not st.stopped:
            c.shared.observer.command(c.client, "unknown", False, "protocol")
            st.skipping = st.skip_next  # CLIENT REPLY OFF/SKIP silence this error too, as in Redis
            st.silent = st.reply_off or st.skipping
            c.reply(parser.error.reply())
            c.close_after_replies()

    def resume(self) -> None:
        """A new turn, or the throttle's timer fired: carry on with the pending requests."""
        s = self.c.susp
        s.effect = None
        s.more = False
        s.spent = 0.0  # a new turn
        s.paused = bool(self.c.state.exec_changes)  # an EXEC whose outcome is not known yet still holds it
        self.run()

    def offloaded(self, verdict: Verdict, encoded: list[bytes], extra: Any = None) -> None:
        """The request of the Offload effect was decided off the loop: use that verdict and carry on."""
        c, s = self.c, self.c.susp
        effect, s.effect = s.effect, None
        assert isinstance(effect, Offload) and s.basis is not None
        user, policy, auth_required = s.basis
        if user is c.state.user and policy is c.policy and auth_required == c.auth_required():
            s.decided = (effect.argv, verdict, encoded)
            s.admin_done = extra
        # else: the users changed meanwhile: run() decides this request again (off the loop again)
        s.paused = False
        s.spent = 0.0  # a new turn
        try:
            self.run()
        finally:  # (the decision and its encoding, used or not, are not kept)
            s.decided = s.admin_done = None

    def _plain(self, requests: list[list[bytes]]) -> int | None:
        """How many of the requests (from the first) this turn forwards, all allowed and simply
        forwarded (then they are counted as allowed); None if one of those is not: all are left to
        ``decide``, request by request.

        Per request this is the user's precomputed :class:`~redisguard.policy.plan.Plan` (arity and one
        pattern match per key), and its estimated cost counts against the turn's TURN_NS."""
        c = self.c
        st = c.state
        if not st.authenticated or st.in_multi or st.reply_off or st.skip_next or st.subscribed:
            return None
        if c.shared.profile is not None:
            return None  # every request is recorded on the way through decide()
        allowed = c.policy.plan(st.user, SPECIAL).allowed
        cost = cost_of(st.user)
        spent = c.susp.spent
        labels = []
        for argv in requests:
            if spent >= TURN_NS:
                break
            cst = cost.of(argv)
            if cst > OFFLOAD_NS:  # cost.over(argv): decided off the loop
                return None
            label = allowed(argv)
            if label is None:
                return None
            labels.append(label)
            spent += cst
        c.susp.spent = spent
        if labels:
            c.shared.observer.allowed(labels)
        return len(labels)

    def decide_offloaded(self, argv: list[bytes]) -> tuple[Verdict, list[bytes], Any]:
        """The work behind an Offload, safe in a worker thread: the verdict, and the encoding to forward
        if the request is allowed and simply forwarded (or the answer, or the new users, of the ACL
        subcommands that are work of their own)."""
        c = self.c
        assert c.susp.basis is not None
        user, policy, auth_required = c.susp.basis
        verdict = decide(policy, user, argv, auth_required, c.state.local)
        if verdict.error is not None or c.state.in_multi:
            return verdict, [], None
        if verdict.name == "acl|dryrun":  # the answer is a decision too: make it here
            return verdict, [dryrun(policy, argv[2:])], None
        if verdict.name == "acl|load":
            return verdict, [], None  # read in its turn in the sequence of users changes
        if verdict.name in ("acl|setuser", "acl|deluser", "acl|save"):
            return verdict, [], (policy.users, admin.compute(verdict.name, argv, policy))
        return verdict, encode_command_pieces(argv) if verdict.name not in SPECIAL else [], None

    def kill(self) -> None:
        """The client is being disconnected (its user was deleted or changed): decide nothing more."""
        s = self.c.susp
        self.c.state.stopped = True
        s.pending.clear()
        s.unparsed.clear()
        s.plain_rest = []
        self.parser.discard()  # (a disconnected client's half-read request is let go at once)
