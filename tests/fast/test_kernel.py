"""The kernel (redisguard.fast): the compiled ``_speedups`` and its pure twin ``_pure`` give the same
answer for every input (hypothesis, adversarial and exponential patterns, NUL, high bytes, nocase),
the compiled one is in use after ``pip install``, it stays bounded on patterns built to explode
(CVE-2022-36021), and it lets other threads run while it matches a large input. The answers
against a real Redis are in test_glob.py and test_acl_differential.py, for both twins."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import redisguard
import redisguard.fast as fast
from redisguard.fast import _pure, _speedups
from tests.kernels import TWINS, Kernel

SYMBOLS = [b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"a", b"b", b"A", b"Z", b":", b"\x00", b"\xff", b"\x80", b"\xe9", b"\n"]
patterns = st.lists(st.sampled_from(SYMBOLS), max_size=12).map(b"".join)
strings = st.one_of(
    st.lists(st.sampled_from([b"a", b"b", b"A", b"z", b":", b"-", b"]", b"\\", b"*", b"\x00", b"\xff", b"\x80"]),
             max_size=16).map(b"".join),
    st.binary(max_size=16),
)  # fmt: skip


def test_the_compiled_kernel_is_in_use() -> None:
    """`pip install` builds it (bash .ci/run runs this suite on that install); REDISGUARD_NO_EXTENSIONS
    chooses the pure twin, and nothing else does."""
    if os.environ.get("REDISGUARD_NO_EXTENSIONS", "") not in ("", "0"):
        assert not fast.COMPILED and fast.KERNEL == "pure Python" and fast.stringmatchlen is _pure.stringmatchlen
    else:
        assert fast.COMPILED and fast.KERNEL == "compiled" and fast.stringmatchlen is _speedups.stringmatchlen


def test_no_extensions_forces_the_pure_twin() -> None:
    code = "import redisguard.fast as f, redisguard.acl.glob as g; print(f.KERNEL, g.stringmatch.__module__)"
    for value, want in (("1", "pure Python redisguard.fast._pure"), ("0", "compiled redisguard.fast._speedups")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "REDISGUARD_NO_EXTENSIONS": value},
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        assert out == want


def test_version_says_which_kernel() -> None:
    for flag, want in ("0", "fast path: compiled"), ("1", "fast path: pure Python"):
        env = {**os.environ, "REDISGUARD_NO_EXTENSIONS": flag}
        out = subprocess.run([sys.executable, "-m", "redisguard", "--version"], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert out == f"redisguard {redisguard.__version__}, {want}\n"


@settings(max_examples=3000, deadline=None)
@given(patterns, strings, st.booleans())
def test_twins_agree(pattern: bytes, string: bytes, nocase: bool) -> None:
    want = _pure.stringmatchlen(pattern, string, nocase)
    assert _speedups.stringmatchlen(pattern, string, nocase) is want
    assert _speedups.stringmatchlen(pattern, string, nocase=nocase) is want


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=24), st.binary(max_size=24), st.booleans())
def test_twins_agree_on_any_bytes(pattern: bytes, string: bytes, nocase: bool) -> None:
    assert _speedups.stringmatchlen(pattern, string, nocase) is _pure.stringmatchlen(pattern, string, nocase)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"*", b"a", b"*a", b"?", b"[a-b]", b"\\*", b"b"]), max_size=14).map(b"".join),
       st.integers(0, 300), st.sampled_from([b"a", b"b", b"ab", b"\x00a"]), st.booleans())  # fmt: skip
def test_twins_agree_on_star_heavy_patterns(pattern: bytes, n: int, unit: bytes, nocase: bool) -> None:
    """Many '*' against long runs: where skipLongerMatches decides the answer and the running time."""
    string = unit * (n // len(unit))
    assert _speedups.stringmatchlen(pattern, string, nocase) is _pure.stringmatchlen(pattern, string, nocase)
    assert _speedups.stringmatchlen(pattern + b"b", string, nocase) is _pure.stringmatchlen(pattern + b"b", string, nocase)


@pytest.mark.parametrize("stars", [999, 1000, 1001, 1002, 1500])
@pytest.mark.parametrize("kernel", TWINS)
def test_the_nesting_limit(kernel: Kernel, stars: int) -> None:
    """Deeper than 1000 nested '*' Redis answers "no match" (the frame at nesting 1001 returns 0), even where
    the pattern would match; the pure twin reaches it without Python's recursion limit."""
    pattern = b"a*" * stars
    want = stars <= 1001  # the n-th "*" runs in the frame at nesting n-1; as the last byte it matches
    assert kernel(pattern, b"a" * 2000) is want
    assert kernel(pattern + b"b", b"a" * 2000) is False
    assert kernel(pattern, b"a" * (stars - 1)) is False  # too short for the a's


