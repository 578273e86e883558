"""Requests, sans-IO: Redis's own request reader (networking.c), incremental and bounded.

See :class:`RequestParser` for the theory of operation: what Redis parses is what redisguard checked.
"""

from __future__ import annotations

import re

import hiredis

from redisguard.protocol.resp import (
    INT_MAX,
    PROTO_INLINE_MAX_SIZE,
    PROTO_MAX_BULK_LEN,
    UNAUTH_MAX_BULK,
    UNAUTH_MAX_MULTIBULK,
    ProtocolError,
    encode_requests,
)


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


class RequestParser:
    """Redis's request reader (networking.c ``processInputBuffer``), incremental and bounded.

    Theory of operation
    -------------------
    The parser keeps Redis's own client state (``multibulklen``, ``bulklen``, the arguments read so
    far) across reads, so each ``feed`` does work in proportion to the bytes it is given, never to a
    count or length a client declared, and never re-reads what it has seen. It follows Redis to the
    byte: a request starting with ``*`` is multibulk, anything else inline; header lines end at the
    first ``\r`` (or ``\n`` inline) and, like Redis's ``strchr``, a NUL before it hides it; the two
    bytes after a bulk are skipped unchecked; counts <= 0 and empty lines are skipped; the errors are
    Redis's words, and the requests before an error in the same read are returned with it.

    ``feed(data)`` returns the complete requests. ``raw`` is then ``data`` itself when ``data`` held
    exactly those requests in canonical encoding (``*N`` and ``$len`` bulks, nothing else), which is
    the only case in which a caller may forward the client's bytes unchanged; otherwise it is None and
    requests must be re-encoded. That fast case is recognised with hiredis and then *proven* by
    comparing the bytes with the canonical encoding of what hiredis returned: hiredis speaks RESP3
    (``~``, ``%``, ``|``, nested arrays, ``+`` strings ...) where Redis's request reader does not, so
    its parse is trusted only when it is byte-identical to the canonical one. hiredis allocates a
    declared aggregate size up front, so chunks that could declare a large one never reach it.

    After a protocol error, ``error`` is set and nothing more is parsed (Redis replies and closes).
    Before authentication (``authenticated = False``) Redis's pre-auth limits apply and at most one
    request is returned per call; the caller lifts the limits after AUTH and calls ``feed(b"")``.
    """
    __slots__ = (
        "_argv", "_buf", "_bulklen", "_cost", "_have", "_hidden", "_mbulk", "_parts", "_reader", "_scanned",
        "authenticated", "error", "max_request_bytes", "raw",
    )  # fmt: skip


    # Per-argument bookkeeping counted against max_request_bytes, so a request of empty arguments
    # cannot hold many times its size in memory.
    ARG_OVERHEAD = 64

    def __init__(self, max_request_bytes: int = PROTO_MAX_BULK_LEN + PROTO_INLINE_MAX_SIZE) -> None:
        self._reader = hiredis.Reader()
        self._buf = bytearray()  # unparsed input: a partial header/inline line, or a partial request
        self._scanned = 0  # bytes of _buf already searched for the current line's terminator
        self._hidden = False  # a NUL hides the current line's terminator (it never completes)
        self._mbulk = 0  # arguments still to read in the current multibulk request (multibulklen)
        self._bulklen = -1  # length of the bulk being read, -1 while reading its header
        self._argv: list[bytes] = []
        self._parts: list[bytes] = []  # body (+2 trailing bytes) of a bulk arriving over several reads
        self._have = 0
        self._cost = 0  # bytes (and per-argument overhead) held for the current request
        self.max_request_bytes = max_request_bytes
        self.authenticated = True
        self.raw: bytes | None = None
        self.error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._have

    @property
    def idle(self) -> bool:
        """Between requests, with nothing buffered."""
        return not self._buf and not self._mbulk and not self._parts

    def discard(self) -> None:
        """Nothing more will be fed (the client is gone): let go of the request read so far."""
        self._buf, self._argv, self._parts = bytearray(), [], []
        self._scanned = self._have = self._cost = self._mbulk = 0
        self._bulklen = -1
        self._hidden = False

    def feed(self, data: bytes) -> list[list[bytes]]:
        self.raw = None
        if self.error is not None:
            return []
        if (
            self.authenticated
            and data.startswith(b"*")
            and not self._buf
            and not self._mbulk
            and not self._parts
            and not _hiredis_unsafe(data)
        ):
            fast = self._hiredis(data)
            if fast is not None:
                return fast
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        out: list[list[bytes]] = []
        try:
            used = self._parse(buf, out)
        except ProtocolError as e:
            self.error = e
            self._buf, self._argv, self._parts = bytearray(), [], []
            return out
        if buf is self._buf:
            del self._buf[:used]
        elif used < len(data):
            self._buf = bytearray(data[used:])
        if used and self._scanned:
            self._scanned = max(0, self._scanned - used)
        return out

    def _hiredis(self, data: bytes) -> list[list[bytes]] | None:
        """The fast path: whole canonical requests; None sends ``data`` to the exact parser."""
        reader = self._reader
        out: list[list[bytes]] = []
        try:
            reader.feed(data)
            while (req := reader.gets()) is not False:
                out.append(req)
            canonical = encode_requests(out)
        except Exception:  # hiredis's view is not a request stream (RESP3 types, nesting, a bad map key)
            self._reader = hiredis.Reader()
            return None
        if canonical == data:
            self.raw = data
            return [r for r in out if r] if b"*0\r\n" in data else out  # "*0\r\n": Redis skips it
        # A partial request, or bytes whose meaning differs for Redis: the exact parser reads them all.
        self._reader = hiredis.Reader()
        return None

    # -- Redis's rules ----------------------------------------------------------------------------
    def _line_end(self, buf: bytes | bytearray, start: int, term: bytes, too_big: str) -> int:
        """Redis's ``strchr(querybuf+pos, term)`` for the line at ``start``: its index, or -1 to wait.

        A NUL before the terminator ends strchr's search, so such a line never completes: like Redis
        the parser waits and refuses once more than PROTO_INLINE_MAX_SIZE bytes are pending. (Redis
        may find a terminator a little past that limit, depending on how its 16 KiB reads fall; the
        parser refuses those lines, never reads them differently.)"""
        if not self._hidden:
            limit = start + PROTO_INLINE_MAX_SIZE + 1
            scan_from = max(start, self._scanned)
            end = buf.find(term, scan_from, limit)
            if buf.find(b"\x00", scan_from, end if end >= 0 else limit) >= 0:
                self._hidden = True
            elif end >= 0:
                self._scanned = 0
                return end
            else:
                self._scanned = min(len(buf), limit)  # never search these bytes again
        if len(buf) - start > PROTO_INLINE_MAX_SIZE:
            raise ProtocolError(too_big)
        return -1

    def _parse(self, buf: bytes | bytearray, out: list[list[bytes]]) -> int:
        """Read requests from ``buf`` into ``out``; returns how many bytes were consumed."""
        pos = 0
        n = len(buf)
        while True:
            if not self._mbulk:
                if pos >= n or (out and not self.authenticated):
                    return pos
                if buf[pos] != 0x2A:  # not '*': an inline request
                    nl = self._line_end(buf, pos, b"\n", "too big inline request")
                    if nl < 0:
                        return pos
                    end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
                    argv = split_args(bytes(buf[pos:end]))
                    if argv is None:
                        raise ProtocolError("unbalanced quotes in request")
                    pos = nl + 1
                    if argv:
                        out.append(argv)
                    continue
                cr = self._line_end(buf, pos, b"\r", "too big mbulk count string")
                if cr < 0 or cr + 1 >= n:  # Redis also waits for the byte after the CR
                    return pos
                count = string2ll(bytes(buf[pos + 1 : cr]))
                if count is None or count > INT_MAX:
                    raise ProtocolError("invalid multibulk length")
                if count > UNAUTH_MAX_MULTIBULK and not self.authenticated:
                    raise ProtocolError("unauthenticated multibulk length")
                self._cost = cr + 2 - pos
                pos = cr + 2
                if count > 0:  # Redis skips "*0" and negative counts
                    self._mbulk = count
                continue
            if self._bulklen < 0:
                if pos >= n:
                    return pos
                cr = self._line_end(buf, pos, b"\r", "too big bulk count string")
                if cr < 0 or cr + 1 >= n:
                    return pos
                if buf[pos] != 0x24:  # '$'
                    raise ProtocolError(b"expected '$', got '%c'" % buf[pos])
                blen = string2ll(bytes(buf[pos + 1 : cr]))
                if blen is None or blen < 0 or blen > PROTO_MAX_BULK_LEN:
                    raise ProtocolError("invalid bulk length")
                if blen > UNAUTH_MAX_BULK and not self.authenticated:
                    raise ProtocolError("unauthenticated bulk length")
                self._count(cr + 2 - pos + blen + 2 + self.ARG_OVERHEAD)
                pos = cr + 2
                self._bulklen = blen
            blen = self._bulklen
            want = blen + 2 - self._have  # the rest of the body and the two bytes Redis skips unchecked
            body = max(0, blen - self._have)
            if n - pos < want:  # keep a partial body aside: the buffer only ever holds header lines
                take = min(n - pos, body)
                if take:
                    self._parts.append(bytes(buf[pos : pos + take]))
                self._have += n - pos
                return n
            if self._parts:
                if body:
                    self._parts.append(bytes(buf[pos : pos + body]))
                arg = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
                self._parts = []
            else:
                arg = bytes(buf[pos : pos + blen])
            self._have = 0
            pos += want
            self._argv.append(arg)
            self._bulklen = -1
            self._mbulk -= 1
            if not self._mbulk:
                out.append(self._argv)
                self._argv = []

    def _count(self, size: int) -> None:
        self._cost += size
        if self._cost > self.max_request_bytes:
            raise ProtocolError("request exceeds max_request_bytes")


def _hiredis_unsafe(data: bytes) -> bool:
    """Could hiredis see an aggregate in ``data`` that makes it allocate more than ``data`` is worth?

    hiredis allocates a declared array/set/map/push size at its header; canonical requests only have
    ``*N`` headers, and with N < 100 the allocation stays small. Anything else takes the exact path."""
    return _UNSAFE.search(data) is not None


# RESP3 aggregate type bytes anywhere, or an array header of 100 elements or more.
_UNSAFE = re.compile(rb"[~%|>]|\*[1-9][0-9]{2}")
