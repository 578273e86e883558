# mypy: disable-error-code="attr-defined,misc"
# (a mixin of Session: the attributes it uses are Session's, checked there)
"""The request side of a session: parse, decide in order, in bounded batches, some off the loop.

A mixin of :class:`~redisguard.session.core.Session`, split out by job. ``client_data`` parses what
arrived; when the bytes are exactly the canonical encoding of requests that are all simply forwarded,
they go upstream as sent (the fast path); otherwise each request is decided in order by
``Session._command``. Per event-loop turn a session decides at most ``BATCH`` requests and at most
``TURN_NS`` of estimated ACL-check work, fast path included; the rest waits for the next turn. A
request that waits (a throttled AUTH, a huge request decided in a worker thread) pauses the session:
the transport stops reading until ``resume()`` or ``offloaded()``, and bytes that arrive meanwhile are
parsed only after it.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redisguard.acl.glob import needs_matcher
from redisguard.fast import COMPILED
from redisguard.policy.decide import Verdict, decide, dryrun
from redisguard.protocol.resp import encode_command_pieces, encode_requests
from redisguard.session.admin import ACL_ADMIN
from redisguard.session.replies import RELAY

if TYPE_CHECKING:
    from redisguard.acl.user import User

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
        """The estimated ns to check ``argv``."""
        return len(argv) * self.per_arg + sum(map(len, argv)) * self.per_byte

    def over(self, argv: Sequence[bytes]) -> bool:
        return len(argv) > OFFLOAD_ARGC or self.of(argv) > OFFLOAD_NS


# Users never change once they serve clients (a change makes a new User), so their cost is computed once.
_costs: weakref.WeakKeyDictionary[User, _Cost] = weakref.WeakKeyDictionary()


def cost_of(user: User | None) -> _Cost:
    if user is None:
        return _Cost(None)
    cost = _costs.get(user)
    if cost is None:
        cost = _costs[user] = _Cost(user)
    return cost


class RequestPipeline:
    __slots__ = ()

    special: frozenset[str]  # commands Session handles itself (never on the fast path)
    _pending: deque[list[bytes]]
    _unparsed: list[bytes]
    _paused: bool
    _more: bool
    _spent: float
    _plain_rest: list[list[bytes]]
    stopped: bool
    offload: list[bytes] | None
    _decided: tuple[list[bytes], Verdict, list[bytes]] | None
    _exec_changes: Any
    _offload_basis: Any

    def _offloads(self, argv: Sequence[bytes]) -> bool:
        """Decided in a worker thread: requests costly to check, and the ACL subcommands that are work of their own."""
        return cost_of(self.user).over(argv) or (len(argv) > 1 and argv[0].lower() == b"acl" and argv[1].lower() in ACL_ADMIN)

    @property
    def backlog(self) -> bool:
        """Requests are waiting for the next event-loop turn (the transport calls resume())."""
        waiting = self._more or bool(self._pending) or bool(self._unparsed) or bool(self._plain_rest)
        return waiting and not self._paused and not self.stopped

    @property
    def paused(self) -> bool:
        """Waiting for resume() or offloaded(): the transport should not read from the client."""
        return self._paused

    def client_data(self, data: bytes) -> None:
        if self.stopped or self.closing:
            return
        if self._pending or self._paused or self._unparsed or self._plain_rest:
            # Requests are waiting (a throttled AUTH, a decision off the loop, the next batch): parse
            # these bytes only once those are done, with the limits (pre-auth or not) in force then.
            self._unparsed.append(data)
            return
        requests = self.parser.feed(data)
        raw = self.parser.raw
        if raw is not None and requests and self._fast_path(requests, raw):
            return
        self._pending.extend(requests)
        self._run()

    def _fast_path(self, requests: list[list[bytes]], raw: bytes | None) -> bool:
        """Forward the requests if they are all simply forwarded (as sent: ``raw``, their canonical
        encoding); False leaves every one of them to ``decide``. Those past this turn's TURN_NS wait
        in ``_plain_rest`` and are looked at again, with the rules in force then, on the next turn."""
        n = self._plain(requests)
        if n is None:
            return False
        if n:
            if not self.upstream_opened:
                self._open_upstream()
            # A part is re-encoded: the same bytes, but for the "*0" requests Redis skips anyway.
            self.to_upstream.append(raw if n == len(requests) and raw is not None else encode_requests(requests[:n]))
            self.replies.expect(RELAY, n)
        if n < len(requests):
            self._plain_rest = requests[n:]
            self._more = True  # the transport sees ``backlog`` and calls resume() next turn
        return True

    def _run(self) -> None:
        """Decide the pending requests in order, until done or paused; then a protocol error, if any."""
        pending = self._pending
        parser = self.parser
        budget = BATCH
        if self._plain_rest and not self._paused and not self.stopped:
            rest, self._plain_rest = self._plain_rest, []
            if not self._fast_path(rest, None):
                pending.extend(rest)  # to decide: nothing was pending before them
            elif self._plain_rest:
                return  # this turn's TURN_NS is spent
        while True:
            while pending and not self._paused:
                if self.stopped:
                    pending.clear()
                    return
                if budget == 0 or self._spent >= TURN_NS:
                    self._more = True  # more next turn: the transport sees ``backlog`` and calls resume()
                    return
                budget -= 1
                spent = cost_of(self.user).of(pending[0])  # the user in force for it (an AUTH changes it)
                if spent <= OFFLOAD_NS:  # a costlier one is decided off the loop
                    self._spent += spent
                self._command(pending[0])
                if not self._replay:
                    pending.popleft()
                parser.authenticated = self.authenticated or not self._auth_required()
            if self._paused or self.stopped:
                return
            # Bytes that waited behind those requests, and requests the parser held back before AUTH
            # lifted the pre-auth limits: parsed now, with the limits in force now.
            if parser.error is None and not self.closing and (self._unparsed or parser.buffered):
                if budget == 0 or self._spent >= TURN_NS:
                    self._more = True
                    return
                data = b"".join(self._unparsed)
                self._unparsed.clear()
                more = parser.feed(data)
                if more:
                    pending.extend(more)
                    continue
            break
        if parser.error is not None and not self.stopped:
            self.shared.observer.command(self, "unknown", False, "protocol")
            self._skipping = self._skip_next  # CLIENT REPLY OFF/SKIP silence this error too, as in Redis
            self._silent = self.reply_off or self._skipping
            self._reply(parser.error.reply())
            self._close_after_replies()

    def resume(self) -> None:
        """The transport's timer fired (a throttled AUTH): carry on with the pending requests."""
        self.wait = 0.0
        self._more = False
        self._spent = 0.0  # a new turn
        self._paused = bool(self._exec_changes)  # an EXEC whose outcome is not known yet still holds it
        self._run()

    def offloaded(self, verdict: Verdict, encoded: list[bytes], extra: Any = None) -> None:
        """The transport decided ``self.offload`` off the loop: use that verdict and carry on."""
        argv, self.offload = self.offload, None
        assert argv is not None and self._offload_basis is not None
        user, policy, auth_required = self._offload_basis
        if user is self.user and policy is self.policy and auth_required == self._auth_required():
            self._decided = (argv, verdict, encoded)
            self._admin_done = extra
        # else: the users changed meanwhile: _run decides this request again (off the loop again)
        self._paused = False
        self._spent = 0.0  # a new turn
        self._run()
        self._decided = self._admin_done = None

    def _plain(self, requests: list[list[bytes]]) -> int | None:
        """How many of the requests (from the first) this turn forwards, all allowed and simply
        forwarded (then they are counted as allowed); None if one of those is not: all are left to
        ``decide``, request by request.

        Per request this is the user's precomputed :class:`~redisguard.policy.plan.Plan` (arity and one
        pattern match per key), and its estimated cost counts against the turn's TURN_NS."""
        if not self.authenticated or self.in_multi or self.reply_off or self._skip_next or self.subscribed:
            return None
        if self.shared.profile is not None:
            return None  # every request is recorded on the way through decide()
        allowed = self.policy.plan(self.user, self.special).allowed
        cost = cost_of(self.user)
        spent = self._spent
        labels = []
        for argv in requests:
            if spent >= TURN_NS:
                break
            c = cost.of(argv)
            if c > OFFLOAD_NS or len(argv) > OFFLOAD_ARGC:  # cost.over(argv): decided off the loop
                return None
            label = allowed(argv)
            if label is None:
                return None
            labels.append(label)
            spent += c
        self._spent = spent
        if labels:
            self.shared.observer.allowed(labels)
        return len(labels)

    def decide_offloaded(self, argv: list[bytes]) -> tuple[Verdict, list[bytes], Any]:
        """The work behind ``offload``, safe in a worker thread: the verdict, and the encoding to
        forward if the request is allowed and simply forwarded (or the answer, or the new users, of
        the ACL subcommands that are work of their own)."""
        assert self._offload_basis is not None
        user, policy, auth_required = self._offload_basis
        verdict = decide(policy, user, argv, auth_required, self.local)
        if verdict.error is not None or self.in_multi:
            return verdict, [], None
        if verdict.name == "acl|dryrun":  # the answer is a decision too: make it here
            return verdict, [dryrun(policy, argv[2:])], None
        if verdict.name == "acl|load" and self.shared.sequencer is not None:
            return verdict, [], None  # read in its turn in the sequence of users changes
        if verdict.name in ("acl|setuser", "acl|deluser", "acl|load", "acl|save"):
            return verdict, [], (policy.users, self._acl_admin(verdict.name, argv, policy))
        return verdict, encode_command_pieces(argv) if verdict.name not in self.special else [], None

    def kill(self) -> None:
        """The client is being disconnected (its user was deleted or changed): decide nothing more."""
        self.stopped = True
        self._pending.clear()
        self._unparsed.clear()
        self._plain_rest = []

    def end_of_input(self) -> None:
        """The client sent its last byte: close once every reply it is owed has been sent."""
        if not self.stopped and not self.closing:
            self._close_after_replies()
