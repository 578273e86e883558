"""The reply-frame family's helpers (test_replies*.py): reply streams, valid and not, and each twin's
outcome on them, errors included, so that the two compare as values."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from redisguard.fast import FrameScanner, _pure, _speedups
from redisguard.protocol.resp import ProtocolError
from tests.helpers import mutated

Outcome = Any  # a call's result, or (exception type, message)


def outcome(fn: Callable[..., object], *args: object) -> Outcome:
    try:
        return fn(*args)
    except (ValueError, ProtocolError) as e:
        return type(e), str(e)


def chunks(stream: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``stream`` cut at ``cuts`` (indices into it; out of range or repeated ones ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def scan_stream(scanner: FrameScanner, pieces: Sequence[bytes]) -> list[Outcome]:
    """Feed ``pieces`` as the reply queue does (the held-back tail prepended to the next chunk): each
    call's outcome and ``idle`` after it, until the first error. Frame ends are made absolute."""
    out: list[Outcome] = []
    carry, base = b"", 0
    for piece in pieces:
        buf = carry + piece
        try:
            frames, consumed = scanner.scan(buf)
        except (ValueError, ProtocolError) as e:
            out.append((type(e), str(e), scanner.idle))
            return out
        offset = base - len(carry)
        out.append(([(offset + end, kind, first) for end, kind, first in frames], offset + consumed, scanner.idle))
        carry, base = buf[consumed:], base + len(piece)
    return out


def both_scan(pieces: Sequence[bytes]) -> list[Outcome]:
    """The twins' outcomes on ``pieces``, asserted equal."""
    want = scan_stream(_pure.ReplyScanner(), pieces)
    assert scan_stream(_speedups.ReplyScanner(), pieces) == want
    return want


def both_whole(buf: bytes, limit: int) -> Outcome:
    want = outcome(_pure.whole_frames, buf, limit)
    assert outcome(_speedups.whole_frames, buf, limit) == want, (buf, limit)
    return want


# -- valid replies, RESP2 and RESP3 --------------------------------------------------------------
def _bulk(kind: bytes, prefix: bytes = b"") -> st.SearchStrategy[bytes]:
    return st.binary(max_size=40).map(lambda b: kind + b"%d\r\n%s%s\r\n" % (len(prefix) + len(b), prefix, b))


_text = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
RESP2_SCALARS = st.one_of(
    _text.map(lambda t: b"+" + t + b"\r\n"), _text.map(lambda t: b"-ERR " + t + b"\r\n"),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: b":%d\r\n" % i), _bulk(b"$"),
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"$0\r\n\r\n", b"*0\r\n"]),
    st.sampled_from([b"message", b"pmessage", b"subscribe", b"unsubscribe", b"x" * 32, b"y" * 33]).map(
        lambda w: b"$%d\r\n%s\r\n" % (len(w), w)),
)  # fmt: skip
RESP3_SCALARS = st.one_of(
    RESP2_SCALARS, _bulk(b"=", b"txt:"), st.sampled_from([b"_\r\n", b"#t\r\n", b"#f\r\n", b",1.5\r\n", b",-inf\r\n"]),
    st.integers(-(10**30), 10**30).map(lambda i: b"(%d\r\n" % i),
)  # fmt: skip


def _aggregates(kinds: bytes) -> Callable[[st.SearchStrategy[bytes]], st.SearchStrategy[bytes]]:
    def extend(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
        def build(kind: int, items: list[bytes]) -> bytes:
            if kind in b"%|":  # pairs: a key (a simple string, as hiredis needs) and a value each
                return b"%c%d\r\n" % (kind, len(items)) + b"".join(b"+k%d\r\n%s" % kv for kv in enumerate(items))
            return b"%c%d\r\n" % (kind, len(items)) + b"".join(items)

        return st.builds(build, st.sampled_from(kinds), st.lists(inner, max_size=5))

    return extend


def replies(resp: int, max_leaves: int = 12) -> st.SearchStrategy[bytes]:
    """One reply (RESP3: an attribute may stand before it, a push frame instead of it)."""
    if resp == 2:
        return st.recursive(RESP2_SCALARS, _aggregates(b"*"), max_leaves=max_leaves)
    return st.recursive(RESP3_SCALARS, _aggregates(b"*~>%|"), max_leaves=max_leaves)


def reply_streams(resp: int) -> st.SearchStrategy[bytes]:
    return st.lists(replies(resp), max_size=8).map(b"".join)


# -- not valid: garbage, mutations, the limits ----------------------------------------------------
TOKENS = [
    b"*1\r\n", b"*2\r\n", b"*3\r\n", b"*0\r\n", b"*-1\r\n", b"~2\r\n", b"%1\r\n", b"|1\r\n", b">2\r\n", b"*200\r\n",
    b"$3\r\nGET\r\n", b"$7\r\nmessage\r\n", b"$1\r\nk\r\n", b"$0\r\n\r\n", b"$3\r\nab\r\n", b"$2\r\nabcd",
    b"+OK\r\n", b":1\r\n", b"_\r\n", b"#t\r\n", b",1.5\r\n", b"(12\r\n", b"=7\r\ntxt:abc\r\n", b"-ERR x\r\n",
    b"!3\r\nerr\r\n", b"\r\n", b"\n", b"\r", b"$", b"*", b"*1\r", b"$-1\r\n", b"$-7\r\n", b"*-9\r\n",
    b"$99999999999999999999\r\n", b"*99999999999999999999\r\n", b"$-99999999999999999999\r\n", b"$9223372036854775807\r\n",
    b"*9223372036854775808\r\n", b"%4611686018427387904\r\n", b"$2305843009213693952\r\n", b"$999999999999999999\r\n",
    b"*1000000000000000000\r\n", b"$-0\r\n", b"$+1\r\n", b"* 1\r\n", b"$1 \r\n", b"*1_0\r\n", b"$\t2\r\n", b"$\r\n",
    b"$-\r\n", b"*\r\n", b"$1x\r\n", b"$\x002\r\n", b"$1\r\r\n", b"*\xd9\xa3\r\n", b"$" + b"9" * 5000 + b"\r\n",
    b"*" + b"0" * 700 + b"1\r\n", b"\x00", b"\xff\x80", b"a b c\r\n", b"PING\r\n",
]  # fmt: skip
token_streams = st.lists(st.sampled_from(TOKENS), max_size=14).map(b"".join)


any_stream = st.one_of(reply_streams(2), reply_streams(3), token_streams, mutated(token_streams), mutated(reply_streams(3)),
                       st.binary(max_size=64))  # fmt: skip
