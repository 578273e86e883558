"""A client's own upstream connection: opened at its first forwarded request, closed with it.

One upstream connection per client keeps every stateful Redis feature correct without emulation
(DESIGN.md). Bytes for Redis are held while the connection is being made; past ``HIGH_WATER`` the
client stops being read, so what a client can make us hold stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import TYPE_CHECKING

from .slicer import Slicer

if TYPE_CHECKING:
    from .connection import ClientProtocol
    from .context import ConnectionContext

# Stop reading from one side when the other side's write buffer passes this (per connection).
HIGH_WATER = 1024 * 1024


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "client", "paused_by", "slicer", "transport",
    )  # fmt: skip

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.paused_by: set[str] = set()
        self.slicer = Slicer(self._received, lambda: self.pause("slice"), lambda: self.resume("slice"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.slicer.feed(data)

    def _received(self, data: bytes) -> None:
        if self.client.link.protocol is not self:
            return
        self.client.session.upstream_data(data)
        self.client.upstream_received()

    def pause(self, why: str) -> None:
        if self.transport is not None and not self.paused_by:
            self.transport.pause_reading()
        self.paused_by.add(why)

    def resume(self, why: str) -> None:
        self.paused_by.discard(why)
        if self.transport is not None and not self.paused_by and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slicer.queue:  # relay what Redis sent before it closed, then mirror the close
            self.slicer.drained = self.client.upstream_lost
        else:
            self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()


class UpstreamLink:
    __slots__ = (
        "client", "ctx", "pending", "pending_bytes", "protocol", "task",
    )  # fmt: skip

    def __init__(self, client: ClientProtocol, ctx: ConnectionContext) -> None:
        self.client = client
        self.ctx = ctx
        self.protocol: UpstreamProtocol | None = None
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []  # for Redis, held while the connection is being made
        self.pending_bytes = 0

    def send(self, data: bytes) -> None:
        proto = self.protocol
        if proto is not None and proto.transport is not None:
            proto.transport.write(data)
            return
        if self.task is None:  # the first request to forward: only now does this client cost Redis a connection
            self.task = asyncio.ensure_future(self._connect())
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > HIGH_WATER:  # hold no more than that while Redis is connecting
            self.client.pause_reading("connect")

    async def _connect(self) -> None:
        ctx = self.ctx
        up = ctx.config.upstream
        loop = asyncio.get_running_loop()
        m = ctx.metrics
        start = time.perf_counter()
        try:
            if up.path:
                coro = loop.create_unix_connection(lambda: UpstreamProtocol(self.client), str(up.path))
            else:
                coro = loop.create_connection(
                    lambda: UpstreamProtocol(self.client), up.host, up.port, ssl=ctx.upstream_ssl,
                    server_hostname=(up.tls_server_name or up.host) if ctx.upstream_ssl else None,
                )  # fmt: skip
            _, proto = await asyncio.wait_for(coro, up.connect_timeout)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            m.upstream_connect_failures.inc()
            m.upstream_up.set(0)
            ctx.upstream_error(e)
            self.pending.clear()
            self.client.upstream_failed(f"redisguard: upstream Redis at {up.where} is unavailable")
            return
        m.upstream_connect_seconds.observe(time.perf_counter() - start)
        m.upstream_up.set(1)
        if self.client.closed:
            proto.transport.close()  # type: ignore[union-attr]
            return
        with contextlib.suppress(OSError):
            sock = proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.protocol = proto  # type: ignore[assignment]
        if up.proxy_protocol:  # for a proxy between us and Redis: the client's address, first
            proto.transport.write(self.client.proxy_header())  # type: ignore[union-attr]
        if self.pending:
            proto.transport.write(b"".join(self.pending))  # type: ignore[union-attr]
            self.pending = []
        if self.pending_bytes:
            self.pending_bytes = 0
            self.client.resume_reading("connect")

    def pause(self, why: str) -> None:
        if self.protocol is not None:
            self.protocol.pause(why)

    def resume(self, why: str) -> None:
        if self.protocol is not None:
            self.protocol.resume(why)

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None
