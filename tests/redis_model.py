"""A reference model of Redis 7.0's request reader, written straight from networking.c for the tests.

It reads a whole byte stream at once, the slow and obvious way (``strchr`` as a byte loop that stops
at NUL), so it shares no code with redisguard's incremental parser except ``split_args`` (a port of
``sdssplitargs``, checked against a live Redis in test_smuggling.py). It returns the requests Redis
would run and the protocol error it would answer, if any. Like redisguard, a header or inline line
must end within PROTO_INLINE_MAX_SIZE bytes (Redis's own cut-off varies with how its reads fall).
"""

from __future__ import annotations

import re

from redisguard.protocol.request import split_args

INLINE_MAX = 64 * 1024
MAX_BULK = 512 * 1024 * 1024
INT_MAX = 2**31 - 1
_LL = re.compile(rb"-?[1-9][0-9]*|0")


def _string2ll(s: bytes) -> int | None:
    if len(s) > 20 or not _LL.fullmatch(s):
        return None
    v = int(s)
    return v if -(2**63) <= v < 2**63 else None


def _strchr(buf: bytes, start: int, ch: int) -> int:
    i = start
    while i < len(buf) and i - start <= INLINE_MAX:
        if buf[i] == ch:
            return i
        if buf[i] == 0:
            return -1
        i += 1
    return -1


def redis_parse(buf: bytes, authenticated: bool = True) -> tuple[list[list[bytes]], str | None]:
    out: list[list[bytes]] = []
    pos = 0
    while pos < len(buf):
        if buf[pos] != ord("*"):
            nl = _strchr(buf, pos, ord("\n"))
            if nl < 0:
                return out, "too big inline request" if len(buf) - pos > INLINE_MAX else None
            end = nl - 1 if nl != pos and buf[nl - 1] == ord("\r") else nl
            argv = split_args(buf[pos:end])
            if argv is None:
                return out, "unbalanced quotes in request"
            pos = nl + 1
            if argv:
                out.append(argv)
            continue
        nl = _strchr(buf, pos, ord("\r"))
        if nl < 0:
            return out, "too big mbulk count string" if len(buf) - pos > INLINE_MAX else None
        if nl - pos > len(buf) - pos - 2:
            return out, None
        ll = _string2ll(buf[pos + 1 : nl])
        if ll is None or ll > INT_MAX:
            return out, "invalid multibulk length"
        if ll > 10 and not authenticated:
            return out, "unauthenticated multibulk length"
        pos = nl + 2
        argv = []
        while ll > 0:
            nl = _strchr(buf, pos, ord("\r"))
            if nl < 0:
                return out, "too big bulk count string" if len(buf) - pos > INLINE_MAX else None
            if nl - pos > len(buf) - pos - 2:
                return out, None
            if buf[pos] != ord("$"):
                return out, "expected '$', got '%s'" % chr(buf[pos])
            bl = _string2ll(buf[pos + 1 : nl])
            if bl is None or bl < 0 or bl > MAX_BULK:
                return out, "invalid bulk length"
            if bl > 16384 and not authenticated:
                return out, "unauthenticated bulk length"
            pos = nl + 2
            if len(buf) - pos < bl + 2:
                return out, None
            argv.append(buf[pos : pos + bl])
            pos += bl + 2
            ll -= 1
        if argv:
            out.append(argv)
    return out, None
