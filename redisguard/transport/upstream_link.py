"""A client's own upstream connection: opened at its first forwarded request, closed with it.

One upstream connection per client keeps every stateful Redis feature correct without emulation
(DESIGN.md). Bytes for Redis are held while the connection is being made; past ``HIGH_WATER`` the
client stops being read, so what a client can make us hold stays bounded.

In mirror mode the link logs in itself: the session's first AUTH (as its user's mirror) goes alone,
and the client's bytes follow only once Redis said +OK, so nothing ever runs on Redis under another
identity (after a refused AUTH Redis would run them as its ``default`` user). If Redis refuses it,
the mirror may be gone (a restart, ACL LOAD, a failover): the link has the mirrors verified and
pushed again (one check shared by every client refused meanwhile, bounded by ``RESYNC_WAIT``), then
connects once more; only if that is refused too is the client told and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Protocol, cast

from redisguard.session.machine import Session
from redisguard.transport.context import ConnectionContext, redis_addr
from redisguard.transport.slicer import Slicer

# Stop reading from one side when the other side's write buffer passes this (per connection).
HIGH_WATER = 1024 * 1024
# How long a client whose mirror AUTH was refused waits for the mirrors to be verified (seconds).
RESYNC_WAIT = 10.0
# The longest AUTH reply line accepted while logging in (Redis's are under 100 bytes).
LOGIN_REPLY_MAX = 4096
# A service AUTH that Redis closed before answering (it was shutting down) is tried again after this
# delay (seconds), doubling up to RETRY_DELAY_MAX, within [upstream] connect_timeout.
RETRY_DELAY = 0.05
RETRY_DELAY_MAX = 0.5
AUTH_FAILED = "redisguard: upstream authentication failed; Redis refused this user's mirror user"


class LinkOwner(Protocol):
    """The client connection an upstream link serves (connection.py's ClientProtocol)."""

    @property
    def session(self) -> Session: ...
    @property
    def closed(self) -> bool: ...
    @property
    def link(self) -> UpstreamLink: ...
    def upstream_received(self) -> None: ...
    def upstream_failed(self, message: str) -> None: ...
    def upstream_lost(self) -> None: ...
    def pause_reading(self, why: str = ...) -> None: ...
    def resume_reading(self, why: str = ...) -> None: ...
    def proxy_header(self) -> bytes: ...


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "abandoned", "client", "login", "login_reply", "paused_by", "slicer", "transport",
    )  # fmt: skip

    def __init__(self, client: LinkOwner) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.paused_by: set[str] = set()
        self.slicer = Slicer(self._received, lambda: self.pause("slice"), lambda: self.resume("slice"))
        self.login: asyncio.Future[bytes] | None = None  # the link's own AUTH, waiting for its reply line
        self.login_reply = b""
        self.abandoned = False  # a login attempt the link gave up: its close is not the client's business

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream protocol's transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.login is not None:
            self._login_received(data)
            return
        self.slicer.feed(data)

    def _login_received(self, data: bytes) -> None:
        """The reply to the link's AUTH: one line (nothing else was sent, so nothing else comes)."""
        assert self.login is not None
        buf = self.login_reply + data
        end = buf.find(b"\r\n")
        if end < 0 and len(buf) <= LOGIN_REPLY_MAX:
            self.login_reply = buf
            return
        fut, self.login, self.login_reply = self.login, None, b""
        if not fut.done():
            if end < 0:
                fut.set_exception(ConnectionError("unexpected reply to AUTH from upstream"))
            else:
                fut.set_result(buf[:end])

    def abandon(self) -> None:
        self.abandoned = True
        if self.transport is not None:
            self.transport.close()

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
        if self.login is not None:  # closed while logging in: the link tells the client
            if not self.login.done():
                self.login.set_exception(ConnectionError("upstream closed the connection"))
            self.login = None
            return
        if self.abandoned:
            return
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

    def __init__(self, client: LinkOwner, ctx: ConnectionContext) -> None:
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
        m = ctx.metrics
        proto: UpstreamProtocol | None = None
        refused = b""
        auth_reply = b""
        try:
            proto = await self._open()
            login = self.client.session.upstream_login  # mirror mode: the first AUTH, ours to send and check
            service_auth = self._service_auth()
            if service_auth and not self.client.closed:
                proto, auth_reply = await self._service_login(proto, service_auth)
            elif login and not self.client.closed:
                refused = await self._login(proto, login)
                if refused and await self._resynced():  # Redis may have lost the mirror: it is back now
                    proto.abandon()
                    proto = await self._open()
                    refused = await self._login(proto, login)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            if proto is not None:
                proto.abandon()
            m.upstream_connect_failures.inc()
            m.upstream_up.set(0)
            ctx.upstream_error(e)
            self.pending.clear()
            self.client.upstream_failed("redisguard: upstream Redis is unavailable")  # (where: in the proxy's log)
            return
        except BaseException:  # cancelled (the client went): no connection left behind
            if proto is not None:
                proto.abandon()
            raise
        if self.client.closed or refused:
            proto.abandon()
            if refused and not self.client.closed:
                self.pending.clear()
                self.client.session.shared.observer.upstream_auth_failed(self.client.session)
                self.client.upstream_failed(AUTH_FAILED)
            return
        self.protocol = proto
        sockname = proto.transport.get_extra_info("sockname")  # type: ignore[union-attr]
        if isinstance(sockname, tuple):  # a unix socket's clients all show Redis's path: not told apart
            state = self.client.session.state
            state.upstream_addr = redis_addr(sockname)
            ctx.upstream_clients[state.upstream_addr] = state
        if auth_reply:  # the service AUTH's reply, to the session (its reply queue expects it first)
            if not auth_reply.startswith(b"+"):
                self.pending.clear()  # refused: nothing of the client's runs on Redis (as its default user)
            proto.slicer.feed(auth_reply + b"\r\n")
        if self.pending:
            assert proto.transport is not None  # (connected: _open returned it)
            proto.transport.write(b"".join(self.pending))
            self.pending = []
        if self.pending_bytes:
            self.pending_bytes = 0
            self.client.resume_reading("connect")

    async def _open(self) -> UpstreamProtocol:
        """A new connection to Redis, its PROXY header (if configured) sent."""
        ctx = self.ctx
        up = ctx.config.upstream
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        if up.path:
            coro = loop.create_unix_connection(lambda: UpstreamProtocol(self.client), str(up.path))
        else:
            coro = loop.create_connection(
                lambda: UpstreamProtocol(self.client), up.host, up.port, ssl=ctx.upstream_ssl,
                server_hostname=(up.tls_server_name or up.host) if ctx.upstream_ssl else None,
            )  # fmt: skip
        transport, proto = await asyncio.wait_for(coro, up.connect_timeout)
        ctx.metrics.upstream_connect_seconds.observe(time.perf_counter() - start)
        ctx.metrics.upstream_up.set(1)
        with contextlib.suppress(OSError):
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if up.proxy_protocol:  # for a proxy between us and Redis: the client's address, first
            transport.write(self.client.proxy_header())
        return proto

    async def _login(self, proto: UpstreamProtocol, login: bytes) -> bytes:
        """Send ``login`` (an AUTH) alone and wait for its reply: b"" if accepted, else Redis's error."""
        line = await self._raw_login(proto, login)
        return b"" if line.startswith(b"+") else line or b"-"

    def _service_auth(self) -> bytes:
        """The service user's AUTH, if it heads what the session sends first (service identity): the link
        sends it alone, so that a Redis that accepts and then closes (one shutting down: the connections
        in its accept queue are reset) has run nothing of the client's, and is tried again."""
        policy = self.client.session.policy
        auth = policy.upstream_auth() if policy.mirror is None else b""
        return auth if auth and b"".join(self.pending[:1]).startswith(auth) else b""

    async def _service_login(self, proto: UpstreamProtocol | None, auth: bytes) -> tuple[UpstreamProtocol, bytes]:
        """Send the service AUTH alone; its reply line. If Redis closes before answering (restarting),
        connect again (refused meanwhile too: the new Redis is not listening yet), for up to connect_timeout."""
        up = self.ctx.config.upstream
        deadline, delay = time.monotonic() + up.connect_timeout, RETRY_DELAY
        joined = b"".join(self.pending)
        self.pending = [joined[len(auth):]] if len(joined) > len(auth) else []
        while True:
            try:
                if proto is None:
                    proto = await self._open()
                line = await self._raw_login(proto, auth)
                return proto, line
            except (ConnectionError, FileNotFoundError):  # (not a timeout: a Redis that hangs is not retried)
                if proto is not None:
                    proto.abandon()
                    proto = None
                if self.client.closed or time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)

    async def _raw_login(self, proto: UpstreamProtocol, login: bytes) -> bytes:
        proto.login = fut = asyncio.get_running_loop().create_future()
        assert proto.transport is not None  # (connected: _open returned it)
        proto.transport.write(login)
        return await asyncio.wait_for(fut, self.ctx.config.upstream.connect_timeout)

    async def _resynced(self) -> bool:
        """Have the mirror users verified against Redis (shared with every client refused meanwhile);
        True if Redis could be asked in time, so one more login is worth trying."""
        mirror = self.client.session.policy.mirror
        if mirror is None or self.client.closed:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(mirror.verify("auth")), RESYNC_WAIT)
        except TimeoutError:
            return False

    def pause(self, why: str) -> None:
        if self.protocol is not None:
            self.protocol.pause(why)

    def resume(self, why: str) -> None:
        if self.protocol is not None:
            self.protocol.resume(why)

    def close(self) -> None:
        session = self.client.session
        if session is not None and self.ctx.upstream_clients.get(session.state.upstream_addr) is session.state:
            del self.ctx.upstream_clients[session.state.upstream_addr]
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None
