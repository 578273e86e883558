"""A one-off RESP client to the upstream as the service user: COMMAND INFO at start, PING for /readyz,
the start-up questions about the service user's own rights."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import hiredis

from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.policy.decide import Policy
from redisguard.protocol.proxy_header import build_v2
from redisguard.protocol.resp import encode_command
from redisguard.transport.tls import upstream_context

# Seconds Redis has to answer a request of ours about users (a start-up question, a batch of mirror changes).
TIMEOUT = 10.0


class UpstreamReplyError(ConnectionError):
    """Redis answered one of our commands with an error (``reply``: its text, e.g. ``WRONGPASS ...``)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


async def upstream_request(config: Config, commands: list[list[bytes]], timeout: float) -> list[Any]:
    """Open a connection to the upstream as the service user, run ``commands``, return the replies
    (UpstreamReplyError for the first error among them)."""
    replies = await upstream_replies(config, commands, timeout)
    for r in replies:
        if isinstance(r, hiredis.ReplyError):
            raise UpstreamReplyError(str(r))
    return replies


async def upstream_replies(config: Config, commands: list[list[bytes]], timeout: float, login: bool = True) -> list[Any]:
    """The replies to ``commands`` as hiredis reads them (errors as ``hiredis.ReplyError`` values), on
    a connection of their own: logged in as the service user (UpstreamReplyError if Redis refuses that
    AUTH), or with ``login=False`` as whoever connects without AUTH."""
    (replies,) = await _exchange(config, [commands], timeout, login)
    return replies


# What Redis runs at once inside a MULTI instead of queueing (processCommand): never a probe.
_RUN_IN_MULTI = frozenset({b"EXEC", b"DISCARD", b"MULTI", b"WATCH", b"QUIT", b"RESET"})


async def queued(config: Config, commands: list[list[bytes]], timeout: float) -> list[Any] | None:
    """What Redis answers when the service user queues ``commands`` in a MULTI that is then discarded:
    ``QUEUED`` for each one the service user may run, its refusal (``-NOPERM ...``) for the others. None
    the service user may not run MULTI and DISCARD. Nothing runs: the commands are sent only once Redis
    has accepted the MULTI, on the same connection."""
    if any(c[0].upper() in _RUN_IN_MULTI for c in commands):
        raise ValueError("queued: Redis runs this command at once inside a MULTI")
    replies = await _exchange(config, [[[b"MULTI"]], [*commands, [b"DISCARD"]]], timeout, True,
                              go_on=lambda r: r == [b"OK"])  # fmt: skip
    return replies[1][:-1] if len(replies) == 2 and replies[1][-1] == b"OK" else None


async def _exchange(config: Config, batches: list[list[list[bytes]]], timeout: float, login: bool,
                    go_on: Callable[[list[Any]], bool] = lambda _: True) -> list[list[Any]]:  # fmt: skip
    """Each batch's replies, on one connection; the next batch is sent only if ``go_on`` accepts them."""
    up = config.upstream
    ctx = upstream_context(up)
    if up.path:
        opening = asyncio.open_unix_connection(str(up.path))
    else:
        opening = asyncio.open_connection(
            up.host, up.port, ssl=ctx, server_hostname=(up.tls_server_name or up.host) if ctx else None
        )
    reader, writer = await asyncio.wait_for(opening, up.connect_timeout)
    try:
        auth = Policy.auth_command(up.username, up.password) if login else b""
        # [upstream] proxy_protocol: the proxy in front of Redis expects a header; ours are LOCAL connections
        first = (build_v2(None, None) if up.proxy_protocol else b"") + auth
        rd = hiredis.Reader()
        out: list[list[Any]] = []
        for i, commands in enumerate(batches):
            writer.write(first + b"".join(encode_command(c) for c in commands))
            want = len(commands) + (1 if i == 0 and auth else 0)
            first = b""
            replies: list[Any] = []
            while len(replies) < want:
                data = await asyncio.wait_for(reader.read(1 << 20), timeout)
                if not data:
                    raise ConnectionError("upstream closed the connection")
                rd.feed(data)
                while (r := rd.gets()) is not False:
                    replies.append(r)
            if i == 0 and auth:
                if isinstance(replies[0], hiredis.ReplyError):
                    raise UpstreamReplyError(str(replies[0]))
                replies = replies[1:]
            out.append(replies)
            if not go_on(replies):
                break
        return out
    finally:
        writer.close()


async def protected_settings(config: Config) -> dict[str, str]:
    """The upstream's enable-debug-command / enable-module-command ("no" where they cannot be read:
    a service user without CONFIG GET, or a Redis before 7.0)."""
    out = {"enable_debug_command": "no", "enable_module_command": "no"}
    for key in out:
        try:
            (reply,) = await upstream_request(config, [[b"CONFIG", b"GET", key.replace("_", "-").encode()]],
                                              config.upstream.connect_timeout)  # fmt: skip
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError):
            continue
        if isinstance(reply, list) and len(reply) == 2 and reply[1] in (b"yes", b"no", b"local"):
            out[key] = reply[1].decode()
    return out


async def fetch_command_table(config: Config) -> CommandTable:
    """COMMAND INFO, ACL CAT and the version from the upstream itself."""
    info, cats, server = await upstream_request(
        config, [[b"COMMAND", b"INFO"], [b"ACL", b"CAT"], [b"INFO", b"server"]], config.upstream.connect_timeout * 5
    )
    version = "unknown"
    for line in server.decode().splitlines():
        if line.startswith("redis_version:"):
            version = line.split(":", 1)[1]
    return CommandTable(info, [c.decode() for c in cats], version)
