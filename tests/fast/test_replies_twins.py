"""The compiled reply-frame counting and its pure twin give the same outcome — frames, consumed bytes,
``idle``, and the same error with the same message — on every stream, however it is cut: valid RESP2
and RESP3, garbage, mutations, and the limits; and the frame ends are where hiredis (another reader of
RESP, in C) finds them. The examples of each twin's contract are in test_replies.py."""

from __future__ import annotations

import os
import random

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.fast import _pure, _speedups
from redisguard.protocol.resp import ProtocolError
from tests.fast.conftest import TOKENS, any_stream, both_scan, both_whole, chunks, replies, reply_streams

cut_lists = st.lists(st.integers(0, 300), max_size=8)
limits = st.one_of(st.integers(-2, 12), st.sampled_from([2**63, -(2**63) - 1, 10**30]))


@settings(max_examples=1500, deadline=None)
@given(any_stream, cut_lists, limits)
def test_twins_agree(stream: bytes, cuts: list[int], limit: int) -> None:
    both_scan(chunks(stream, cuts))
    both_whole(stream, limit)
    for piece in chunks(stream, cuts):
        both_whole(piece, limit)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 3]).flatmap(reply_streams), st.data())
def test_twins_agree_one_byte_at_a_time(stream: bytes, data: st.DataObject) -> None:
    """Every header split at every byte (the carry grows byte by byte)."""
    [*_, last] = both_scan([stream[i : i + 1] for i in range(len(stream))]) or [([], 0, True)]
    assert last[-1] is True  # valid replies: idle at the end


@pytest.mark.parametrize("depth", [1, 7, 1000, 100_000])
def test_twins_agree_at_the_limits(depth: int) -> None:
    deep = b"*1\r\n" * depth + b"%1\r\n" * depth + b"+k\r\n:1\r\n" * depth
    assert both_scan([deep])[-1][1] == len(deep)
    assert both_scan(chunks(deep, range(1, len(deep), 997)))[-1][1:] == (len(deep), True)
    header = b"+" + b"a" * (_pure.REPLY_HEADER_MAX - 1)
    assert both_scan([header, b""]) == [([], 0, True), ([], 0, True)]
    assert both_scan([header + b"a"])[0][:2] == (ProtocolError, "reply header line too long")
    for n in (0, 1, 2**31, 2**61 - 3, 2**61, 2**63 - 1, 2**63, 2**64, 10**40, -(2**63), -(10**40)):
        for kind in b"$*%|~>=!":
            stream = b"%c%d\r\n" % (kind, n) + b"$1\r\nx\r\n" * 3
            both_scan([stream])
            both_scan(chunks(stream, range(len(stream))))
            both_whole(stream, 5)
    assert both_scan([b""]) == [([], 0, True)] and both_whole(b"", 0) == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 3]).flatmap(lambda resp: st.lists(replies(resp, 6), max_size=6)), cut_lists)
def test_frame_ends_agree_with_hiredis(frames: list[bytes], cuts: list[int]) -> None:
    """hiredis returns one reply per frame (an attribute as its own, as the scanner reports it), complete
    at the byte where the scanner says the frame ends."""
    stream = b"".join(frames)
    nothing = object()
    reader = hiredis.Reader(notEnoughData=nothing)
    want = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while reader.gets() is not nothing:
            want.append(i + 1)
    got = [end for step in both_scan(chunks(stream, cuts)) for end, _, _ in step[0]]
    assert got == want


FUZZ_RUNS = int(os.environ.get("REDISGUARD_FUZZ_EXAMPLES", "20000"))  # more: REDISGUARD_FUZZ_EXAMPLES=500000


def test_fuzz_compiled_against_pure() -> None:
    """Random streams, from tokens and from raw bytes, cut at random points: the compiled kernel never
    crashes and always agrees with the pure one (a crash ends the test process: it shows as a failure)."""
    rng = random.Random(24)
    alphabet = b"$*%|~>=!+-:,_#(\r\n0123456789-x \x00\xff"
    for _ in range(FUZZ_RUNS):
        if rng.random() < 0.5:
            tokens = bytearray(b"".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 20))))
            for _ in range(rng.randint(0, 3) if tokens else 0):
                tokens[rng.randrange(len(tokens))] = rng.randrange(256)
            stream = bytes(tokens)
        else:
            stream = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(0, 6))]
        both_scan(chunks(stream, cuts))
        both_whole(stream, rng.choice([0, 1, 3, 100, -1]))
    assert _speedups.ReplyScanner().idle
