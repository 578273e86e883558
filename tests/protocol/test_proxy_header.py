"""The PROXY protocol parser (redisguard.protocol.proxy_header): v1, v2, incomplete input, bounds, fuzz."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.protocol import proxy_header as pp
from redisguard.protocol.proxy_header import MAX_HEADER, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, build_v2, parse


def v2(command: int, fam: int, body: bytes, declared: int | None = None) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, fam)) + struct.pack("!H", len(body) if declared is None else declared) + body


def v2_tcp4(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 6380, tlv: bytes = b"") -> bytes:
    return v2(1, 0x11, socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlv)


def v2_tcp6(src: str, sport: int, dst: str = "::1", dport: int = 6380) -> bytes:
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x21, body)


def test_v1_tcp4_tcp6_unknown() -> None:
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 6380\r\n"
    assert parse(line + b"*1\r\n$4\r\nPING\r\n") == ProxyHeader(1, len(line), ("203.0.113.7", 51234), ("10.0.0.1", 6380))
    h = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n")
    assert h is not None and h.source == ("2001:db8::7", 1) and h.destination == ("2001:db8::1", 65535)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15, None)
    h = parse(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\nrest")
    assert h is not None and h.source is None and h.length == 59


def test_v2_tcp4_tcp6_local_unspec_tlv() -> None:
    h = parse(v2_tcp4("198.51.100.9", 4242, tlv=b"\x04\x00\x02ab") + b"\x16\x03\x01")
    assert h is not None and h.source == ("198.51.100.9", 4242) and h.destination == ("10.0.0.1", 6380)
    assert h.length == 16 + 12 + 5
    h = parse(v2_tcp6("2001:db8::42", 7))
    assert h is not None and h.source == ("2001:db8::42", 7)
    local = parse(v2(0, 0x11, b"\x00" * 12))  # LOCAL: the addresses are ignored
    assert local is not None and local.local and local.source is None and local.length == 28
    assert parse(v2(1, 0x00, b"")) == ProxyHeader(2, 16, None)  # AF_UNSPEC
    assert parse(v2(1, 0x31, b"\x00" * 216)) == ProxyHeader(2, 232, None)  # AF_UNIX: keep the socket peer


@pytest.mark.parametrize("whole", [
    b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 6380\r\n", b"PROXY UNKNOWN\r\n",
])  # fmt: skip
def test_v1_incomplete_prefixes(whole: bytes) -> None:
    for i in range(len(whole)):
        assert parse(whole[:i]) is None, i
    assert parse(whole) is not None


def test_v2_incomplete_prefixes() -> None:
    whole = v2_tcp6("2001:db8::42", 7)
    for i in range(len(whole)):
        assert parse(whole[:i]) is None, i
    assert parse(whole) is not None


@pytest.mark.parametrize("data, reason", [
    (b"*1\r\n$4\r\nPING\r\n", "missing"),
    (b"\x16\x03\x01\x02\x00", "missing"),  # a TLS ClientHello with no header
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "malformed"),  # LF without CR
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed"),  # wrong family
    (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),
    (b"PROXY " + b"A" * 200, "too_long"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "too_long"),
    (v2(1, 0x11, b"\x00" * 4), "malformed"),  # shorter than its addresses
    (v2(1, 0x21, b"\x00" * 12), "malformed"),
    (v2(2, 0x11, b"\x00" * 12), "malformed"),  # unknown command
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "malformed"),  # version 1
    (v2(1, 0x12, b"\x00" * 12), "unsupported"),  # UDP
    (v2(1, 0x41, b""), "unsupported"),
    (v2(1, 0x11, b"", declared=pp.MAX_V2_LENGTH + 1), "too_long"),
    (v2(1, 0x11, b"", declared=0xFFFF), "too_long"),
])  # fmt: skip
def test_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as e:
        parse(data)
    assert e.value.reason == reason and reason in pp.REASONS


def test_build_v2_round_trips() -> None:
    h = parse(build_v2(("203.0.113.7", 5), ("10.0.0.1", 6380)))
    assert h is not None and h.source == ("203.0.113.7", 5) and h.destination == ("10.0.0.1", 6380)
    h = parse(build_v2(("::ffff:203.0.113.7", 5), ("10.0.0.1", 6380)))  # IPv4-mapped: sent as TCP4
    assert h is not None and h.source == ("203.0.113.7", 5)
    h = parse(build_v2(("2001:db8::1", 5), ("2001:db8::2", 6)))
    assert h is not None and h.source == ("2001:db8::1", 5)
    for local in (build_v2(None, None), build_v2(("1.2.3.4", 1), ("::1", 2))):
        h = parse(local)
        assert h is not None and h.local and h.length == 16


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MAX_HEADER + 64))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(data)


_prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE,
                             V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x20\x00", V2_SIGNATURE + b"\x21\x21\x00"])


@settings(max_examples=600, deadline=None)
@given(_prefixes, st.binary(max_size=300))
def test_fuzz_near_valid(prefix: bytes, tail: bytes) -> None:
    _check(prefix + tail)


def _check(data: bytes) -> None:
    """No crash but ProxyHeaderError; a header fits MAX_HEADER and the input; None only for a prefix
    that is entirely header so far (bounded), and every prefix of a valid header is None."""
    try:
        h = parse(data)
    except ProxyHeaderError as e:
        assert e.reason in pp.REASONS
        return
    if h is None:
        assert len(data) < MAX_HEADER and (len(data) < pp.V1_MAX or data.startswith(V2_SIGNATURE))
        return
    assert 0 < h.length <= min(len(data), MAX_HEADER)
    assert parse(data[: h.length]) == h
    assert parse(data[: h.length - 1]) is None
    if h.source is not None:
        assert 0 <= h.source[1] <= 65535


# -- config: proxy_protocol, proxy_sources, [upstream] proxy_protocol ------------------------------------------

_BASE = '[acl]\nusers_file = "users.acl"\n[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\n'


@pytest.mark.parametrize("snippet, message", [
    ("proxy_protocol = true\n", r"listener\[0\].proxy_sources: required with proxy_protocol = true"),
    ('proxy_protocol = true\nproxy_sources = []\n', r"listener\[0\].proxy_sources: required"),
    ('proxy_protocol = true\nproxy_sources = ["10.0.0.0/33"]\n', r"listener\[0\].proxy_sources: not a CIDR network: '10.0"),
    ('proxy_protocol = true\nproxy_sources = ["unix"]\n', r"listener\[0\].proxy_sources: not a CIDR network: 'unix'"),
    ('proxy_sources = ["10.0.0.0/8"]\n', r"listener\[0\].proxy_sources: only means something with proxy_protocol = true"),
    ('proxy_protocol = "yes"\n', r"listener\[0\].proxy_protocol: expected bool"),
    ('proxy_protocl = true\n', r"did you mean proxy_protocol"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path: Path, snippet: str, message: str) -> None:
    from redisguard.config.load import load_config
    from redisguard.config.model import ConfigError

    (tmp_path / "users.acl").write_text("user default off\n")
    (tmp_path / "rg.toml").write_text(_BASE + snippet)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "rg.toml")


def test_config_accepted_and_warned(tmp_path: Path) -> None:
    from redisguard.cli.preflight import proxy_protocol_warnings
    from redisguard.config.load import load_config

    (tmp_path / "users.acl").write_text("user default off\n")
    (tmp_path / "rg.toml").write_text(
        _BASE + 'proxy_protocol = true\nproxy_sources = ["10.0.0.0/24", "2001:db8::/48"]\n'
        f'[[listener]]\ntype = "unix"\npath = "{tmp_path}/s"\nproxy_protocol = true\nproxy_sources = ["unix"]\n'
        '[[listener]]\nname = "open"\ntype = "tcp"\naddress = "127.0.0.1:0"\n'
        'proxy_protocol = true\nproxy_sources = ["0.0.0.0/0"]\n'
        '[upstream]\nproxy_protocol = true\n'
    )  # fmt: skip
    cfg = load_config(tmp_path / "rg.toml")
    assert cfg.listeners[0].proxy_protocol
    assert [str(n) for n in cfg.listeners[0].proxy_sources] == ["10.0.0.0/24", "2001:db8::/48"]
    assert cfg.listeners[1].proxy_sources == ("unix",)
    assert cfg.upstream.proxy_protocol
    (warning,) = proxy_protocol_warnings(cfg)
    assert warning.startswith("listener 'open': proxy_sources includes 0.0.0.0/0: any client can send a PROXY header")
