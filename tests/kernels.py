"""Both implementations of the kernel, for tests that run once per twin."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from redisguard.fast import _pure


def compiled() -> ModuleType:
    """The compiled twin; an ImportError here means `pip install` did not build it."""
    return importlib.import_module("redisguard.fast._speedups")


TWINS = [pytest.param(_pure.stringmatchlen, id="pure"), pytest.param(compiled().stringmatchlen, id="compiled")]
