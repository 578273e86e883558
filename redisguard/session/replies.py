"""The reply queue: what one client is owed, in request order, and Redis's bytes matched against it.

Theory of operation
-------------------
``slots`` is the queue of what the client is owed: ``RELAY n`` (the next n upstream replies, relayed
unchanged), ``SYNTH [bytes]`` (replies made by the proxy), ``SWALLOW n`` (upstream replies the client
never asked for: the requests behind an aborted EXEC, a reply silenced by CLIENT REPLY SKIP),
``AUTHCHECK`` (the service user's AUTH: an error closes the session), ``PUBSUB n`` (n
subscribe/unsubscribe confirmations, which RESP3 sends as push frames), ``MONITOR`` (its +OK, after
which the feed's lines are out of band), ``EXEC_SUBS`` (an EXEC whose transaction (un)subscribed:
undone if it was aborted; ``SWALLOW_EXEC_SUBS`` the same, silenced by CLIENT REPLY), ``CLOSE``
(QUIT or a protocol error: close once flushed), ``REWRITE n fn`` (n upstream replies that name
what is behind the proxy — CLIENT LIST/INFO/KILL, CLUSTER SHARDS — held whole and replaced by
``fn(frames)``; only these few commands ever pay for decoding).

Upstream bytes are scanned for frame ends (the kernel's ``whole_frames`` and ``ReplyScanner``, :mod:`redisguard.fast`),
never decoded;
push frames, RESP2 pub/sub messages and the monitor feed are out of band and relayed as they come.
With no reply made here waiting, bytes stream straight through. The session owns the request side
and the state both sides read (RESP version, subscriptions); this class owns everything here.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redisguard.fast import ReplyScanner, whole_frames
from redisguard.protocol.resp import ProtocolError

RELAY, SYNTH, SWALLOW, AUTHCHECK, CLOSE, PUBSUB, MONITOR, SWALLOW_MONITOR, EXEC_SUBS, SWALLOW_EXEC_SUBS, REWRITE = range(11)
SPLICE = 11  # an EXEC whose reply gets the run-time refusals of its transaction spliced in: [SPLICE, 1, errors, subs]
QUIET = {RELAY: SWALLOW, MONITOR: SWALLOW_MONITOR, EXEC_SUBS: SWALLOW_EXEC_SUBS}  # the same reply, silenced
_RELAYED = (RELAY, PUBSUB, MONITOR)
# One forwarded request in this many is timed until its reply (redisguard_upstream_reply_seconds).
LATENCY_SAMPLE_EVERY = 64
_PUSH, _ATTR = ord(">"), ord("|")
# A line of the MONITOR feed: "+<seconds>.<microseconds> [<db> <client>] <args>" (never a reply).
_MONITOR_LINE = re.compile(rb"\+\d+\.\d{6} \[\d+ ")
PUBSUB_MESSAGES = (b"message", b"pmessage", b"smessage")
CONFIRMATIONS = frozenset((b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe"))


class ReplyOwner(Protocol):
    """What the queue reads of, and reports to, the client it serves (the session)."""

    @property
    def resp(self) -> int: ...
    @property
    def subscribed(self) -> bool: ...
    def exec_done(self, frame: bytes) -> None: ...  # an EXEC's reply: its subscription changes apply
    def upstream_auth_refused(self) -> None: ...
    def reply_latency(self, seconds: float) -> None: ...


class ReplyQueue:
    __slots__ = (
        "carry", "clock", "closing", "held", "monitoring", "pubsub_owed", "relayed_done", "relayed_owed",
        "sample", "scanner", "session", "slots", "to_client",
    )  # fmt: skip

    def __init__(self, session: ReplyOwner) -> None:
        self.session = session
        self.to_client: list[bytes] = []
        self.closing = False  # close the client once to_client is flushed
        self.slots: deque[list[Any]] = deque()
        self.scanner = ReplyScanner()
        self.carry = b""  # a partial reply header line held over to the next upstream chunk
        self.held: list[bytes] = []  # bytes of an unfinished frame that is not to be relayed yet
        self.monitoring = False
        self.pubsub_owed = 0  # (un)subscribe confirmations still to come
        self.clock = time.perf_counter
        self.relayed_owed = 0  # replies ever expected through RELAY slots
        self.relayed_done = 0
        self.sample: tuple[int, float] | None = None  # (reply number, send time) being timed

    def synth(self, data: bytes) -> None:
        """A reply made here, in order behind whatever upstream replies are still owed."""
        if not self.slots:
            self.to_client.append(data)
        elif self.slots[-1][0] == SYNTH:
            self.slots[-1][1].append(data)  # a list: refusals piling up behind one reply stay O(n)
        else:
            self.slots.append([SYNTH, [data]])

    def expect(self, kind: int, n: int = 1) -> None:
        if kind == RELAY:
            owed = self.relayed_owed
            if self.sample is None and owed // LATENCY_SAMPLE_EVERY != (owed + n) // LATENCY_SAMPLE_EVERY:
                self.sample = (owed + n, self.clock())
            self.relayed_owed = owed + n
        if kind == PUBSUB:
            self.pubsub_owed += n
        if self.slots and self.slots[-1][0] == kind:
            self.slots[-1][1] += n
        else:
            self.slots.append([kind, n])

    def rewrite(self, n: int, fn: Callable[[list[bytes]], bytes]) -> None:
        """The next ``n`` upstream replies are owed to the client as ``fn`` of them (one reply)."""
        self.slots.append([REWRITE, n, fn, []])

    def expect_exec(self, errors: dict[int, bytes], subs: bool) -> None:
        """EXEC's reply, with ``errors`` (by position) put in place of its stand-ins' elements; ``subs``:
        the transaction (un)subscribed, and the session sees the reply (exec_done)."""
        self.slots.append([SPLICE, 1, errors, subs])

    def close_after(self) -> None:
        """Close once every reply owed so far has been sent."""
        if self.slots:
            self.slots.append([CLOSE, 0])
        else:
            self.closing = True

    def data(self, data: bytes) -> None:
        """Bytes from Redis: relay them in order, slot the replies made here in between."""
        if self.closing:
            return
        slots = self.slots
        if len(slots) == 1 and slots[0][0] == RELAY and not self.carry and not self.held and self._plain():
            # The common case: only relayed replies are owed and the chunk is whole RESP2 replies:
            # count them and pass the chunk on as it came.
            owed = slots[0]
            try:
                n = whole_frames(data, owed[1])
            except ValueError:
                n = -1
            if n >= 0:
                self.to_client.append(data)
                self._relayed(n)
                owed[1] -= n
                if owed[1] == 0:
                    slots.popleft()
                return
        buf = self.carry + data if self.carry else data
        try:
            frames, consumed = self.scanner.scan(buf)
        except (ProtocolError, ValueError):
            self.failed("redisguard: unexpected reply from upstream")
            return
        self.carry = buf[consumed:]
        cut = 0
        for end, fkind, first in frames:
            head = slots[0] if slots else None
            seg = buf[cut:end]
            cut = end
            if fkind == _ATTR or head is None or self.is_push(fkind, first, head[0]) or (
                self.monitoring and fkind == 0x2B and _MONITOR_LINE.match(seg) is not None
            ):
                self.emit(seg)  # attribute (belongs to the next reply), out-of-band push, monitor feed
                continue
            kind = head[0]
            if kind == PUBSUB:
                if fkind == 0x2D:  # -
                    self.pubsub_owed -= head[1] - 1
                    head[1] = 1  # an error answers the whole command
                self.pubsub_owed -= 1
            if kind in _RELAYED:
                self.emit(seg)
                self._relayed(1)
                if kind == MONITOR and seg.startswith(b"+OK"):
                    self.monitoring = True
                elif self.monitoring and seg == b"+RESET\r\n":  # RESET ends the monitor feed, in order
                    self.monitoring = False
            elif kind in (EXEC_SUBS, SWALLOW_EXEC_SUBS):
                frame = b"".join(self.held) + seg
                self.held.clear()
                self.session.exec_done(frame)
                if kind == EXEC_SUBS:
                    self.to_client.append(frame)
            elif kind == REWRITE:
                head[3].append(b"".join(self.held) + seg)
                self.held.clear()
                if head[1] == 1:
                    self.to_client.append(head[2](head[3]))

            elif kind == SPLICE:
                frame = b"".join(self.held) + seg
                self.held.clear()
                if head[3]:
                    self.session.exec_done(frame)
                self.to_client.append(splice_exec(frame, head[2]))
            elif kind == AUTHCHECK:
                frame = b"".join(self.held) + seg
                self.held.clear()
                if frame.startswith(b"-"):
                    self.session.upstream_auth_refused()
                    self.failed("redisguard: upstream authentication failed; check [upstream] username and password")
                    return
            else:  # SWALLOW*: a reply the client must not see (an aborted EXEC's, CLIENT REPLY SKIP)
                if kind == SWALLOW_MONITOR and (self.held[0] if self.held else seg).startswith(b"+OK"):
                    self.monitoring = True
                self.held.clear()
            head[1] -= 1
            if head[1] == 0:
                slots.popleft()
                self.drain()
                if self.closing:
                    return
        if cut < consumed:
            head = slots[0] if slots else None
            if head is None or head[0] in _RELAYED:
                self.emit(buf[cut:consumed])
            else:
                self.held.append(buf[cut:consumed])

    def _plain(self) -> bool:
        """No reply can be out of band: RESP2, not subscribed (nor confirmations owed), no MONITOR feed,
        and the scanner between frames."""
        s = self.session
        return s.resp == 2 and not self.monitoring and not self.pubsub_owed and not s.subscribed and self.scanner.idle

    def _relayed(self, n: int) -> None:
        self.relayed_done += n
        if self.sample is not None and self.relayed_done >= self.sample[0]:
            self.session.reply_latency(self.clock() - self.sample[1])
            self.sample = None

    def is_push(self, kind: int, first: bytes | None, slot: int) -> bool:
        """Out-of-band: not the answer to a request. Subscribe confirmations answer (P|S)(UN)SUBSCRIBE
        even when RESP3 sends them as push frames; RESP2 messages are arrays told apart by their
        first element."""
        if kind == _PUSH:
            return not (slot == PUBSUB and first in CONFIRMATIONS)
        if kind == 0x2A and first is not None and self.session.resp == 2:
            # RESP2 messages are plain arrays, and come only while subscribed (or until the pending
            # (un)subscribe confirmations arrive): never mistake a reply that starts with "message".
            if slot == PUBSUB:
                return first not in CONFIRMATIONS
            return first in PUBSUB_MESSAGES and (self.session.subscribed or self.pubsub_owed > 0)
        return False

    def emit(self, seg: bytes) -> None:
        if self.held:
            self.to_client.extend(self.held)
            self.held.clear()
        self.to_client.append(seg)

    def drain(self) -> None:
        slots = self.slots
        while slots and slots[0][0] in (SYNTH, CLOSE):
            kind, value = slots.popleft()
            if kind == SYNTH:
                self.to_client.extend(value)
            else:
                self.closing = True
                slots.clear()


    def failed(self, message: str) -> None:
        """The upstream is gone or unusable: say so in one line and close."""
        if self.closing:
            return
        mid_frame = not self.scanner.idle or bool(self.carry)
        self.slots.clear()
        self.held.clear()
        self.pubsub_owed = 0
        self.sample = None
        if not mid_frame:  # never append a line to half a reply: just close
            self.to_client.append(b"-ERR " + message.encode() + b"\r\n")
        self.closing = True


def splice_exec(frame: bytes, errors: dict[int, bytes]) -> bytes:
    """EXEC's reply ``frame`` with element i replaced by ``errors[i]``; unchanged if it is not the array
    of the whole transaction (an aborted EXEC: a null, -EXECABORT)."""
    if frame[:1] != b"*" or frame.startswith(b"*-"):
        return frame
    head = frame.index(b"\r\n") + 2
    frames, _ = ReplyScanner().scan(frame[head:])
    parts, start, i = [frame[:head]], head, 0
    for fend, fkind, _ in frames:
        if fkind == _ATTR:
            continue  # an attribute goes with the element after it
        end = head + fend
        parts.append(errors.get(i, frame[start:end]))
        start, i = end, i + 1
    return b"".join(parts) if i == int(frame[1 : head - 2]) and start == len(frame) else frame
