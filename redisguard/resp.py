"""RESP framing, sans-IO.

Theory of operation
-------------------
Requests (client → proxy) are parsed into argv lists. Multibulk requests go through ``hiredis.Reader``
(C speed); inline requests (``PING\\r\\n`` from telnet/nc) and every malformed request go through a
small pure-Python parser that follows Redis's ``processInlineBuffer``/``processMultibulkBuffer`` so
the protocol errors are Redis's own words.

Replies (upstream → proxy) are never decoded: :class:`ReplyScanner` only finds where each top-level
frame ends, so the proxy can relay the upstream bytes unchanged and still slot its own replies
(``-NOPERM ...``) between them in the right order. The scanner is incremental and keeps at most one
partial header line, so a 50 MB bulk string streams through in O(n) without buffering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import hiredis

# Redis's limits (server.h / config.c defaults).
PROTO_INLINE_MAX_SIZE = 64 * 1024
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
INT_MAX = 2**31 - 1
# Before authentication Redis accepts only tiny requests (CVE-2021-32675 hardening).
UNAUTH_MAX_MULTIBULK = 10
UNAUTH_MAX_BULK = 16384


class ProtocolError(Exception):
    """A request Redis would reject with ``-ERR Protocol error: <msg>`` and then close."""

    def reply(self) -> bytes:
        return b"-ERR Protocol error: " + str(self).encode() + b"\r\n"


def encode_bulk(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_error(msg: str) -> bytes:
    return b"-" + msg.encode() + b"\r\n"


def encode_command(argv: Sequence[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(argv)]
    for arg in argv:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


OK = b"+OK\r\n"

# --------------------------------------------------------------------------------------------------
# Requests


def string2ll(s: bytes) -> int | None:
    """Redis's string2ll: optional '-', digits, no leading zeros (except "0"), no spaces, fits int64."""
    if not s or len(s) > 20:
        return None
    body = s[1:] if s[:1] == b"-" else s
    if not body.isdigit() or not body.isascii() or (len(body) > 1 and body[:1] == b"0"):
        return None
    if s == b"-0":
        return None
    v = int(s)
    if not -(2**63) <= v < 2**63:
        return None
    return v


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"
_DQ, _SQ = ord('"'), ord("'")


def _closes_quote(line: bytes, i: int) -> bool:
    """A closing quote must be followed by a space or the end of the line (sdssplitargs)."""
    return i + 1 >= len(line) or line[i + 1] in b" \n\r\t\v\f"


def split_args(line: bytes) -> list[bytes] | None:
    """Redis's ``sdssplitargs``: whitespace-separated, "double" (with escapes) and 'single' quotes.

    Returns None on unbalanced quotes, as Redis does."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \n\r\t\v\f\x00":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        quote = 0  # the open quote character, if any
        while True:
            if quote:
                if i >= n:
                    return None
                c = line[i]
                if (
                    quote == _DQ
                    and c == 0x5C
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif quote == _DQ and c == 0x5C and i + 1 < n:
                    i += 1
                    cur += _ESCAPES.get(line[i], bytes([line[i]]))
                elif quote == _SQ and c == 0x5C and i + 1 < n and line[i + 1] == _SQ:
                    i += 1
                    cur.append(_SQ)
                elif c == quote:
                    if not _closes_quote(line, i):
                        return None
                    i += 1
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \n\r\t\x00":
                    break
                if c in (_DQ, _SQ):
                    quote = c
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


def _header_end(buf: bytes, p: int, too_big: str) -> int:
    """Where the header line starting at ``p`` ends (its CR, with the LF present), or -1 if not yet."""
    cr = buf.find(b"\r", p)
    if cr < 0:
        if len(buf) - p > PROTO_INLINE_MAX_SIZE:
            raise ProtocolError(too_big)
        return -1
    return cr if cr + 1 < len(buf) else -1


def parse_request(buf: bytes, pos: int, authenticated: bool = True) -> tuple[list[bytes] | None, int]:
    """Parse one request at ``buf[pos:]`` the way Redis does.

    Returns ``(argv, newpos)``; ``argv`` is None when more data is needed (newpos == pos) and ``[]``
    for an empty request Redis silently skips. Raises :class:`ProtocolError` with Redis's text."""
    n = len(buf)
    if pos >= n:
        return None, pos
    if buf[pos] != 0x2A:  # '*' → multibulk, anything else → inline
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if n - pos > PROTO_INLINE_MAX_SIZE:
                raise ProtocolError("too big inline request")
            return None, pos
        end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
        inline = split_args(buf[pos:end])
        if inline is None:
            raise ProtocolError("unbalanced quotes in request")
        return inline, nl + 1
    cr = _header_end(buf, pos, "too big mbulk count string")
    if cr < 0:
        return None, pos
    count = string2ll(buf[pos + 1 : cr])
    if count is None or count > INT_MAX:
        raise ProtocolError("invalid multibulk length")
    if count > UNAUTH_MAX_MULTIBULK and not authenticated:
        raise ProtocolError("unauthenticated multibulk length")
    p = cr + 2
    if count <= 0:
        return [], p
    argv: list[bytes] = []
    for _ in range(count):
        cr = _header_end(buf, p, "too big bulk count string")
        if cr < 0:
            return None, pos
        if buf[p] != 0x24:  # '$'
            raise ProtocolError("expected '$', got '%s'" % chr(buf[p]))
        blen = string2ll(buf[p + 1 : cr])
        if blen is None or blen < 0 or blen > PROTO_MAX_BULK_LEN:
            raise ProtocolError("invalid bulk length")
        if blen > UNAUTH_MAX_BULK and not authenticated:
            raise ProtocolError("unauthenticated bulk length")
        start = cr + 2
        if start + blen + 2 > n:
            return None, pos
        argv.append(bytes(buf[start : start + blen]))
        p = start + blen + 2  # Redis skips the trailing CRLF without checking it
    return argv, p


