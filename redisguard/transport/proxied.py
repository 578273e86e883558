"""tcp and unix listeners with ``proxy_protocol = true``: the PROXY header first, then the client.

(TLS listeners read the header off the raw socket before the handshake, in :mod:`.listeners`.)"""

from __future__ import annotations

import asyncio
from typing import cast

from redisguard.config.model import ListenerConfig
from redisguard.protocol.proxy_header import MAX_HEADER, ProxyHeaderError, parse
from redisguard.transport.connection import ClientProtocol
from redisguard.transport.context import ConnectionContext, from_proxy


class ProxiedClientProtocol(ClientProtocol):
    """A tcp or unix listener with ``proxy_protocol = true``: the stream starts with a PROXY header.

    Until the header is complete no session exists: the bytes are held (at most MAX_HEADER) and
    parsed; then the connection is admitted as the client the header names (allowed_sources, limits,
    the session's peer and source) and whatever followed the header in the same read goes to the
    session. Only peers in ``proxy_sources`` may send one; a missing, malformed, slow or cut-short
    header closes the connection (counted, logged). The wait holds a pending-handshake slot, so the
    global budget bounds these connections as it bounds TLS handshakes. Listeners without
    ``proxy_protocol`` use :class:`ClientProtocol` itself: no per-read cost."""

    __slots__ = ("header", "header_timer")

    def __init__(self, ctx: ConnectionContext, listener: ListenerConfig) -> None:
        super().__init__(ctx, listener)
        self.header: bytes | None = None  # held bytes while the header is incomplete; None after
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not in ctx.clients (which hold sessions) until admitted: like a TLS handshake, the wait is counted
        # by its pending-handshake slot (fds_left, max_connections).
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream protocol's transport
        lst = self.listener
        peername = transport.get_extra_info("peername")
        if not from_proxy(lst, peername):  # a PROXY header is trusted only from proxy_sources
            return self.reject(transport, peername, "proxy_source_not_allowed")
        reason = self.ctx.refusal(lst, peername, handshake=True, proxied=True)
        if reason:
            return self.reject(transport, peername, reason)
        self.admission.start_handshake(None)
        self.header = b""
        self.header_timer = asyncio.get_running_loop().call_later(self.ctx.config.limits.handshake_timeout,
                                                                  self._header_timeout)  # fmt: skip

    def data_received(self, data: bytes) -> None:
        if self.header is None:
            return super().data_received(data)
        if self.closed:
            return
        held = self.header + data[:MAX_HEADER]  # never more than a header's worth is parsed or kept
        try:
            header = parse(held)
        except ProxyHeaderError as e:
            return self._header_failed(e.reason, str(e))
        if header is None:
            self.header = held
            return
        rest = data[header.length - len(self.header):]  # the client's own bytes after the header
        self.header = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if header.source is not None:
            self.admission.proxied = header
        assert self.transport is not None
        super().connection_made(self.transport)  # admitted as the client the header names
        if rest and not self.closed:
            super().data_received(rest)

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.header is not None and not self.closed:
            self._header_failed("timeout", "no complete PROXY header within handshake_timeout")

    def _header_failed(self, reason: str, detail: str) -> None:
        assert self.transport is not None
        self.ctx.proxy_header_failed(self.listener, self.transport.get_extra_info("peername"), reason, detail)
        self.header = None
        self.closed = True
        self.admission.end_handshake()
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.header is not None:
            return None  # closed mid-header: connection_lost counts it
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header is not None and not self.closed:
            self._header_failed("closed", "closed before the end of the PROXY header")
        self.admission.end_handshake()
        super().connection_lost(exc)
