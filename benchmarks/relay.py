"""The floor for a Python TLS proxy: a bare uvloop TLS byte relay, one upstream connection per client.

    python benchmarks/relay.py --listen 127.0.0.1:7005 --upstream 127.0.0.1:6379 --cert server.pem --key server.key

No parsing, no policy, no metrics: whatever redisguard costs above this is its own work, whatever
this costs above stunnel/HAProxy is Python + uvloop's TLS. Used by ``benchmarks/suite.py``; not part
of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import cast

import uvloop


class Pipe(asyncio.Protocol):
    """One side of a relayed connection; bytes go to ``peer`` unchanged, and when the peer's write
    buffer fills up this side stops reading (so a slow reader cannot make the relay hold its data)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's TLS transport is not a subclass)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Client(Pipe):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # until the upstream is connected: nothing to buffer meanwhile
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        assert self.transport is not None
        try:
            _, up = await asyncio.get_running_loop().create_connection(Pipe, *self.upstream)
        except OSError:
            self.transport.close()
            return
        up.peer, self.peer = self, up
        if self.transport.is_closing():
            assert up.transport is not None
            up.transport.close()
        else:
            self.transport.resume_reading()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int], ctx: ssl.SSLContext) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Client(upstream), *listen, ssl=ctx, backlog=4096)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=address, required=True)
    ap.add_argument("--upstream", type=address, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    uvloop.run(serve(a.listen, a.upstream, ctx))


if __name__ == "__main__":
    main()
