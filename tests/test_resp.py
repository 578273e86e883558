"""Pure tests of request parsing and reply scanning (no sockets)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.resp import ProtocolError, ReplyScanner, RequestParser, encode_command, parse_request, split_args

argvs = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8)


def feed_all(parser: RequestParser, chunks: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    for c in chunks:
        reqs, _ = parser.feed(c)
        out += reqs
    return out


@settings(max_examples=200, deadline=None)
@given(argvs, st.data())
def test_requests_survive_any_split(reqs: list[list[bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_command(r) for r in reqs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert feed_all(RequestParser(), [c for c in chunks if c]) == reqs


def test_every_byte_boundary() -> None:
    stream = encode_command([b"SET", b"k", b"v" * 100]) + b"PING\r\n" + encode_command([b"GET", b"k"])
    for i in range(1, len(stream)):
        assert feed_all(RequestParser(), [stream[:i], stream[i:]]) == [
            [b"SET", b"k", b"v" * 100],
            [b"PING"],
            [b"GET", b"k"],
        ]


def test_clean_flag_only_for_whole_chunks() -> None:
    p = RequestParser()
    assert p.feed(encode_command([b"PING"]) * 3) == ([[b"PING"]] * 3, True)
    reqs, clean = p.feed(encode_command([b"PING"]) + b"*1\r\n$4\r\nPI")
    assert reqs == [[b"PING"]] and not clean
    assert p.feed(b"NG\r\n") == ([[b"PING"]], False)


def test_inline_and_quotes() -> None:
    assert split_args(b'set "a b" \'c d\' "\\x41\\n"') == [b"set", b"a b", b"c d", b"A\n"]
    assert split_args(b'"unbalanced') is None
    assert split_args(b'"a"b') is None
    assert parse_request(b"  \r\nPING\r\n", 0) == ([], 4)
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


def test_unauthenticated_limits() -> None:
    p = RequestParser()
    p.authenticated = False
    with pytest.raises(ProtocolError, match="unauthenticated multibulk length"):
        p.feed(b"*11\r\n")
    p = RequestParser()
    p.authenticated = False
    reqs, _ = p.feed(encode_command([b"AUTH", b"u", b"p"]) + encode_command([b"SET", b"k", b"v" * 20000]))
    assert reqs == [[b"AUTH", b"u", b"p"]]  # one at a time before auth
    p.authenticated = True
    assert p.feed(b"")[0] == [[b"SET", b"k", b"v" * 20000]]


def test_pending_request_is_bounded() -> None:
    p = RequestParser(max_request_bytes=1000)
    with pytest.raises(ProtocolError):
        feed_all(p, [b"*1\r\n$5000\r\n", b"x" * 2000])


REPLIES = [
    b"+OK\r\n", b"-ERR x\r\n", b":1\r\n", b"$3\r\nabc\r\n", b"$-1\r\n", b"*-1\r\n", b"*0\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:2\r\n", b"%1\r\n+k\r\n+v\r\n", b"~2\r\n,1.5\r\n(12345\r\n", b"_\r\n", b"#t\r\n",
    b"=7\r\ntxt:abc\r\n", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", b"|1\r\n+ttl\r\n:3\r\n", b"!3\r\nerr\r\n",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(REPLIES), min_size=1, max_size=20), st.data())
def test_reply_scanner_finds_every_frame_end(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    ends, pos = [], 0
    for f in frames:
        pos += len(f)
        ends.append(pos)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8)))) if len(stream) > 1 else []
    sc, carry, base, found = ReplyScanner(), b"", 0, []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buf = carry + stream[a:b]
        fr, consumed = sc.scan(buf)
        offset = base - len(carry)
        found += [offset + f.end for f in fr]
        carry = buf[consumed:]
        base = b
    assert found == ends
    assert sc.idle


def test_scanner_reports_kind_and_first_word() -> None:
    fr, _ = ReplyScanner().scan(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n>2\r\n+a\r\n+b\r\n")
    assert [(f.kind, f.first) for f in fr] == [(ord("*"), b"message"), (ord(">"), None)]


def test_scanner_streams_large_bulk_without_holding_it() -> None:
    sc = ReplyScanner()
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
