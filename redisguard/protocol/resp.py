"""RESP framing, sans-IO: encoders, Redis's limits and reply scanning (requests: :mod:`.request`).

Theory of operation
-------------------
Replies (upstream → proxy) are never decoded: :class:`ReplyScanner` only finds where each top-level
frame ends, so the proxy can relay the upstream bytes unchanged and still slot its own replies
(``-NOPERM ...``) between them in the right order. The scanner is incremental and keeps at most one
partial header line, so a 50 MB bulk string streams through in O(n) without buffering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Redis's limits (server.h / config.c defaults).
PROTO_INLINE_MAX_SIZE = 64 * 1024
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
INT_MAX = 2**31 - 1
# Before authentication Redis accepts only tiny requests (CVE-2021-32675 hardening).
UNAUTH_MAX_MULTIBULK = 10
UNAUTH_MAX_BULK = 16384


def cstr(arg: bytes, limit: int | None = None) -> bytes:
    """What printf's ``%s`` (``%.*s`` with ``limit``) prints of an argument: bytes up to the first NUL."""
    nul = arg.find(b"\0", 0, limit)
    return arg[: nul if nul >= 0 else limit]


def error_format(msg: bytes) -> bytes:
    """The error line of Redis's addReplyErrorFormat: CR/LF at the ends trimmed, inside turned into
    spaces (a client's bytes in an error can never end the line early), ``-ERR`` prefixed unless the
    text names its own code. Format client arguments with :func:`cstr` first, as ``%s`` would."""
    msg = msg.strip(b"\r\n").replace(b"\r", b" ").replace(b"\n", b" ")
    return (msg if msg.startswith(b"-") else b"-ERR " + msg) + b"\r\n"


class ProtocolError(Exception):
    """A request Redis would reject with ``-ERR Protocol error: <msg>`` and then close.

    The message is text, or bytes when it quotes the client's bytes (sent raw, as Redis's ``%c``)."""

    def reply(self) -> bytes:
        msg = self.args[0] if self.args else ""
        return error_format(b"Protocol error: " + (msg if isinstance(msg, bytes) else str(msg).encode()))

    def __str__(self) -> str:
        msg = self.args[0] if self.args else ""
        return msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)


def encode_bulk(s: bytes | str) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s  # names from bytes round-trip
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_command(argv: Sequence[bytes]) -> bytes:
    return encode_requests((argv,))


_ARRAY_HEADERS = tuple(b"*%d\r\n" % i for i in range(64))
_BULK_HEADERS = tuple(b"$%d\r\n" % i for i in range(512))


def encode_requests(requests: Sequence[Sequence[bytes]]) -> bytes:
    """``encode_command`` of each request, joined (the canonical bytes of a pipeline), in one pass."""
    out: list[bytes] = []
    add = out.append
    for argv in requests:
        n = len(argv)
        add(_ARRAY_HEADERS[n] if n < 64 else b"*%d\r\n" % n)
        for arg in argv:
            n = len(arg)
            add(_BULK_HEADERS[n] if n < 512 else b"$%d\r\n" % n)
            add(arg)
            add(b"\r\n")
    return b"".join(out)


def encode_command_pieces(argv: Sequence[bytes], step: int = 1024) -> list[bytes]:
    """``encode_command`` in pieces of ``step`` arguments, for huge requests encoded in a worker
    thread: each join is short, so the thread never holds the GIL long enough to stall the loop."""
    pieces = [b"*%d\r\n" % len(argv)]
    for i in range(0, len(argv), step):
        pieces.append(b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in argv[i : i + step]]))
    return pieces


OK = b"+OK\r\n"

# --------------------------------------------------------------------------------------------------
# Replies


