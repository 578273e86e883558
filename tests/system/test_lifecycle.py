"""Lifecycle: SIGTERM drains (unready at once, no new clients, every request answered, then closed),
and [server] reload_interval reloads when a watched file changes."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from redisguard.protocol.resp import ReplyScanner, encode_command
from tests.helpers import RedisProc, start_proxy

USERS = "user default off\nuser app on >app-pw ~* &* +@all\n"


def _ready(port: int) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def test_sigterm_drains_a_pipeline_without_losing_a_reply(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 20")
    n, chunks = 10_000, 20
    requests = [encode_command([b"SET", b"drain:%d" % i, b"v"]) if i % 2 else encode_command([b"GET", b"drain:%d" % i])
                for i in range(n)]  # fmt: skip
    s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=20)
    s.sendall(encode_command([b"AUTH", b"app", b"app-pw"]))
    assert s.recv(100) == b"+OK\r\n"
    got = bytearray()
    done = threading.Event()

    def reader() -> None:
        while chunk := s.recv(1 << 16):
            got.extend(chunk)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    seen: dict[str, object] = {}

    def probe() -> None:  # while the pipeline drains: unready at once, and no new connection
        deadline = time.monotonic() + 5
        while (status := _ready(p.metrics_port)) != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["ready"] = status
        try:
            socket.create_connection(("127.0.0.1", p.plain_port), timeout=2).recv(1)
            seen["accepted"] = True
        except OSError:
            seen["accepted"] = False

    per = n // chunks
    start = time.monotonic()
    try:
        for c in range(chunks):
            s.sendall(b"".join(requests[c * per : (c + 1) * per]))
            if c == 2:
                p.proc.send_signal(signal.SIGTERM)  # mid-pipeline; the client goes on sending
                threading.Thread(target=probe, daemon=True).start()
            time.sleep(0.02)
        assert done.wait(20), "the drained connection was not closed"
        frames, used = ReplyScanner().scan(bytes(got))
        assert used == len(got) and len(frames) == n  # every request answered, no partial reply
        assert p.proc.wait(20) == 0 and time.monotonic() - start < 20
        assert seen == {"ready": 503, "accepted": False}
    finally:
        s.close()
        p.stop()


def test_reload_when_the_users_file_changes(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\nreload_interval = 0.5")
    try:
        users.write_text(USERS + "user late on >late-pw ~* +ping\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", p.plain_port), timeout=5) as s:
                s.sendall(encode_command([b"AUTH", b"late", b"late-pw"]))
                if s.recv(100) == b"+OK\r\n":
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("the changed users file was not reloaded")
        assert "files_changed" in p.log.read_text()
    finally:
        p.stop()


def test_a_client_admitted_during_the_drain_is_drained_too(tmp_path: Path, certs: Path, redis_server: RedisProc
                                                          ) -> None:  # fmt: skip
    """A PROXY header that completes after SIGTERM admits its client: it is served, then closed once
    quiet like every other client, so the process does not wait for drain_timeout."""
    from tests.helpers import free_port, wait_port
    from tests.system.test_proxy_protocol import v1

    users = tmp_path / "users.acl"
    users.write_text(USERS)
    port = free_port()
    extra = (f'[server]\ndrain_timeout = 15\n\n[[listener]]\nname = "pp"\ntype = "tcp"\n'
             f'address = "127.0.0.1:{port}"\nproxy_protocol = true\nproxy_sources = ["127.0.0.1/32"]\n')  # fmt: skip
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra=extra)
    try:
        wait_port(port, p.proc)
        header = v1("203.0.113.7", 4000)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(header[:5])  # the header is not complete when the drain starts
        busy = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)  # keeps the drain going
        busy.sendall(encode_command([b"AUTH", b"app", b"app-pw"]))
        assert busy.recv(100) == b"+OK\r\n"
        time.sleep(0.2)
        start = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        for _ in range(6):  # a command every 50 ms: not quiet, so not closed yet
            busy.sendall(encode_command([b"PING"]))
            time.sleep(0.05)
        s.sendall(header[5:] + encode_command([b"AUTH", b"app", b"app-pw"]) + encode_command([b"PING"]))
        got = b""
        while not got.endswith(b"+PONG\r\n") and (chunk := s.recv(100)):
            got += chunk
        assert got == b"+OK\r\n+PONG\r\n"  # served ...
        assert s.recv(100) == b""  # ... then closed once quiet
        assert p.proc.wait(10) == 0 and time.monotonic() - start < 5  # not held until drain_timeout
        s.close()
        busy.close()
    finally:
        p.stop()
