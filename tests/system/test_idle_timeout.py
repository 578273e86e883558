"""[limits] idle_timeout against Redis's own `timeout`, side by side: the same clients, one set
connected to a Redis with `timeout 1`, one to redisguard with `idle_timeout = 1.0` (in front of a
Redis without a timeout). Redis closes an idle client unless it is blocked, subscribed (in either
RESP version, also inside MULTI) or a monitor; a client inside MULTI alone is closed."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, read_until, start_proxy, start_redis

USERS = "user default off\nuser admin on >admin-pw ~* &* +@all\n"

# What each client sends once logged in; the name says whether Redis keeps it open.
CLIENTS = {
    "plain": b"PING\r\n",
    "multi": b"MULTI\r\n",
    "resp2 subscribed": b"SUBSCRIBE ch\r\n",
    "resp3 subscribed": b"HELLO 3\r\nSUBSCRIBE ch\r\n",
    "resp3 subscribed inside multi": b"HELLO 3\r\nSUBSCRIBE ch\r\nMULTI\r\n",
    "resp3 multi, subscribe queued": b"HELLO 3\r\nMULTI\r\nSUBSCRIBE ch\r\n",  # not subscribed until EXEC
    "blocked": b"BLPOP idle:list 30\r\n",
    "monitor": b"MONITOR\r\n",
}


@pytest.fixture(scope="module")
def oracle() -> Iterator[RedisProc]:
    r = start_redis(extra=["--timeout", "1", "--user", "admin on >admin-pw ~* &* +@all", "--user", "default off"])
    yield r
    r.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    d = tmp_path_factory.mktemp("idle")
    users = d / "users.acl"
    users.write_text(USERS)
    p = start_proxy(d, certs, users, redis_server.port, disabled="[]", limits="idle_timeout = 1.0")
    yield p
    p.stop()


def _open_after(port: int, wait: float) -> dict[str, bool]:
    socks = {}
    for name, script in CLIENTS.items():
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"AUTH admin admin-pw\r\n" + script)
        socks[name] = s
    time.sleep(wait)
    alive = {}
    for name, s in socks.items():
        s.setblocking(False)
        try:
            while s.recv(65536):  # the replies so far; b"" once the peer closed
                pass
            alive[name] = False
        except BlockingIOError:
            alive[name] = True  # nothing more to read, and not closed
        except OSError:
            alive[name] = False
        s.close()
    return alive


def test_idle_timeout_closes_the_clients_redis_closes(oracle: RedisProc, proxy: ProxyProc) -> None:
    # Redis checks timeouts in clientsCron (each client about once a second): 4 s is past both.
    want = _open_after(oracle.port, 4.0)
    assert want == {**{n: True for n in CLIENTS}, "plain": False, "multi": False,
                    "resp3 multi, subscribe queued": False}, want  # the model holds
    got = _open_after(proxy.plain_port, 4.0)
    assert got == want


def test_a_subscribed_resp3_client_in_multi_still_gets_its_messages(proxy: ProxyProc, redis_server: RedisProc) -> None:
    s = socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=5)
    s.sendall(b"AUTH admin admin-pw\r\nHELLO 3\r\nSUBSCRIBE ch\r\nMULTI\r\n")
    assert read_until(s, lambda d: d.endswith(b"+OK\r\n") and d.count(b"+OK\r\n") == 2).count(b"+OK") == 2
    time.sleep(2.5)
    pub = socket.create_connection(("127.0.0.1", redis_server.port), timeout=5)
    pub.sendall(b"AUTH %s %s\r\nPUBLISH ch hello\r\n" % (UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode()))
    assert read_until(pub, lambda d: d.endswith(b":1\r\n")).endswith(b":1\r\n")
    assert read_until(s, lambda d: b"hello" in d).endswith(b"$5\r\nhello\r\n")
    s.close()
    pub.close()
