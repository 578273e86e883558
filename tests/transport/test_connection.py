"""A client connection with fake transports on both sides: bytes from the client reach the upstream
link as checked, Redis's replies and refusals reach the client in order, a refusal needs no Redis, an
ACL change is answered only once the runtime has put it in force, and QUIT closes after its reply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.config.parse import parse_config
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import Policy, Shared
from redisguard.protocol.resp import encode_command
from redisguard.transport.connection import ClientProtocol
from redisguard.transport.context import ConnectionContext
from redisguard.transport.handshakes import HandshakeBudget

USERS = "user default off\nuser app on >pw ~app:* +@read +@write -@dangerous +@connection +acl|setuser\n"


class FakeTransport(asyncio.Transport):
    """A client socket: what is written, and whether reading is paused or the connection closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.7", 40000), "sockname": ("127.0.0.1", 6380)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data


class FakeLink:
    """The client's upstream connection: what it is handed to send to Redis."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.protocol: Any = None

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass

    def pause(self, why: str) -> None:
        pass

    def resume(self, why: str) -> None:
        pass


class Sequencer:
    """The runtime's sequence of users changes (runtime/reload.py), answering when told to."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.submitted: list[tuple[str, list[bytes]]] = []
        self.future: asyncio.Future[bytes] | None = None

    def submit(self, command: str, args: Any, computed: Any = None) -> asyncio.Future[bytes]:
        self.submitted.append((command, list(args)))
        self.future = asyncio.get_running_loop().create_future()
        return self.future


def make_client(tmp_path: Path, table: CommandTable) -> tuple[ClientProtocol, FakeTransport, list[bytes], Shared]:
    cfg = parse_config({"listener": [{"type": "tcp", "address": "127.0.0.1:6381"}], "acl": {"users_file": "u.acl"},
                        "limits": {"auth_timeout": 0}}, tmp_path)  # fmt: skip
    shared = Shared(Policy(table, parse_users(USERS, table, require_default=True)))
    metrics = Metrics()
    ctx = ConnectionContext(cfg, shared, metrics, HandshakeBudget(16, 16, metrics.tls_handshakes_pending), None)
    client = ClientProtocol(ctx, cfg.listeners[0])
    link = FakeLink()
    client.link = link  # type: ignore[assignment]
    sent = link.sent
    transport = FakeTransport()
    client.connection_made(transport)
    return client, transport, sent, shared


def test_requests_go_upstream_as_checked_and_replies_come_back_in_order(tmp_path: Path, table: CommandTable) -> None:
    async def main() -> None:
        client, transport, sent, _ = make_client(tmp_path, table)
        client.data_received(encode_command([b"AUTH", b"app", b"pw"]))
        assert transport.take() == b"+OK\r\n" and sent == []  # answered here: Redis sees no AUTH of the client
        client.data_received(b"".join(encode_command(a) for a in ([b"GET", b"app:1"], [b"FLUSHALL"], [b"GET", b"app:2"])))
        assert b"".join(sent) == encode_command([b"GET", b"app:1"]) + encode_command([b"GET", b"app:2"])
        assert transport.take() == b""  # the refusal waits for the reply owed before it
        client.session.upstream_data(b"$1\r\na\r\n$1\r\nb\r\n")
        client.upstream_received()
        assert transport.take() == (b"$1\r\na\r\n-NOPERM this user has no permissions to run the 'flushall' command\r\n"
                                    b"$1\r\nb\r\n")  # fmt: skip

    asyncio.run(main())


def test_an_acl_change_is_answered_once_in_force(tmp_path: Path, table: CommandTable) -> None:
    async def main() -> None:
        client, transport, sent, shared = make_client(tmp_path, table)
        sequencer = Sequencer(shared)
        shared.sequencer = sequencer
        client.data_received(encode_command([b"AUTH", b"app", b"pw"]))
        transport.take()
        client.data_received(encode_command([b"ACL", b"SETUSER", b"app", b"-get"]) + encode_command([b"PING"]))
        for _ in range(100):  # the rules are built in a worker thread, then submitted
            if sequencer.future is not None:
                break
            await asyncio.sleep(0.01)
        assert sequencer.submitted == [("setuser", [b"app", b"-get"])]
        assert transport.paused and transport.take() == b"" and sent == []  # PING waits behind the change
        assert sequencer.future is not None
        sequencer.future.set_result(b"+OK\r\n")
        await asyncio.sleep(0)
        assert transport.take() == b"+OK\r\n" and not transport.paused
        assert b"".join(sent) == encode_command([b"PING"])

    asyncio.run(main())


def test_quit_closes_after_its_reply(tmp_path: Path, table: CommandTable) -> None:
    async def main() -> None:
        client, transport, sent, _ = make_client(tmp_path, table)
        client.data_received(encode_command([b"AUTH", b"app", b"pw"]) + encode_command([b"QUIT"]) + b"GET app:1\r\n")
        assert transport.take() == b"+OK\r\n+OK\r\n" and transport.closed and sent == []

    asyncio.run(main())
