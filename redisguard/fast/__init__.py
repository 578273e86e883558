"""redisguard's compiled kernel and its pure-Python twin, one API, chosen at import.

``_speedups`` (C, built by ``pip install``) is used when it imports; otherwise, or with
``REDISGUARD_NO_EXTENSIONS=1`` in the environment (as aiohttp's ``AIOHTTP_NO_EXTENSIONS``), ``_pure``.
Both give the same answer for every input (tests/fast/test_kernel.py); only the speed differs.

- ``stringmatchlen(pattern, string, nocase=False) -> bool``: Redis 7.0's glob (util.c).
"""

from __future__ import annotations

import os

from . import _pure

NO_EXTENSIONS = os.environ.get("REDISGUARD_NO_EXTENSIONS", "") not in ("", "0")

COMPILED = False
stringmatchlen = _pure.stringmatchlen
if not NO_EXTENSIONS:
    try:
        from . import _speedups
    except ImportError:  # not built (no compiler at install time): the pure twin
        pass
    else:
        COMPILED = True
        stringmatchlen = _speedups.stringmatchlen

KERNEL = "compiled" if COMPILED else "pure Python"  # what `redisguard --version` and redisguard_build_info say

__all__ = ["COMPILED", "KERNEL", "NO_EXTENSIONS", "stringmatchlen"]
