"""Both implementations of the kernel, for tests that run once per twin."""

from __future__ import annotations

from typing import Protocol

import pytest

from redisguard.fast import _pure, _speedups  # (an ImportError here means `pip install` did not build the compiled twin)


class Kernel(Protocol):
    """Either twin's stringmatchlen (a test's ``kernel`` parameter)."""

    def __call__(self, pattern: bytes, string: bytes, nocase: bool = False, /) -> bool: ...


TWINS = [pytest.param(_pure.stringmatchlen, id="pure"), pytest.param(_speedups.stringmatchlen, id="compiled")]

# Either twin's reply-frame counting (a test's ``whole_frames`` / ``make_scanner`` parameter).
WHOLE_FRAMES = [pytest.param(_pure.whole_frames, id="pure"), pytest.param(_speedups.whole_frames, id="compiled")]
SCANNERS = [pytest.param(_pure.ReplyScanner, id="pure"), pytest.param(_speedups.ReplyScanner, id="compiled")]
