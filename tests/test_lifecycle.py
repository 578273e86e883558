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

from redisguard.resp import ReplyScanner, encode_command

from .helpers import RedisProc, start_proxy

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
