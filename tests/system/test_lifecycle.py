"""Lifecycle: SIGTERM drains (unready at once, no new clients, every request answered, then closed),
and [server] reload_interval reloads when a watched file changes."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

from redisguard.fast import ReplyScanner
from redisguard.protocol.resp import encode_command
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, read_until, start_proxy

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
    from tests.system.conftest import v1

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


def _client(p: ProxyProc, certs: Path, tls: bool = False) -> socket.socket:
    """A client logged in as app, plaintext or TLS."""
    s = socket.create_connection(("127.0.0.1", p.tls_port if tls else p.plain_port), timeout=20)
    if tls:
        s = ssl.create_default_context(cafile=str(certs / "ca.pem")).wrap_socket(s, server_hostname="localhost")
    s.sendall(encode_command([b"AUTH", b"app", b"app-pw"]))
    assert s.recv(100) == b"+OK\r\n"
    return s


def _closed(s: socket.socket) -> bool:
    """The proxy closed the connection (TLS: with or without its close_notify answered)."""
    s.settimeout(20)
    try:
        return s.recv(100) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def test_idle_clients_are_closed_at_once_on_sigterm(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    """Nothing in flight: closed at once, so the process exits long before drain_timeout, a TLS client
    that does not answer our close_notify (it is not reading) and a subscribed one included."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 60")
    try:
        silent = socket.create_connection(("127.0.0.1", p.plain_port), timeout=20)  # never sent a byte
        plain, tls, subscribed = _client(p, certs), _client(p, certs, tls=True), _client(p, certs)
        subscribed.sendall(encode_command([b"SUBSCRIBE", b"news"]))
        assert subscribed.recv(100) == b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0  # (held for drain_timeout, 60 s, before)
        assert all(_closed(s) for s in (silent, plain, tls, subscribed))
        assert "drain_timeout" not in p.log.read_text()
    finally:
        p.stop()


def test_in_flight_clients_are_answered_then_closed(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    """A blocked BLPOP and an open MULTI are in flight: the drain waits for their answers (the EXEC still
    to come), relays them, then closes; one never answered is cut at drain_timeout."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 60")
    direct = redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    direct.delete("drain:q")
    try:
        blocked, multi = _client(p, certs, tls=True), _client(p, certs)
        blocked.sendall(encode_command([b"BLPOP", b"drain:q", b"0"]))
        multi.sendall(encode_command([b"MULTI"]) + encode_command([b"SET", b"drain:k", b"v"]))
        assert read_until(multi, lambda b: b.count(b"\r\n") == 2) == b"+OK\r\n+QUEUED\r\n"
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(1)  # ten drain checks: neither is closed as idle
        multi.sendall(encode_command([b"EXEC"]))
        assert read_until(multi, lambda b: b.endswith(b"+OK\r\n")) == b"*1\r\n+OK\r\n"
        assert _closed(multi)
        assert p.proc.poll() is None  # the BLPOP still holds the drain
        direct.rpush("drain:q", "job")
        assert read_until(blocked, lambda b: b.endswith(b"job\r\n")) == b"*2\r\n$7\r\ndrain:q\r\n$3\r\njob\r\n"
        assert _closed(blocked)
        assert p.proc.wait(30) == 0
    finally:
        p.stop()
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 1")
    try:
        blocked = _client(p, certs)
        blocked.sendall(encode_command([b"BLPOP", b"drain:q", b"0"]))
        time.sleep(0.2)
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0 and _closed(blocked)
        assert "drain_timeout" in p.log.read_text()  # cut, and logged
    finally:
        p.stop()


def test_a_replacement_binds_and_serves_while_the_old_one_drains(tmp_path: Path, certs: Path, redis_server: RedisProc
                                                                 ) -> None:  # fmt: skip
    """SO_REUSEPORT and a preflight that allows for it: a second redisguard with the same ports starts
    while the first still drains a client (the ports it still holds: the metrics port), and serves."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    old = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 60")
    (new_dir := tmp_path / "new").mkdir()
    new = None
    direct = redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    direct.delete("drain:r")
    try:
        blocked = _client(old, certs)
        blocked.sendall(encode_command([b"BLPOP", b"drain:r", b"0"]))
        old.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _ready(old.metrics_port) != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        new = start_proxy(new_dir, certs, users, redis_server.port, extra="[server]\ndrain_timeout = 60",
                          ports=(old.tls_port, old.plain_port, old.metrics_port))  # fmt: skip
        for tls in (False, True):
            s = _client(new, certs, tls=tls)
            s.sendall(encode_command([b"PING"]))
            assert s.recv(100) == b"+PONG\r\n"
            s.close()
        assert old.proc.poll() is None  # still draining meanwhile
        direct.rpush("drain:r", "job")
        assert read_until(blocked, lambda b: b.endswith(b"job\r\n")) == b"*2\r\n$7\r\ndrain:r\r\n$3\r\njob\r\n"
        assert old.proc.wait(30) == 0
        assert _ready(new.metrics_port) == 200  # the port is the new one's alone now
    finally:
        old.stop()
        if new is not None:
            new.stop()


def test_serve_takeover_starts_alongside_and_the_old_one_can_go(tmp_path: Path, certs: Path, redis_server: RedisProc
                                                                ) -> None:  # fmt: skip
    """A second redisguard on the ports a running one listens on is refused (it would share its clients
    silently), unless it is started with --takeover: then both serve, and once the old one is stopped the
    new one serves alone. A unix socket is replaced, and the old
    process does not remove the new one's at its end."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    path = tmp_path / "rg.sock"
    old = start_proxy(tmp_path, certs, users, redis_server.port,
                      extra=f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{path}"\n')  # fmt: skip
    serve = [sys.executable, "-m", "redisguard", "serve", "-c", str(old.config)]
    new = None
    try:
        refused = subprocess.run(serve, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "address already in use" in refused.stderr
        log = tmp_path / "takeover.log"
        new = subprocess.Popen([*serve, "--takeover"], stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        deadline = time.monotonic() + 30
        while "redisguard_started" not in log.read_text() and new.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "redisguard_started" in log.read_text(), log.read_text()
        for i in range(20):  # both listen: every connection is served, by one or the other
            s = _client(old, certs, tls=i % 2 == 0)
            s.sendall(encode_command([b"PING"]))
            assert s.recv(100) == b"+PONG\r\n"
            s.close()
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(30) == 0
        s = _client(old, certs)  # (the same ports: the new process's now)
        s.sendall(encode_command([b"PING"]))
        assert s.recv(100) == b"+PONG\r\n"
        s.close()
        with socket.socket(socket.AF_UNIX) as u:
            u.settimeout(10)
            u.connect(str(path))
            u.sendall(encode_command([b"AUTH", b"app", b"app-pw"]) + encode_command([b"PING"]))
            assert read_until(u, b"+OK\r\n+PONG\r\n") == b"+OK\r\n+PONG\r\n"
    finally:
        old.stop()
        if new is not None:
            new.terminate()
            new.wait(30)
