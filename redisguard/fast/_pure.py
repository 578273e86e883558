"""The pure-Python twin of ``_speedups.c``: Redis 7.0's ``stringmatchlen`` (util.c), byte for byte, and
the reply-frame counting of the reply queue (``whole_frames``, ``ReplyScanner``; below).

``stringmatchlen_impl`` recurses at each ``*``; here the recursion is an explicit stack of the ``*``
loops in progress, so the nesting limit (``nesting > 1000`` answers "no match", CVE-2022-36021) is
reached without Python's own recursion limit, and ``skipLongerMatches`` (once the rest of the pattern
failed from every position, no earlier ``*`` retries it) keeps the cost polynomial, as in Redis.

Bytes compare as C ``char``: signed in ``[a-z]`` ranges, and ``tolower`` folds only A-Z (Redis never
sets LC_CTYPE). Where the C code reads the NUL after a pattern (``pattern[1]`` at the last byte), these
loops test the index instead: a NUL is never ``*``, ``^`` or ``]``.
"""

from __future__ import annotations

from redisguard.protocol.resp import PROTO_INLINE_MAX_SIZE, ProtocolError

_STAR, _QMARK, _LBRACKET, _RBRACKET, _BACKSLASH, _CARET, _DASH = b"*?[]\\^-"
MAX_NESTING = 1000


def _signed(c: int) -> int:
    return c - 256 if c >= 128 else c


def _lower(c: int) -> int:
    return c + 32 if 65 <= c <= 90 else c


def _bracket(p: bytes, pi: int, sc: int, nocase: bool) -> tuple[bool, int]:
    """``[...]`` at ``p[pi]`` against the string byte ``sc``: (matched, index of the class's last byte)."""
    plen = len(p)
    pi += 1
    neg = pi < plen and p[pi] == _CARET
    if neg:
        pi += 1
    matched = False
    while True:
        if pi < plen and p[pi] == _BACKSLASH and plen - pi >= 2:
            pi += 1
            if p[pi] == sc:  # an escaped byte compares exactly, even with nocase (as in Redis)
                matched = True
        elif pi < plen and p[pi] == _RBRACKET:
            break
        elif pi >= plen:
            pi -= 1  # an unclosed class ends with the pattern
            break
        elif plen - pi >= 3 and p[pi + 1] == _DASH:
            start, end, ch = _signed(p[pi]), _signed(p[pi + 2]), _signed(sc)
            if start > end:
                start, end = end, start
            if nocase:
                start, end, ch = _lower(start), _lower(end), _lower(ch)
            pi += 2
            if start <= ch <= end:
                matched = True
        elif (p[pi] == sc) if not nocase else (_lower(p[pi]) == _lower(sc)):
            matched = True
        pi += 1
    return matched != neg, pi


def stringmatchlen(pattern: bytes, string: bytes, nocase: bool = False) -> bool:
    p, s = pattern, string
    plen, slen = len(p), len(s)
    skip = False  # skipLongerMatches
    stars: list[list[int]] = []  # the '*' loops in progress: [pattern index after the '*', string index tried]
    pi = si = 0  # the frame being run: stringmatchlen_impl(p[pi:], s[si:]) at nesting len(stars)
    while True:
        result = False
        if len(stars) <= MAX_NESTING:
            descend = False
            while pi < plen and si < slen:
                c = p[pi]
                if c == _STAR:
                    while pi + 1 < plen and p[pi + 1] == _STAR:
                        pi += 1
                    if pi + 1 == plen:
                        result = True
                        break
                    stars.append([pi + 1, si])  # the loop's first try: the rest of the pattern from here
                    pi += 1
                    descend = True
                    break
                if c == _QMARK:
                    pass
                elif c == _LBRACKET:
                    matched, pi = _bracket(p, pi, s[si], nocase)
                    if not matched:
                        break
                else:
                    if c == _BACKSLASH and plen - pi >= 2:
                        pi += 1
                        c = p[pi]
                    if (c != s[si]) if not nocase else (_lower(c) != _lower(s[si])):
                        break
                si += 1
                pi += 1
                if si == slen:
                    while pi < plen and p[pi] == _STAR:
                        pi += 1
                    result = pi == plen
                    break
            else:
                result = pi == plen and si == slen
            if descend:
                continue
        # The frame answered `result`: hand it to the '*' loop that called it.
        while True:
            if not stars:
                return result
            top = stars[-1]
            if result or skip:
                stars.pop()  # a match ends every loop; skipLongerMatches ends them with no match
                continue
            top[1] += 1
            if top[1] < slen:
                pi, si = top
                break
            skip = True  # the rest of the pattern failed from every position: no longer matches either
            stars.pop()


# --------------------------------------------------------------------------------------------------
# Reply frames (what session/replies.py counts in every chunk Redis sends)
#
# Replies (upstream → proxy) are never decoded: the scanner only finds where each top-level frame ends,
# so the proxy can relay the upstream bytes unchanged and still slot its own replies (``-NOPERM ...``)
# between them in the right order. It is incremental and keeps at most one partial header line, so a
# 50 MB bulk string streams through in O(n) without buffering.
#
# A declared length (``$<n>``, ``*<n>``, ...) is read as ``int()`` reads bytes: a malformed one raises
# ValueError (the caller's: decline the chunk, or fail the upstream), in both twins. A negative one is a
# null, whatever its value; one that no stream could ever reach the end of stays pending forever.

Frame = tuple[int, int, bytes | None]  # (end in the scanned buffer, RESP type byte, first element of a pub/sub kind)

REPLY_HEADER_MAX = PROTO_INLINE_MAX_SIZE * 16  # a reply header line longer than this is a protocol error
_SIMPLE = frozenset(b"+-:")
_AGG = {ord("*"): 1, ord(">"): 1, ord("~"): 1, ord("%"): 2, ord("|"): 2}
_BULK = frozenset(b"$=!")
_LINE = frozenset(b"+-:,_#(")


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


class ReplyScanner:
    """Finds the ends of top-level reply frames in a byte stream without decoding it.

    ``scan(buf)`` consumes bytes from ``buf`` (which starts with what ``scan`` returned as held back
    last time) and returns ``(frames, consumed)``: everything before ``consumed`` may be relayed; the
    rest is a partial header line to be prepended to the next chunk. An attribute frame (``|``)
    is reported with its kind; the caller treats it as part of the reply that follows. A type byte
    RESP does not have, or a header line over ``REPLY_HEADER_MAX``, raises ProtocolError."""

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
                if n - pos > REPLY_HEADER_MAX:
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
        frames.append((pos, self._top_kind, self._first))

    @property
    def idle(self) -> bool:
        """True between frames."""
        return not self._stack and not self._skip
