"""The kernel's reply-frame counting, each twin on its own: ``ReplyScanner`` finds every frame end
however the stream is cut, ``whole_frames`` counts only what it may, and both keep their contract at the
limits (huge and malformed lengths, deep nesting, empty buffers, headers split over chunks). That the
twins agree on everything, and with hiredis, is in test_replies_twins.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import redisguard.fast as fast
from redisguard.fast import REPLY_HEADER_MAX, FrameScanner, _pure, _speedups
from redisguard.protocol.resp import ProtocolError
from tests.fast.conftest import both_scan, both_whole, chunks
from tests.kernels import SCANNERS, WHOLE_FRAMES

MakeScanner = Callable[[], FrameScanner]
WholeFrames = Callable[[bytes, int], int]

REPLIES = [
    b"+OK\r\n", b"-ERR x\r\n", b":1\r\n", b"$3\r\nabc\r\n", b"$-1\r\n", b"*-1\r\n", b"*0\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:2\r\n", b"%1\r\n+k\r\n+v\r\n", b"~2\r\n,1.5\r\n(12345\r\n", b"_\r\n", b"#t\r\n",
    b"=7\r\ntxt:abc\r\n", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", b"|1\r\n+ttl\r\n:3\r\n", b"!3\r\nerr\r\n",
]  # fmt: skip


def test_the_package_uses_one_twin_for_everything() -> None:
    twin = _speedups if fast.COMPILED else _pure
    assert (fast.whole_frames, fast.ReplyScanner, fast.stringmatchlen) == (
        twin.whole_frames, twin.ReplyScanner, twin.stringmatchlen)  # fmt: skip
    assert _speedups.REPLY_HEADER_MAX == REPLY_HEADER_MAX == 64 * 1024 * 16


@pytest.mark.parametrize("make_scanner", SCANNERS)
@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.sampled_from(REPLIES), min_size=1, max_size=20), data=st.data())
def test_reply_scanner_finds_every_frame_end(make_scanner: MakeScanner, frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    ends, pos = [], 0
    for f in frames:
        pos += len(f)
        ends.append(pos)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=8))
    sc, carry, base, found = make_scanner(), b"", 0, []
    for piece in chunks(stream, cuts):
        buf = carry + piece
        fr, consumed = sc.scan(buf)
        offset = base - len(carry)
        found += [offset + end for end, _, _ in fr]
        carry = buf[consumed:]
        base += len(piece)
    assert found == ends
    assert sc.idle


@pytest.mark.parametrize("make_scanner", SCANNERS)
def test_scanner_reports_kind_and_first_word(make_scanner: MakeScanner) -> None:
    fr, _ = make_scanner().scan(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n>2\r\n+a\r\n+b\r\n")
    assert [(kind, first) for _, kind, first in fr] == [(ord("*"), b"message"), (ord(">"), None)]
    long_word = b"*1\r\n$33\r\n" + b"x" * 33 + b"\r\n"  # longer than any pub/sub kind: not kept
    assert make_scanner().scan(long_word + b"*1\r\n$32\r\n" + b"x" * 32 + b"\r\n")[0] == [
        (len(long_word), ord("*"), None), (2 * len(long_word) - 1, ord("*"), b"x" * 32)]  # fmt: skip


@pytest.mark.parametrize("make_scanner", SCANNERS)
def test_scanner_streams_large_bulk_without_holding_it(make_scanner: MakeScanner) -> None:
    sc = make_scanner()
    fr, consumed = sc.scan(b"$10000000\r\n" + b"x" * 65536)
    assert fr == [] and consumed == 11 + 65536  # everything may be relayed at once
    total = 11 + 65536
    while total < 11 + 10_000_002:
        chunk = b"x" * min(65536, 11 + 10_000_000 - total) or b"\r\n"
        if total + len(chunk) == 11 + 10_000_000:
            chunk += b"\r\n"
        fr, consumed = sc.scan(chunk)
        assert consumed == len(chunk)
        total += len(chunk)
    assert len(fr) == 1 and sc.idle


@pytest.mark.parametrize("make_scanner", SCANNERS)
def test_scanner_errors(make_scanner: MakeScanner) -> None:
    with pytest.raises(ProtocolError, match=r"^unexpected reply type byte 'x'$"):
        make_scanner().scan(b"+OK\r\nxyz\r\n")
    with pytest.raises(ProtocolError, match=r"^unexpected reply type byte '\\x00'$"):
        make_scanner().scan(b"\x00\r\n")
    sc = make_scanner()
    assert sc.scan(b"+" + b"a" * (REPLY_HEADER_MAX - 1)) == ([], 0)  # a header line may be that long ...
    with pytest.raises(ProtocolError, match="reply header line too long"):
        sc.scan(b"+" + b"a" * REPLY_HEADER_MAX)  # ... and no longer
    for bad in (b"$\r\n", b"*x\r\n", b"$" + b"9" * 5000 + b"\r\n", b"*1\r\n=1 1\r\n"):
        with pytest.raises(ValueError):  # int()'s reading of the length, in both twins
            make_scanner().scan(bad)
    for odd in (b"$ 1\r\nx\r\n", b"$+1\r\nx\r\n", b"*1_0\r\n" + b":1\r\n" * 10, b"$1\t\r\nx\r\n"):
        assert make_scanner().scan(odd) == ([(len(odd), odd[0], None)], len(odd))  # what int() reads
    with pytest.raises(TypeError):
        make_scanner().scan("+OK\r\n")  # type: ignore[arg-type]


@pytest.mark.parametrize("make_scanner", SCANNERS)
def test_scanner_limits(make_scanner: MakeScanner) -> None:
    sc = make_scanner()
    assert sc.scan(b"") == ([], 0) and sc.idle
    deep = b"*1\r\n" * 100_000
    assert sc.scan(deep) == ([], len(deep)) and not sc.idle
    assert sc.scan(b"+x\r\n") == ([(4, ord("*"), None)], 4) and sc.idle
    for huge in (b"$99999999999999999999\r\n", b"*99999999999999999999\r\n", b"%9223372036854775807\r\n",
                 b"$2305843009213693950\r\n"):  # fmt: skip
        sc = make_scanner()
        assert sc.scan(huge + b":1\r\n" * 1000) == ([], len(huge) + 4000) and not sc.idle  # pending, forever
    for null in (b"$-1\r\n", b"$-99999999999999999999\r\n", b"*-5\r\n", b"*0\r\n", b"%-3\r\n"):
        fr, used = make_scanner().scan(null + b"+OK\r\n")
        assert [end for end, _, _ in fr] == [len(null), len(null) + 5]  # any negative length is a null
    sc, got = make_scanner(), []  # a header (and everything else) one byte at a time
    stream, carry = b"*2\r\n$11\r\nhello world\r\n%1\r\n+k\r\n:12345\r\n", b""
    for i in range(len(stream)):
        buf = carry + stream[i : i + 1]
        fr, used = sc.scan(buf)
        got += [i + 1 - len(buf) + end for end, _, _ in fr]
        carry = buf[used:]
    assert got == [len(stream)] and sc.idle


@pytest.mark.parametrize("make_scanner", SCANNERS)
def test_scanner_takes_no_arguments(make_scanner: Callable[..., FrameScanner]) -> None:
    with pytest.raises(TypeError):
        make_scanner(1)


@pytest.mark.parametrize("whole_frames", WHOLE_FRAMES)
def test_whole_frames_examples(whole_frames: WholeFrames) -> None:
    assert whole_frames(b"", 5) == 0
    assert whole_frames(b"+OK\r\n:1\r\n$3\r\nabc\r\n*2\r\n$1\r\na\r\n$-1\r\n", 4) == 4
    assert whole_frames(b"+OK\r\n:1\r\n", 1) == -1  # more than owed
    assert whole_frames(b"+OK\r\n:1\r\n", -1) == 2 and whole_frames(b"+OK\r\n", 10**30) == 1
    assert whole_frames(b"*2\r\n*1\r\n:1\r\n:2\r\n", 5) == -1  # nested: not read here
    assert whole_frames(b"%1\r\n+a\r\n+b\r\n", 5) == -1  # RESP3: not read here
    assert whole_frames(b"$3\r\nab", 5) == -1 and whole_frames(b"+OK\r", 5) == -1  # partial
    assert whole_frames(b"$-7\r\n*-2\r\n*0\r\n", 5) == 3  # any negative length is a null
    assert whole_frames(b"$99999999999999999999\r\nabc\r\n", 5) == -1
    assert whole_frames(b"*99999999999999999999\r\n" + b":1\r\n" * 100, 5) == -1
    assert whole_frames(b"$ 3\r\nabc\r\n", 5) == 1  # int()'s reading
    for bad in (b"$\r\n", b"$x\r\n", b"*1\r\n$1x\r\n", b"$" + b"1" * 4301 + b"\r\n"):
        with pytest.raises(ValueError):
            whole_frames(bad, 5)
    with pytest.raises(ValueError):
        whole_frames(b"*99999999999999999999\r\n$x\r\n", 5)  # the elements of a huge array are still read


_element = st.one_of(
    st.binary(max_size=40).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.just(b"$-1\r\n"), st.just(b"+OK\r\n"), st.just(b":42\r\n"), st.just(b"-ERR x\r\n"),
)  # fmt: skip
_simple_reply = st.one_of(_element, st.just(b"*-1\r\n"))
_reply = st.one_of(  # (bytes, nested deeper than whole_frames reads)
    _simple_reply.map(lambda r: (r, False)),
    st.lists(_element, max_size=5).map(lambda xs: (b"*%d\r\n" % len(xs) + b"".join(xs), False)),
    st.lists(st.lists(_element, max_size=2), min_size=1, max_size=3).map(
        lambda xss: (b"*%d\r\n" % len(xss) + b"".join(b"*%d\r\n" % len(xs) + b"".join(xs) for xs in xss), True)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_reply, max_size=8), st.integers(0, 400), st.integers(0, 9))
def test_whole_frames_agrees_with_the_scanner(replies: list[tuple[bytes, bool]], cut: int, limit: int) -> None:
    """whole_frames says n only when the scanner finds exactly n frames ending at the chunk's end; it
    declines only nesting, a partial reply or more than ``limit`` replies (the twins agree throughout)."""
    full = b"".join(r for r, _ in replies)
    buf = full[:cut]
    n = both_whole(buf, limit)
    [(frames, consumed, idle)] = both_scan([buf])
    whole = consumed == len(buf) and idle
    if n >= 0:
        assert whole and n == len(frames) <= limit
    elif whole and len(frames) <= limit:
        assert any(nested for _, nested in replies), (buf, frames)
