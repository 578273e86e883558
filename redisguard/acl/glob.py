"""Redis's glob: a port of ``stringmatchlen`` (util.c, 7.0), byte for byte.

Not ``fnmatch``: Redis has no path separators, treats a trailing ``\\`` and an unclosed ``[`` in its
own way, compares bytes as signed chars in ranges, and gives up past 1000 nested ``*``.
:func:`compile_glob` turns the common shapes (``*``, ``prefix*``, literals) into plain string
operations so the hot path never runs the general matcher.

The empty string is the edge to watch. ``stringmatchlen``'s main loop runs only while both the
pattern and the string are non-empty, and trailing ``*`` are stripped only after a character of the
string was consumed, so no non-empty pattern (``*``, ``**``, ``a*``) matches ``""``; only the empty
pattern does. ``~*`` / ``allkeys`` (and ``&*`` / ``allchannels``) are flags checked before any
matching and do allow ``""``, but ``%R~*``, ``%W~*``, ``%RW~*`` (and ``&**``) are ordinary patterns and
do not. Redis 7.0.15 ``ACL DRYRUN`` agrees: a ``%RW~*`` user is denied ``GET ""``, a ``~*`` user may.
"""

from __future__ import annotations

from collections.abc import Callable

_STAR, _QMARK, _LBRACKET, _RBRACKET, _BACKSLASH, _CARET, _DASH = b"*?[]\\^-"


def _signed(c: int) -> int:
    return c - 256 if c >= 128 else c


def stringmatch(pattern: bytes, string: bytes, nocase: bool = False) -> bool:
    skip = [False]
    return _match(pattern, 0, string, 0, nocase, skip, 0)


def _lower(c: int) -> int:
    return c + 32 if 65 <= c <= 90 else c


def _match(p: bytes, pi: int, s: bytes, si: int, nocase: bool, skip: list[bool], nesting: int) -> bool:
    if nesting > 1000:
        return False
    plen, slen = len(p), len(s)
    while pi < plen and si < slen:
        c = p[pi]
        if c == _STAR:
            while pi + 1 < plen and p[pi + 1] == _STAR:
                pi += 1
            if pi + 1 == plen:
                return True
            while si < slen:
                if _match(p, pi + 1, s, si, nocase, skip, nesting + 1):
                    return True
                if skip[0]:
                    return False
                si += 1
            skip[0] = True
            return False
        elif c == _QMARK:
            si += 1
        elif c == _LBRACKET:
            pi += 1
            neg = pi < plen and p[pi] == _CARET
            if neg:
                pi += 1
            matched = False
            sc = s[si]
            while True:
                if pi < plen and p[pi] == _BACKSLASH and plen - pi >= 2:
                    pi += 1
                    if p[pi] == sc:
                        matched = True
                elif pi < plen and p[pi] == _RBRACKET:
                    break
                elif pi >= plen:
                    pi -= 1
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
                else:
                    if (p[pi] == sc) if not nocase else (_lower(p[pi]) == _lower(sc)):
                        matched = True
                pi += 1
            if neg:
                matched = not matched
            if not matched:
                return False
            si += 1
        else:
            if c == _BACKSLASH and plen - pi >= 2:
                pi += 1
                c = p[pi]
            if (c != s[si]) if not nocase else (_lower(c) != _lower(s[si])):
                return False
            si += 1
        pi += 1
        if si == slen:
            while pi < plen and p[pi] == _STAR:
                pi += 1
            break
    return pi == plen and si == slen


_SPECIAL = frozenset(b"*?[\\")


def compile_glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A matcher equivalent to ``stringmatch(pattern, s)``, fast for the usual shapes.

    Each fast path must give ``stringmatch``'s answer for every string, ``b""`` included."""
    if pattern == b"*":
        return bool  # "*" matches every string except the empty one
    if not any(c in _SPECIAL for c in pattern):
        return pattern.__eq__
    body = pattern[:-1]
    if pattern.endswith(b"*") and body and not any(c in _SPECIAL for c in body):
        return lambda s: s.startswith(body)  # body is non-empty, so never true for b""
    return lambda s: stringmatch(pattern, s)
