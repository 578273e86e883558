"""redisguard's compiled kernel and its pure-Python twin, one API, chosen at import.

``_speedups`` (C, built by ``pip install``) is used when it imports; otherwise, or with
``REDISGUARD_NO_EXTENSIONS=1`` in the environment (as aiohttp's ``AIOHTTP_NO_EXTENSIONS``), ``_pure``.
Both give the same answer for every input (tests/fast/test_kernel.py, test_replies.py); only the speed
differs.

- ``stringmatchlen(pattern, string, nocase=False) -> bool``: Redis 7.0's glob (util.c).
- ``whole_frames(buf, limit) -> int``: how many whole RESP2 replies ``buf`` is (at most ``limit``, none
  nested deeper than an array of scalars), or -1; a malformed length raises ValueError.
- ``ReplyScanner()``: ``.scan(buf) -> (frames, consumed)``, the ``(end, kind, first)`` of each top-level
  RESP2/RESP3 frame ending in ``buf``, its state carried from call to call; ``.idle``. A malformed length
  raises ValueError, an unknown type byte or an over-long header line ProtocolError.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from . import _pure
from ._pure import REPLY_HEADER_MAX, Frame

NO_EXTENSIONS = os.environ.get("REDISGUARD_NO_EXTENSIONS", "") not in ("", "0")


class FrameScanner(Protocol):
    """What either twin's ``ReplyScanner()`` makes."""

    def scan(self, buf: bytes, /) -> tuple[list[Frame], int]: ...
    @property
    def idle(self) -> bool: ...


COMPILED = False
stringmatchlen = _pure.stringmatchlen
whole_frames: Callable[[bytes, int], int] = _pure.whole_frames
ReplyScanner: Callable[[], FrameScanner] = _pure.ReplyScanner
if not NO_EXTENSIONS:
    try:
        from . import _speedups
    except ImportError:  # not built (no compiler at install time): the pure twin
        pass
    else:
        COMPILED = True
        stringmatchlen = _speedups.stringmatchlen
        whole_frames = _speedups.whole_frames
        ReplyScanner = _speedups.ReplyScanner

KERNEL = "compiled" if COMPILED else "pure Python"  # what `redisguard --version` and redisguard_build_info say

__all__ = [
    "COMPILED", "KERNEL", "NO_EXTENSIONS", "REPLY_HEADER_MAX", "Frame", "FrameScanner", "ReplyScanner", "stringmatchlen",
    "whole_frames",
]  # fmt: skip
