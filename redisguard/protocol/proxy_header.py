"""PROXY protocol v1 (text) and v2 (binary) headers: parse what a load balancer sends, build v2.

Pure: bytes in, a :class:`ProxyHeader` (or ``None``: not complete yet) out; no I/O.

Rules (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt):

- The header is the first bytes of the connection, before anything of the client's own (its TLS
  ClientHello, its first RESP request). Whatever follows it belongs to the client.
- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``, at most
  107 bytes with the CRLF. v2: a 12-byte signature, version/command, family/transport, a 2-byte length,
  then that many bytes (addresses, then TLVs, which are skipped). We refuse a declared length above
  :data:`MAX_V2_LENGTH`, so a header never makes us hold more than :data:`MAX_HEADER` bytes.
- ``LOCAL`` (v2 command 0: the balancer's own health check), ``UNKNOWN`` (v1) and AF_UNSPEC / AF_UNIX
  (v2) carry no client address: ``source`` is ``None`` and the connection keeps its socket peer.
- :func:`parse` returns ``None`` only while every byte it was given is still inside the header (so a
  reader may consume them all), and raises :class:`ProxyHeaderError` (with a bounded ``reason``
  label) as soon as the bytes cannot be a valid header. Its work is bounded by :data:`MAX_HEADER`,
  whatever the length of ``data``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's limit)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_V2_LENGTH = 512  # addresses (at most 216 bytes, AF_UNIX) plus room for a balancer's TLVs
MAX_HEADER = V2_FIXED + MAX_V2_LENGTH

# Failure reasons (metric labels): a bounded set.
REASONS = ("missing", "malformed", "too_long", "unsupported", "timeout", "closed")

_V1_LINE = re.compile(rb"PROXY (TCP4|TCP6) ([0-9a-fA-F.:]{2,45}) ([0-9a-fA-F.:]{2,45}) ([0-9]{1,5}) ([0-9]{1,5})")
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # one of REASONS


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes the header took: the client's own bytes start at data[length:]
    source: Address | None  # the client's (address, port); None: keep the socket's peer (LOCAL, UNKNOWN, ...)
    destination: Address | None = None
    local: bool = False  # v2 LOCAL: the balancer's own connection (a health check)


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` if it may still be one but is not complete.

    Raises :class:`ProxyHeaderError` when ``data`` does not start with a valid header."""
    head = bytes(data[:MAX_HEADER])
    if not head:
        return None
    if V1_PREFIX.startswith(head[:6]):  # "PROXY " or the start of it
        return _parse_v1(head)
    if V2_SIGNATURE.startswith(head[:12]):
        return _parse_v2(head)
    raise ProxyHeaderError("missing", "the connection does not start with a PROXY protocol header")


def _parse_v1(head: bytes) -> ProxyHeader | None:
    end = head.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyHeaderError("too_long", f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in head or b"\r" in head[:-1]:
            raise ProxyHeaderError("malformed", "PROXY v1 line with a stray CR or LF")
        return None  # everything so far is inside the line
    line = head[:end]
    length = end + 2
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, length, None)
    m = _V1_LINE.fullmatch(line)
    if m is None:
        raise ProxyHeaderError("malformed", "PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    family, src, dst, sport, dport = m.groups()
    version = 4 if family == b"TCP4" else 6
    return ProxyHeader(1, length, (_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport)))


def _ip(text: bytes, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError("malformed", f"not an IPv{version} address in a PROXY v1 line") from None
    if addr.version != version:
        raise ProxyHeaderError("malformed", f"not an IPv{version} address in a PROXY v1 line")
    return str(addr)


def _port(text: bytes) -> int:
    port = int(text)
    if port > 65535 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyHeaderError("malformed", "bad port in a PROXY v1 line")
    return port


def _parse_v2(head: bytes) -> ProxyHeader | None:
    if len(head) < V2_FIXED:
        return None
    ver_cmd, fam, length = head[12], head[13], struct.unpack_from("!H", head, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("malformed", f"PROXY v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError("malformed", f"PROXY v2 header with unknown command {command}")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError("too_long", f"PROXY v2 header declares {length} bytes (at most {MAX_V2_LENGTH})")
    total = V2_FIXED + length
    if len(head) < total:
        return None
    if command == _CMD_LOCAL:  # the balancer's own connection: the address block (if any) is ignored
        return ProxyHeader(2, total, None, local=True)
    family, transport = fam >> 4, fam & 0xF
    body = head[V2_FIXED:total]
    if family in (_AF_UNSPEC, _AF_UNIX):  # no IP address to take: keep the socket's peer
        return ProxyHeader(2, total, None)
    if family not in (_AF_INET, _AF_INET6) or transport != _STREAM:
        raise ProxyHeaderError("unsupported", f"PROXY v2 family/transport 0x{fam:02x} (only TCP over IPv4/IPv6)")
    if family == _AF_INET:
        if length < 12:
            raise ProxyHeaderError("malformed", "PROXY v2 TCP4 header shorter than its addresses")
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[0:4])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack_from("!HH", body, 8)
    else:
        if length < 36:
            raise ProxyHeaderError("malformed", "PROXY v2 TCP6 header shorter than its addresses")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack_from("!HH", body, 32)
    return ProxyHeader(2, total, (str(src), sport), (str(dst), dport))


def build_v2(source: Address | None, destination: Address | None) -> bytes:
    """A PROXY v2 header: PROXY TCP4/TCP6 when both addresses are IP addresses of one family,
    else LOCAL (what redisguard sends for its own connections and for unix-socket clients)."""
    if source is not None and destination is not None:
        src: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        try:
            src, dst = ipaddress.ip_address(source[0].split("%")[0]), ipaddress.ip_address(destination[0].split("%")[0])
        except ValueError:
            src = dst = None
        if src is not None and isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped:
            src = src.ipv4_mapped
        if dst is not None and isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped:
            dst = dst.ipv4_mapped
        if src is not None and dst is not None and src.version == dst.version:
            fam = (_AF_INET if src.version == 4 else _AF_INET6) << 4 | _STREAM
            body = src.packed + dst.packed + struct.pack("!HH", source[1] & 0xFFFF, destination[1] & 0xFFFF)
            return V2_SIGNATURE + bytes((0x20 | _CMD_PROXY, fam)) + struct.pack("!H", len(body)) + body
    return V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, 0)) + struct.pack("!H", 0)
