"""RESP framing, sans-IO: encoders and Redis's limits (requests: :mod:`.request`; the ends of reply frames
are counted by the kernel, :mod:`redisguard.fast`, for the reply queue)."""

from __future__ import annotations

from collections.abc import Sequence

# Redis's limits (server.h / config.c defaults).
PROTO_INLINE_MAX_SIZE = 64 * 1024
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
INT_MAX = 2**31 - 1
# Before authentication Redis accepts only tiny requests (CVE-2021-32675 hardening).
UNAUTH_MAX_MULTIBULK = 10
UNAUTH_MAX_BULK = 16384


def cstr(arg: bytes, limit: int | None = None) -> bytes:
    """What printf's ``%s`` (``%.*s`` with ``limit``) prints of an argument: bytes up to the first NUL."""
    nul = arg.find(b"\0", 0, limit)
    return arg[: nul if nul >= 0 else limit]


def error_format(msg: bytes) -> bytes:
    """The error line of Redis's addReplyErrorFormat: CR/LF at the ends trimmed, inside turned into
    spaces (a client's bytes in an error can never end the line early), ``-ERR`` prefixed unless the
    text names its own code. Format client arguments with :func:`cstr` first, as ``%s`` would."""
    msg = msg.strip(b"\r\n").replace(b"\r", b" ").replace(b"\n", b" ")
    return (msg if msg.startswith(b"-") else b"-ERR " + msg) + b"\r\n"


class ProtocolError(Exception):
    """A request Redis would reject with ``-ERR Protocol error: <msg>`` and then close.

    The message is text, or bytes when it quotes the client's bytes (sent raw, as Redis's ``%c``)."""

    def reply(self) -> bytes:
        msg = self.args[0] if self.args else ""
        return error_format(b"Protocol error: " + (msg if isinstance(msg, bytes) else str(msg).encode()))

    def __str__(self) -> str:
        msg = self.args[0] if self.args else ""
        return msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)


def encode_bulk(s: bytes | str) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s  # names from bytes round-trip
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_command(argv: Sequence[bytes]) -> bytes:
    return encode_requests((argv,))


_ARRAY_HEADERS = tuple(b"*%d\r\n" % i for i in range(64))
_BULK_HEADERS = tuple(b"$%d\r\n" % i for i in range(512))


def encode_requests(requests: Sequence[Sequence[bytes]]) -> bytes:
    """``encode_command`` of each request, joined (the canonical bytes of a pipeline), in one pass."""
    out: list[bytes] = []
    add = out.append
    for argv in requests:
        n = len(argv)
        add(_ARRAY_HEADERS[n] if n < 64 else b"*%d\r\n" % n)
        for arg in argv:
            n = len(arg)
            add(_BULK_HEADERS[n] if n < 512 else b"$%d\r\n" % n)
            add(arg)
            add(b"\r\n")
    return b"".join(out)


def encode_command_pieces(argv: Sequence[bytes], step: int = 1024) -> list[bytes]:
    """``encode_command`` in pieces of ``step`` arguments, for huge requests encoded in a worker
    thread: each join is short, so the thread never holds the GIL long enough to stall the loop."""
    pieces = [b"*%d\r\n" % len(argv)]
    for i in range(0, len(argv), step):
        pieces.append(b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in argv[i : i + step]]))
    return pieces


OK = b"+OK\r\n"