def _encoded_len(argv: list[bytes]) -> int:
    n = 3 + len(str(len(argv)))
    for a in argv:
        la = len(a)
        n += 5 + len(str(la)) + la
    return n


class RequestParser:
    """Incremental request parser: hiredis for multibulk, Python for inline requests and errors.

    ``feed(data)`` returns the complete requests now available and whether ``data`` held exactly
    those requests, whole — then the caller may forward ``data`` as-is instead of re-encoding.
    Before authentication (``authenticated = False``) Redis's tighter pre-auth limits apply and at
    most one request is returned per call, so the caller can lift the limits after a successful
    AUTH and call ``feed(b"")`` for the rest."""

    # Past this many buffered bytes of one unfinished request, validate its headers in Python so an
    # absurd length (``$9999999999``) is refused at once instead of being waited for.
    VALIDATE_AFTER = 64 * 1024

    def __init__(self, max_request_bytes: int = PROTO_MAX_BULK_LEN + PROTO_INLINE_MAX_SIZE) -> None:
        self._reader = hiredis.Reader()
        self._pending: list[bytes] = []  # raw bytes fed to hiredis since it last held nothing
        self._pending_len = 0
        self._validated_at = 0
        self._buf = b""  # Python-path buffer
        self.max_request_bytes = max_request_bytes
        self.authenticated = True

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._pending_len

    def feed(self, data: bytes) -> tuple[list[list[bytes]], bool]:
        if self._buf or (not self._pending and (not self.authenticated or data[:1] != b"*")):
            return self._feed_python(data), False
        if not data:
            return [], False
        clean = not self._pending
        self._reader.feed(data)
        self._pending.append(data)
        self._pending_len += len(data)
        out: list[list[bytes]] = []
        used = 0  # bytes of the pending stream that the returned requests account for
        try:
            while (req := self._reader.gets()) is not False:
                if type(req) is not list or not all(type(a) is bytes for a in req):
                    # Valid RESP but not a request (e.g. "*1\r\n:5\r\n"): let Python name the error.
                    return out + self._fall_back(len(out)), False
                out.append(req)
                used += _encoded_len(req)
        except hiredis.ProtocolError:
            return out + self._fall_back(len(out)), False
        # hiredis does not say whether it holds half a request, so account for the bytes: requests
        # are canonical RESP, whose length is known from argv alone.
        if used == self._pending_len:
            self._pending.clear()
            self._pending_len = 0
            self._validated_at = 0
            return out, clean
        if used > self._pending_len:  # a non-canonical encoding: Redis's own rules decide
            return self._fall_back(0), False
        if used:  # keep only the raw bytes of the unfinished request
            rest = b"".join(self._pending)[used:]
            self._pending = [rest]
            self._pending_len = len(rest)
        if self._pending_len > self.max_request_bytes:
            raise ProtocolError("request exceeds max_request_bytes")
        if self._pending_len <= self.VALIDATE_AFTER or self._pending_len > 2 * self._validated_at:
            self._validated_at = self._pending_len
            argv, end = parse_request(b"".join(self._pending), 0, True)  # raises on a bad header
            if argv is not None:  # complete by Redis's rules but not by hiredis's: non-canonical
                return out + self._fall_back(0), False
        return out, False

    @staticmethod
    def _skip(buf: bytes, done: int) -> bytes:
        """``buf`` without its first ``done`` requests (which hiredis already returned)."""
        pos = 0
        for _ in range(done):
            pos = parse_request(buf, pos, True)[1]
        return buf[pos:]

    def _fall_back(self, done: int) -> list[list[bytes]]:
        """hiredis refused the stream: re-read what it held, minus ``done`` requests, in Python."""
        buf = self._skip(b"".join(self._pending), done)
        self._pending = []
        self._pending_len = 0
        self._reader = hiredis.Reader()
        return self._feed_python(buf)

    def _feed_python(self, data: bytes) -> list[list[bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[list[bytes]] = []
        pos = 0
        while True:
            argv, newpos = parse_request(buf, pos, self.authenticated)
            if argv is None:
                break
            pos = newpos
            if argv:
                out.append(argv)
                if not self.authenticated:
                    break
        self._buf = buf[pos:]
        if len(self._buf) > self.max_request_bytes:
            raise ProtocolError("request exceeds max_request_bytes")
        return out


# --------------------------------------------------------------------------------------------------
# Replies


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
