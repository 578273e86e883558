"""Redis's glob: ``stringmatchlen`` (util.c, 7.0), byte for byte, from the kernel (:mod:`redisguard.fast`).

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

import functools
import operator
import re
from collections.abc import Callable

from ..fast import stringmatchlen

stringmatch = stringmatchlen  # the kernel's: compiled, or its pure twin (redisguard.fast)


_SPECIAL = re.compile(rb"[*?\[\\]")  # (a regex: a users file compiles hundreds of thousands of patterns)


def compile_glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A matcher equivalent to ``stringmatch(pattern, s)``, fast for the usual shapes.

    Each fast path must give ``stringmatch``'s answer for every string, ``b""`` included."""
    if pattern == b"*":
        return bool  # "*" matches every string except the empty one
    if _SPECIAL.search(pattern) is None:
        return pattern.__eq__
    body = pattern[:-1]
    if pattern.endswith(b"*") and body and _SPECIAL.search(body) is None:
        # body is non-empty, so never true for b""; a methodcaller: as fast as a lambda, a third of its
        # size (a large users file holds hundreds of thousands of patterns)
        return operator.methodcaller("startswith", body)
    return functools.partial(stringmatchlen, pattern)  # the kernel itself: no Python frame per call


def needs_matcher(pattern: bytes) -> bool:
    """True if :func:`compile_glob` gives ``pattern`` the general matcher, whose cost grows with the
    string's length (the shapes it turns into ``==`` or ``startswith`` cost little whatever the key)."""
    return isinstance(compile_glob(pattern), functools.partial)
