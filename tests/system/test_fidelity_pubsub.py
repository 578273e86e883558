"""Protocol fidelity, pub/sub and reply modes: subscriptions in RESP2 and RESP3, CLIENT REPLY OFF and
SKIP, the reply-order cases an attacker found, client-side caching's invalidations; and redis-py's
pub/sub, transactions and RESP3 over TLS."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import ProxyProc, RedisProc, read_until
from tests.system.conftest import LOGIN, _group, cmds, exchange, same_as_redis


def test_pubsub_resp2(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"SUBSCRIBE", b"events:a", b"events:b"], [b"SUBSCRIBE", b"forbidden"], [b"PING"],
        [b"PING", b"hello"], [b"PSUBSCRIBE", b"events:*"], [b"PSUBSCRIBE", b"events:a*"], [b"GET", b"cache:x"],
        [b"UNSUBSCRIBE", b"events:a"], [b"UNSUBSCRIBE"], [b"PUNSUBSCRIBE"], [b"PUNSUBSCRIBE"], [b"GET", b"cache:x"],
        [b"SSUBSCRIBE", b"events:s"], [b"SUNSUBSCRIBE"], [b"PING"],
    )  # fmt: skip
    out = same_as_redis(mirror, guarded, script, redis_server)
    assert b"channels used as arguments" in out


def test_pubsub_resp3_messages_and_replies(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        [b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw"], [b"SUBSCRIBE", b"events:a"], [b"PUBLISH", b"events:a", b"m1"],
        [b"PUBLISH", b"nope", b"m2"], [b"GET", b"secret"], [b"PSUBSCRIBE", b"events:*"], [b"PUBLISH", b"events:a", b"m3"],
        [b"SET", b"cache:k", b"v"], [b"GET", b"cache:k"], [b"UNSUBSCRIBE"], [b"PUNSUBSCRIBE"], [b"GET", b"cache:k"],
    )  # fmt: skip
    out = same_as_redis(mirror, guarded, script, redis_server)
    assert b">3\r\n$7\r\nmessage\r\n" in out and b">4\r\n$8\r\npmessage\r\n" in out


def test_client_reply_modes(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"cache:a", b"1"], [b"GET", b"secret"], [b"NOSUCH"],
        [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"cache:a"], [b"CLIENT", b"REPLY", b"SKIP"], [b"GET", b"cache:a"],
        [b"GET", b"cache:a"], [b"CLIENT", b"REPLY", b"SKIP"], [b"GET", b"secret"], [b"GET", b"secret"],
        [b"CLIENT", b"REPLY", b"SKIP"], [b"CLIENT", b"REPLY", b"ON"], [b"PING"],
        [b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"GET", b"x"], [b"EXEC"], [b"CLIENT", b"REPLY", b"ON"], [b"PING"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server)


def test_redis_py_pubsub_transaction_and_resp3(guarded: ProxyProc, certs: Path) -> None:
    def client(**kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=guarded.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                           username="alice", password="alice-pw", socket_timeout=10, **kw)  # fmt: skip

    pub, sub = client(), client()
    ps = sub.pubsub()
    ps.subscribe("events:x")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    with pytest.raises(redis.exceptions.NoPermissionError):
        pub.publish("other", "m")
    assert pub.publish("events:x", "hello") == 1
    msg = ps.get_message(timeout=2)
    assert msg["type"] == "message" and msg["data"] == b"hello"
    ps.close()

    def tx(pipe: redis.client.Pipeline) -> None:
        v = int(pipe.get("cache:txf") or 0)
        pipe.multi()
        pipe.set("cache:txf", v + 1)

    pub.transaction(tx, "cache:txf")
    assert pub.get("cache:txf") == b"1"

    r3 = client(protocol=3)
    assert r3.hset("cache:h3", mapping={"a": "1"}) == 1
    assert r3.hgetall("cache:h3") == {b"a": b"1"}
    ps3 = r3.pubsub()
    ps3.subscribe("events:y")
    assert ps3.get_message(timeout=2)["type"] == "subscribe"
    assert pub.publish("events:y", "r3") == 1
    assert ps3.get_message(timeout=2)["data"] == b"r3"
    ps3.close()
    for c in (pub, sub, r3):
        c.close()


def test_client_side_caching_invalidation(guarded: ProxyProc, certs: Path) -> None:
    """CLIENT TRACKING ON over RESP3: a write by another client sends an invalidation push."""
    with socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5) as s:
        s.sendall(cmds([b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw"], [b"CLIENT", b"TRACKING", b"ON"],
                       [b"GET", b"cache:t"]))  # fmt: skip
        time.sleep(0.3)
        read_until(s, lambda d: d.endswith(b"$-1\r\n") or d.endswith(b"_\r\n"))
        exchange(guarded.plain_port, cmds(LOGIN, [b"SET", b"cache:t", b"2"]))
        time.sleep(0.3)
        s.sendall(cmds([b"PING"]))
        data = read_until(s, lambda d: d.endswith(b"+PONG\r\n"))
    assert b">2\r\n$10\r\ninvalidate\r\n*1\r\n$7\r\ncache:t\r\n" in data and data.endswith(b"+PONG\r\n")


def test_tracking_redirect_and_caching_through_the_proxy(guarded: ProxyProc) -> None:
    """RESP2 tracking: invalidations go to another proxied client by its (upstream) CLIENT ID."""
    with (
        socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5) as a,
        socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5) as b,
    ):
        a.sendall(cmds([b"AUTH", b"mon", b"mon-pw"], [b"CLIENT", b"ID"]))
        time.sleep(0.2)
        client_id = _group(rb":(\d+)\r\n", read_until(a, lambda d: d.endswith(b"\r\n") and d.count(b"\r\n") >= 2))
        a.sendall(cmds([b"SUBSCRIBE", b"__redis__:invalidate"]))
        time.sleep(0.2)
        read_until(a, lambda d: d.endswith(b":1\r\n"))
        b.sendall(cmds([b"AUTH", b"mon", b"mon-pw"], [b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", client_id, b"OPTIN"],
                       [b"CLIENT", b"CACHING", b"YES"], [b"GET", b"cache:r"]))  # fmt: skip
        time.sleep(0.2)
        assert read_until(b, b"+OK\r\n+OK\r\n+OK\r\n$-1\r\n") == b"+OK\r\n+OK\r\n+OK\r\n$-1\r\n"
        exchange(guarded.plain_port, cmds(LOGIN, [b"SET", b"cache:r", b"1"]))
        time.sleep(0.3)
        msg = read_until(a, lambda d: d.endswith(b"cache:r\r\n"))
    assert msg == b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$7\r\ncache:r\r\n"


# Reply-order cases an attacker found (each once shifted replies between requests).
REPLY_ORDER = {
    "array starting with 'message' after SKIP": [
        LOGIN, [b"SET", b"cache:a", b"message"], [b"CLIENT", b"REPLY", b"SKIP"], [b"MGET", b"cache:a"],
        [b"GET", b"cache:a"], [b"PING"]],
    "array starting with 'message' while subscribed in RESP3": [
        [b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw"], [b"SET", b"cache:a", b"message"], [b"SUBSCRIBE", b"events:x"],
        [b"MGET", b"cache:a"], [b"GET", b"other"], [b"PING"]],
    "SUBSCRIBE queued in MULTI": [
        LOGIN, [b"MULTI"], [b"SUBSCRIBE", b"events:a"], [b"EXEC"], [b"GET", b"cache:a"], [b"UNSUBSCRIBE"],
        [b"GET", b"cache:a"], [b"PING"]],  # one channel: two Redis processes list several in different orders
    "CLIENT REPLY OFF while subscribed (RESP2)": [
        LOGIN, [b"SUBSCRIBE", b"events:a"], [b"CLIENT", b"REPLY", b"OFF"], [b"UNSUBSCRIBE"], [b"GET", b"other"],
        [b"GET", b"cache:a"]],
    "CLIENT REPLY SKIP while subscribed (RESP2)": [
        LOGIN, [b"SUBSCRIBE", b"events:a"], [b"CLIENT", b"REPLY", b"SKIP"], [b"UNSUBSCRIBE"], [b"GET", b"cache:a"]],
    "MULTI while subscribed (RESP2)": [
        LOGIN, [b"SUBSCRIBE", b"events:a"], [b"MULTI"], [b"UNSUBSCRIBE"], [b"GET", b"other"], [b"EXEC"]],
    "CLIENT REPLY SKIP then SUBSCRIBE": [LOGIN, [b"CLIENT", b"REPLY", b"SKIP"], [b"SUBSCRIBE", b"events:a"], [b"PING"]],
    "SUBSCRIBE in MULTI, EXEC under CLIENT REPLY OFF": [
        LOGIN, [b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"SUBSCRIBE", b"events:a"], [b"EXEC"], [b"UNSUBSCRIBE"],
        [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"cache:x"], [b"GET", b"other"], [b"PING"]],
    "CLIENT REPLY OFF then SUBSCRIBE": [
        LOGIN, [b"CLIENT", b"REPLY", b"OFF"], [b"SUBSCRIBE", b"events:a"], [b"UNSUBSCRIBE"], [b"CLIENT", b"REPLY", b"ON"],
        [b"PING"]],
}  # fmt: skip


@pytest.mark.parametrize("name", list(REPLY_ORDER))
def test_reply_order_matches_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc, name: str) -> None:
    same_as_redis(mirror, guarded, cmds(*REPLY_ORDER[name]), redis_server)