def whole_frames(buf: bytes, limit: int) -> int:
    """How many RESP2 replies ``buf`` holds, if it is exactly whole replies (no partial one at the end),
    at most ``limit`` of them, and none nested deeper than an array of strings/integers/errors (the
    common shapes: GET, SET, INCR, MGET, HGETALL); else -1, and the caller scans it frame by frame."""
    n = len(buf)
    pos = count = 0
    left = 0  # elements still to come of the array being read (arrays of arrays are not read here)
    find = buf.find
    while pos < n:
        t = buf[pos]
        cr = find(b"\r\n", pos)
        if cr < 0:
            return -1
        if t == 0x24:  # $
            size = int(buf[pos + 1 : cr])
            pos = cr + 2 if size < 0 else cr + size + 4
        elif t in _SIMPLE:
            pos = cr + 2
        elif t == 0x2A and not left:  # *: its elements follow (none for *0 and *-1)
            left = max(int(buf[pos + 1 : cr]), 0)
            pos = cr + 2
            if left:
                continue
        else:
            return -1
        if left:
            left -= 1
            if left:
                continue
        if count == limit:  # one reply more than owed
            return -1
        count += 1
    return count if pos == n and not left else -1


_SIMPLE = frozenset(b"+-:")


@dataclass(slots=True)
class Frame:
    """A complete top-level reply frame: where it ends in the scanned buffer and what it is."""

    end: int
    kind: int  # the RESP type byte: ord('+'), ord('>'), ...
    first: bytes | None  # first element of an aggregate, when it is a short string (pub/sub kinds)


_AGG = {ord("*"): 1, ord(">"): 1, ord("~"): 1, ord("%"): 2, ord("|"): 2}
_BULK = frozenset(b"$=!")
_LINE = frozenset(b"+-:,_#(")


class ReplyScanner:
    """Finds the ends of top-level reply frames in a byte stream without decoding it.

    ``scan(buf)`` consumes bytes from ``buf`` (which starts with what ``scan`` returned as held back
    last time) and returns ``(frames, consumed)``: everything before ``consumed`` may be relayed; the
    rest is a partial header line to be prepended to the next chunk. An attribute frame (``|``)
    is reported with its kind; the caller treats it as part of the reply that follows."""

    __slots__ = ("_skip", "_stack", "_top_kind", "_first", "_want_first")

    def __init__(self) -> None:
        self._skip = 0  # bytes of a bulk body (+CRLF) still to pass over
        self._stack: list[int] = []  # remaining elements of each open aggregate
        self._top_kind = 0
        self._first: bytes | None = None
        self._want_first = False

    def scan(self, buf: bytes) -> tuple[list[Frame], int]:
        frames: list[Frame] = []
        n = len(buf)
        pos = 0
        stack = self._stack
        while True:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if self._skip:
                    return frames, pos
                self._element_done(frames, pos)
                continue
            if pos >= n:
                return frames, pos
            cr = buf.find(b"\r\n", pos)
            if cr < 0:
                if n - pos > PROTO_INLINE_MAX_SIZE * 16:
                    raise ProtocolError("reply header line too long")
                return frames, pos
            t = buf[pos]
            if not stack:
                self._top_kind = t
                self._first = None
                self._want_first = t in _AGG
            if t in _LINE:
                pos = cr + 2
                self._element_done(frames, pos)
            elif t in _BULK:
                size = int(buf[pos + 1 : cr])
                pos = cr + 2
                if size < 0:
                    self._element_done(frames, pos)
                else:
                    if self._want_first and len(stack) == 1 and size <= 32 and pos + size <= n:
                        self._first = buf[pos : pos + size]
                    self._want_first = False
                    self._skip = size + 2
            elif t in _AGG:
                size = int(buf[pos + 1 : cr])
                pos = cr + 2
                if stack:
                    self._want_first = False
                if size <= 0:
                    self._element_done(frames, pos)
                else:
                    stack.append(size * _AGG[t])
            else:
                raise ProtocolError("unexpected reply type byte %r" % chr(t))

    def _element_done(self, frames: list[Frame], pos: int) -> None:
        stack = self._stack
        if len(stack) == 1:
            self._want_first = False
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                return
            stack.pop()
        frames.append(Frame(pos, self._top_kind, self._first))

    @property
    def idle(self) -> bool:
        """True between frames."""
        return not self._stack and not self._skip
