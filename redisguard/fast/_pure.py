"""The pure-Python twin of ``_speedups.c``: Redis 7.0's ``stringmatchlen`` (util.c), byte for byte.

``stringmatchlen_impl`` recurses at each ``*``; here the recursion is an explicit stack of the ``*``
loops in progress, so the nesting limit (``nesting > 1000`` answers "no match", CVE-2022-36021) is
reached without Python's own recursion limit, and ``skipLongerMatches`` (once the rest of the pattern
failed from every position, no earlier ``*`` retries it) keeps the cost polynomial, as in Redis.

Bytes compare as C ``char``: signed in ``[a-z]`` ranges, and ``tolower`` folds only A-Z (Redis never
sets LC_CTYPE). Where the C code reads the NUL after a pattern (``pattern[1]`` at the last byte), these
loops test the index instead: a NUL is never ``*``, ``^`` or ``]``.
"""

from __future__ import annotations

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