@pytest.mark.parametrize(
    ("pattern", "string", "want"),
    [
        (b"*a*a*a*a*a*a*a*a*a*a*b", b"a" * 200_000, False),  # exponential without skipLongerMatches
        (b"*a*a*a*a*a*a*a*a*a*a*a", b"a" * 200_000, True),
        (b"*?*?*?*?*?*?*?*?*?*?!", b"x" * 200_000, False),
        (b"*[a-z]*[a-z]*[a-z]*[a-z]*[a-z]*0", b"q" * 200_000, False),
        (b"*:p0:*", b":" * 500_000, False),  # every position starts a candidate
        (b"*:*:*:*:*:*:*:*:*p", b":" * 200_000, False),
        (b"*?:p0:*", b":" * 500_000, False),  # the same without the memmem shortcut
        (b"*:p0:*", b":p0" * 200_000, True),
        (b"a*" * 1000 + b"b", b"a" * 200_000, False),
        ((b"*" + b"a" * 50) * 20 + b"b", b"a" * 200_000, False),
    ],
)
def test_compiled_matcher_is_bounded_on_exponential_patterns(pattern: bytes, string: bytes, want: bool) -> None:
    """Each takes Redis 7.0.15 (and the compiled twin) well under a second; without skipLongerMatches
    the first would not finish in a lifetime. The pure twin agrees on a shorter string."""
    t = time.process_time()
    assert _speedups.stringmatchlen(pattern, string) is want
    assert _speedups.stringmatchlen(pattern, string, nocase=True) is want
    assert time.process_time() - t < 5.0
    short = string[:2000]
    assert _pure.stringmatchlen(pattern, short) is _speedups.stringmatchlen(pattern, short)


def test_compiled_matcher_releases_the_gil_on_large_inputs() -> None:
    """While one thread matches a 32 MB key against a pattern that recurses at every position, another thread
    keeps running Python: the GIL is not held in one piece (the event loop stays responsive while a
    costly check runs in the decide thread)."""
    key = b":" * (32 << 20)
    t = time.perf_counter()
    assert _speedups.stringmatchlen(b"*?:p0:*", key) is False
    alone = time.perf_counter() - t
    assert alone > 0.04  # long enough that a held GIL shows
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        for _ in range(3):
            _speedups.stringmatchlen(b"*?:p0:*", key)
        end = time.perf_counter()
    finally:
        stop.set()
        th.join()
    during = [b - a for a, b in zip(ticks, ticks[1:], strict=False) if start <= a and b <= end]
    assert len(during) > 10, f"the other thread ran {len(during)} times in {end - start:.2f} s"
    assert max(during) < alone / 2, f"the other thread waited {max(during) * 1000:.0f} ms (one call: {alone * 1000:.0f} ms)"


def test_arguments() -> None:
    for kernel in (_pure.stringmatchlen, _speedups.stringmatchlen):
        assert kernel(b"A*", b"abc", True) is True
        assert kernel(b"A*", b"abc") is False
    # the C kernel refuses what its stub forbids: these calls are wrong on purpose (hence the ignores)
    with pytest.raises(TypeError):
        _speedups.stringmatchlen("a*", b"a")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.stringmatchlen(b"a*", bytearray(b"a"))  # type: ignore[arg-type]  # mutable: never read without the GIL
    with pytest.raises(TypeError):
        _speedups.stringmatchlen(b"a*")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _speedups.stringmatchlen(b"a*", b"a", case=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _speedups.stringmatchlen(b"a*", b"a", True, nocase=True)  # type: ignore[misc]
