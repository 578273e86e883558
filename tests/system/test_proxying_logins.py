"""End to end, logging in: AUTH and HELLO in every form, with Redis's replies; a client certificate's
login; and what an unauthenticated client may cost (its request sizes, no upstream connection)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, RedisProc, TLSClient, raw_exchange, start_redis


def test_auth_forms(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"".join(encode_command(a) for a in [
        [b"GET", b"cache:x"],
        [b"AUTH", b"alice", b"wrong"],
        [b"AUTH", b"nobody", b"alice-pw"],
        [b"AUTH", b"disabled", b"dis-pw"],
        [b"AUTH", b"alice-pw"],                      # one-arg form: user "default", which is off
        [b"AUTH", b"a", b"b", b"c"],
        [b"HELLO", b"3"],
        [b"AUTH", b"alice", b"alice-pw"],
        [b"GET", b"cache:never-set"],
    ]))  # fmt: skip
    assert out == (
        b"-NOAUTH Authentication required.\r\n"
        + b"-WRONGPASS invalid username-password pair or user is disabled.\r\n" * 4
        + b"-ERR syntax error\r\n"
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH "
        b"<user> <pass> option can be used to authenticate the client and select the RESP protocol version "
        b"at the same time\r\n"
        b"+OK\r\n"
        b"$-1\r\n"
    )


def test_auth_errors_match_real_redis(redis_server: RedisProc, proxy: ProxyProc) -> None:
    """The same unauthenticated conversation against Redis (default user off) and the proxy."""
    r = start_redis(extra=["--user", "default off", "--user", "alice on >alice-pw ~cache:* +@all"])
    try:
        script = b"".join(encode_command(a) for a in [
            [b"PING"], [b"AUTH", b"alice", b"nope"], [b"HELLO", b"3"], [b"HELLO", b"4"], [b"HELLO", b"x"],
            [b"HELLO", b"2", b"FOO"], [b"AUTH", b"x", b"y", b"z"], [b"GET"], [b"NOSUCHCMD", b"a"],
            [b"HELLO", b"2", b"AUTH", b"alice", b"bad"], [b"AUTH", b"alice", b"alice-pw"], [b"GET", b"cache:q"],
            [b"GET", b"nokey:q"], [b"CLIENT", b"NOSUCH"],
        ])  # fmt: skip
        want = raw_exchange(r.port, script)
        got = raw_exchange(proxy.plain_port, script)
        assert got.replace(b"'nokey:q'", b"") == want.replace(b"'nokey:q'", b"") or got == want
        assert got.count(b"\r\n") == want.count(b"\r\n")
    finally:
        r.stop()


def test_hello3_auth_setname(tls_client: TLSClient, proxy: ProxyProc) -> None:
    c = tls_client(protocol=3)
    assert c.ping() is True
    out = raw_exchange(
        proxy.plain_port,
        encode_command([b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw", b"SETNAME", b"app1"])
        + encode_command([b"CLIENT", b"GETNAME"]),
    )
    assert out.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in out
    assert out.endswith(b"$4\r\napp1\r\n")


def test_unauthenticated_big_request_refused(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"*20\r\n", expect_close=True)
    assert out == b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    out = raw_exchange(proxy.plain_port, b"*2\r\n$3\r\nGET\r\n$100000\r\n", expect_close=True)
    assert out == b"-ERR Protocol error: unauthenticated bulk length\r\n"


def test_client_certificate_login(proxy: ProxyProc, certs: Path) -> None:
    c = redis.Redis(
        host="127.0.0.1", port=proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
        ssl_certfile=str(certs / "client.pem"), ssl_keyfile=str(certs / "client.key"),
    )  # fmt: skip
    assert c.execute_command("ACL", "WHOAMI") == b"alice"
    assert c.set("cache:cert", "1") is True
    with pytest.raises(redis.exceptions.NoPermissionError):
        c.get("nope:1")
    # logged in by its certificate, an idle pooled connection is not closed by auth_timeout (3 s here)
    time.sleep(3.5)
    assert c.get("cache:cert") == b"1"
    assert c.connection_pool._created_connections == 1  # the same connection, not a reconnect
    c.close()


def test_unauthenticated_clients_cost_redis_no_connection(proxy: ProxyProc, direct: redis.Redis) -> None:
    before = len(direct.client_list())
    idle = [socket.create_connection(("127.0.0.1", proxy.plain_port)) for _ in range(20)]
    for s in idle:
        s.sendall(b"PING\r\nAUTH alice wrong\r\n")
    time.sleep(0.3)
    assert len(direct.client_list()) == before  # refused and unauthenticated: no upstream connection
    idle[0].sendall(b"AUTH alice alice-pw\r\nPING\r\n")
    time.sleep(0.3)
    assert len(direct.client_list()) == before + 1
    for s in idle:
        s.close()
