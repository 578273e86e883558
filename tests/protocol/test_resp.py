"""Pure tests of request parsing and encoding (no sockets; reply scanning: tests/fast/test_replies.py)."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.protocol.request import RequestParser, split_args
from redisguard.protocol.resp import ProtocolError, encode_command
from tests.helpers import mutated
from tests.redis_model import redis_parse

argvs = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8)


def feed_all(parser: RequestParser, chunks: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for c in chunks:
        out += parser.feed(c)
    if parser.error is not None:
        raise parser.error
    return out


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(set(cuts))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if stream[a:b]]


@settings(max_examples=200, deadline=None)
@given(argvs, st.data())
def test_requests_survive_any_split(reqs: list[list[bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_command(r) for r in reqs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert feed_all(RequestParser(), split(stream, cuts)) == reqs


def test_every_byte_boundary() -> None:
    stream = encode_command([b"SET", b"k", b"v" * 100]) + b"PING\r\n" + encode_command([b"GET", b"k"])
    for i in range(1, len(stream)):
        assert feed_all(RequestParser(), [stream[:i], stream[i:]]) == [
            [b"SET", b"k", b"v" * 100],
            [b"PING"],
            [b"GET", b"k"],
        ]


def test_raw_only_for_whole_canonical_chunks() -> None:
    p = RequestParser()
    chunk = encode_command([b"PING"]) * 3
    assert p.feed(chunk) == [[b"PING"]] * 3 and p.raw is chunk
    assert p.feed(encode_command([b"PING"]) + b"*1\r\n$4\r\nPI") == [[b"PING"]] and p.raw is None
    assert p.feed(b"NG\r\n") == [[b"PING"]] and p.raw is None


# The smuggling class: byte streams hiredis (RESP3) reads as requests that Redis reads otherwise.
SMUGGLED = [
    b"*1\r\n$4\r\nPING\r\n~2\r\n$3\r\nGET\r\n$14\r\napp:\r\nFLUSHALL\r\n",
    b"|1\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"*2\r\n+GET\r\n$1\r\nk\r\n",
    b"*2\r\n$3\r\nGET\r\n:1\r\n",
    b"*1\r\n*1\r\n$4\r\nPING\r\n",
    b"%1\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b">2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"*2\r\n$3\r\nGETxx$1\r\nk\r\n",
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nFLUSHALL\r\n",
    b"*1\r\n$4\r\nPING\r\n*0\r\n*-1\r\n\r\nPING\r\n",
    b"*1\r\n%1\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n",  # a map whose key is a list
    b"*1\r\n$3\r\nGET\x00\r\n",
]


@pytest.mark.parametrize("stream", SMUGGLED)
def test_smuggling_class_is_read_as_redis_reads_it(stream: bytes) -> None:
    want_reqs, want_err = redis_parse(stream)
    for cut in range(0, len(stream) + 1):
        p = RequestParser()
        got = [r for c in split(stream, [cut]) for r in p.feed(c)]
        assert got == want_reqs and (str(p.error) if p.error else None) == want_err
        if p.raw is not None:  # bytes forwarded as sent must be exactly their canonical encoding
            assert p.raw == b"".join(encode_command(r) for r in got)


def test_huge_declared_counts_cost_nothing() -> None:
    p = RequestParser()
    assert p.feed(b"*2147483647\r\n") == [] and p.error is None
    p = RequestParser()
    assert p.feed(b"*1\r\n~2147483647\r\n") == [] and str(p.error) == "expected '$', got '~'"
    p = RequestParser()
    assert p.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$536870912\r\n") == [] and p.buffered == 0


def test_big_bulk_is_held_once() -> None:
    p = RequestParser()
    body = b"v" * 1_000_000
    stream = encode_command([b"SET", b"k", body])
    out = []
    for i in range(0, len(stream), 16384):
        out += p.feed(stream[i : i + 16384])
        assert len(p._buf) < 100  # only header lines ever sit in the buffer
    assert out == [[b"SET", b"k", body]]


def test_nul_hides_a_line_end_as_strchr_does() -> None:
    p = RequestParser()
    assert p.feed(b"PI\x00NG\r\nPING\r\n") == [] and p.error is None  # Redis waits, too
    p.feed(b"x" * 70000)
    assert str(p.error) == "too big inline request"


def test_requests_before_an_error_are_returned() -> None:
    p = RequestParser()
    assert p.feed(b"PING\r\n*1\r\n$4\r\nECHO\r\n*x\r\nPING\r\n") == [[b"PING"], [b"ECHO"]]
    assert str(p.error) == "invalid multibulk length"
    assert p.feed(b"PING\r\n") == []


def test_long_line_in_tiny_reads_is_linear() -> None:
    p = RequestParser()
    for _ in range(70000 // 7):
        p.feed(b"abcdefg")
        if p.error:
            break
    assert str(p.error) == "too big inline request"


def test_inline_and_quotes() -> None:
    assert split_args(b'set "a b" \'c d\' "\\x41\\n"') == [b"set", b"a b", b"c d", b"A\n"]
    assert split_args(b'"unbalanced') is None
    assert split_args(b'"a"b') is None
    assert feed_all(RequestParser(), [b"\r\n\r\nPING\r\n"]) == [[b"PING"]]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"*abc\r\n", "invalid multibulk length"),
        (b"*3000000000\r\n", "invalid multibulk length"),
        (b"*1\r\n:1\r\n", "expected '$', got ':'"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$600000000\r\n", "invalid bulk length"),
        (b'GET "x\r\n', "unbalanced quotes in request"),
        (b"x" * 70000, "too big inline request"),
        (b"*1\r\n$" + b"1" * 70000, "too big bulk count string"),
    ],
)
def test_protocol_errors(data: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=f"^{re.escape(error)}$"):
        feed_all(RequestParser(), [data])
    assert redis_parse(data)[1] == error


def test_unauthenticated_limits() -> None:
    p = RequestParser()
    p.authenticated = False
    p.feed(b"*11\r\n")
    assert str(p.error) == "unauthenticated multibulk length"
    p = RequestParser()
    p.authenticated = False
    reqs = p.feed(encode_command([b"AUTH", b"u", b"p"]) + encode_command([b"SET", b"k", b"v" * 20000]))
    assert reqs == [[b"AUTH", b"u", b"p"]]  # one at a time before auth
    p.authenticated = True
    assert p.feed(b"") == [[b"SET", b"k", b"v" * 20000]]


def test_pending_request_is_bounded() -> None:
    p = RequestParser(max_request_bytes=1000)
    with pytest.raises(ProtocolError):
        feed_all(p, [b"*1\r\n$5000\r\n", b"x" * 2000])
    p = RequestParser(max_request_bytes=100_000)  # many empty arguments count their bookkeeping
    with pytest.raises(ProtocolError):
        feed_all(p, [b"*100000\r\n" + b"$0\r\n\r\n" * 5000])


# -- fuzz: random RESP2/RESP3/inline/garbage streams, split anywhere, against the model -------------
TOKENS = [
    b"*1\r\n", b"*2\r\n", b"*3\r\n", b"*0\r\n", b"*-1\r\n", b"~2\r\n", b"%1\r\n", b"|1\r\n", b">2\r\n", b"*200\r\n",
    b"$3\r\nGET\r\n", b"$4\r\nPING\r\n", b"$1\r\nk\r\n", b"$0\r\n\r\n", b"$3\r\nab\r\n", b"$2\r\nabcd",
    b"+GET\r\n", b":1\r\n", b"_\r\n", b"#t\r\n", b",1.5\r\n", b"(12\r\n", b"=7\r\ntxt:abc\r\n", b"-ERR x\r\n",
    b"PING\r\n", b"GET k\n", b"\r\n", b"\n", b"SET 'a b' \"c\\x41\"\r\n", b'"open\r\n', b"x\x00y\r\n",
    b"\x00", b"\r", b"$", b"*", b"*1\r", b"$-1\r\n", b"$99999999999999999999\r\n", b"*+1\r\n", b"*01\r\n",
    b"\xff\x80", b"a b c\r\n",
]  # fmt: skip
streams = st.lists(st.sampled_from(TOKENS), max_size=14).map(b"".join)


# CI runs a bounded budget; a longer run: REDISGUARD_FUZZ_EXAMPLES=200000 pytest tests/protocol/test_resp.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("REDISGUARD_FUZZ_EXAMPLES", "1500"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.one_of(streams, mutated(streams)), st.lists(st.integers(0, 200), max_size=6), st.booleans())
def test_fuzz_parser_reads_as_redis_does(stream: bytes, cuts: list[int], authenticated: bool) -> None:
    want_reqs, want_err = redis_parse(stream, authenticated)
    p = RequestParser()
    got: list[list[bytes]] = []
    for chunk in split(stream, [c for c in cuts if c < len(stream)]):
        p.authenticated = authenticated
        reqs = p.feed(chunk)
        if p.raw is not None:  # forwarded as sent: to Redis these bytes mean exactly these requests
            assert p.raw is chunk and redis_parse(chunk) == (reqs, None)
        got += reqs
        while not authenticated and p.error is None and (more := p.feed(b"")):  # one at a time pre-auth
            got += more
    assert got == want_reqs
    assert (str(p.error) if p.error else None) == want_err


# -- the fast paths' helpers agree with the general ones ------------------------------------------
_args = st.lists(st.binary(max_size=600), min_size=1, max_size=70)


@settings(max_examples=300, deadline=None)
@given(st.lists(_args, min_size=1, max_size=4))
def test_encode_requests_is_what_redis_reads(requests: list[list[bytes]]) -> None:
    """The canonical encoding (the fast path compares client bytes with it) reads back, in Redis's own
    reader, as exactly these requests; and it is RESP's canonical form, header by header."""
    from redisguard.protocol.resp import encode_requests

    data = encode_requests(requests)
    assert redis_parse(data) == (requests, None)
    assert data == b"".join(b"*%d\r\n" % len(r) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in r)
                            for r in requests)  # fmt: skip
