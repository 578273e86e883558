"""Protocol fidelity: the same byte stream sent straight to Redis (with the same ACL) and through
redisguard must get the same bytes back. Plus redis-py scenarios over TLS."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.protocol.resp import encode_command
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    TLSClient,
    raw_exchange,
    read_until,
    start_proxy,
    start_redis,
)  # fmt: skip

# The policy, loaded into the mirror Redis (as ACL rules) and into redisguard (as its users file).
POLICY = [
    "user default off",
    "user alice on >alice-pw ~cache:* &events:* +@all -@dangerous -flushall",
    "user mon on >mon-pw ~* &* +@all",
    "user noexec on >n-pw ~* &* +@all -exec",
    "user sorter on >s-pw ~cache:* +@all",
]


@pytest.fixture(scope="module")
def mirror() -> Iterator[RedisProc]:
    """A Redis that enforces POLICY itself: the oracle for what a restricted client must see."""
    extra = []
    for line in POLICY:
        extra += ["--user", line.split(" ", 1)[1]]
    r = start_redis(extra=extra)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    d = tmp_path_factory.mktemp("fidelity")
    users = d / "users.acl"
    users.write_text("\n".join(POLICY) + "\n")
    p = start_proxy(d, certs, users, redis_server.port, disabled="[]")
    yield p
    p.stop()


def _group(pattern: bytes, data: bytes) -> bytes:
    """The first group of ``pattern`` in ``data``, which must match."""
    m = re.search(pattern, data)
    assert m is not None, (pattern, data[:200])
    return m.group(1)


def _flush(port: int) -> None:
    c = redis.Redis(port=port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    pipe = c.pipeline(transaction=False)  # (FLUSHDB in each: the service user has -flushall, see start_redis)
    for db in range(16):
        pipe.execute_command("SELECT", db).execute_command("FLUSHDB")
    pipe.execute()
    c.close()


def exchange(port: int, data: bytes, chunks: list[int] | None = None, quiet: float = 0.4, limit: float = 20) -> bytes:
    return raw_exchange(port, data, timeout=limit, quiet=quiet, chunks=chunks)


_ID = re.compile(rb"(\$2\r\nid\r\n:)\d+")


def same_as_redis(mirror: RedisProc, guarded: ProxyProc, script: bytes, redis_server: RedisProc, **kw: Any) -> bytes:
    _flush(mirror.port)
    _flush(redis_server.port)
    want = exchange(mirror.port, script, **kw)
    _flush(redis_server.port)
    got = exchange(guarded.plain_port, script, **kw)
    assert _ID.sub(rb"\1N", got) == _ID.sub(rb"\1N", want)
    return got


def cmds(*argvs: list[bytes] | str) -> bytes:
    return b"".join(a.encode() if isinstance(a, str) else encode_command(a) for a in argvs)


LOGIN = [b"AUTH", b"alice", b"alice-pw"]


def test_deep_pipeline_10000_mixed(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    parts = [LOGIN]
    for i in range(10_000):
        k = i % 7
        parts.append(
            [
                [b"SET", b"cache:%d" % i, b"v%d" % i],
                [b"GET", b"cache:%d" % (i - 1)],
                [b"GET", b"secret:%d" % i],  # key denied
                [b"FLUSHALL"],  # command denied
                [b"NOSUCHCMD", b"x"],  # unknown
                [b"GET"],  # arity
                [b"INCR", b"cache:counter"],
            ][k]
        )
    out = same_as_redis(mirror, guarded, cmds(*parts), redis_server)
    assert out.count(b"\r\n-NOPERM") >= 2 * 1428


def test_transactions(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"EXEC"], [b"DISCARD"], [b"MULTI"], [b"MULTI"], [b"SET", b"cache:a", b"1"], [b"WATCH", b"cache:a"],
        [b"EXEC"], [b"WATCH", b"cache:a"], [b"MULTI"], [b"INCR", b"cache:a"], [b"GET", b"x"], [b"EXEC"],
        [b"MULTI"], [b"GET", b"cache:a"], [b"DISCARD"], [b"MULTI"], [b"NOSUCH"], [b"EXEC"], [b"UNWATCH"],
        [b"MULTI"], [b"SET", b"cache:b", b"2"], [b"GET"], [b"EXEC"], [b"GET", b"cache:b"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server)


def test_exec_itself_denied(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        [b"AUTH", b"noexec", b"n-pw"], [b"MULTI"], [b"SET", b"a", b"1"], [b"EXEC"], [b"GET", b"a"], [b"EXEC"],
        [b"MULTI"], [b"EXEC", b"extra"], [b"DISCARD"],
    )  # fmt: skip
    out = same_as_redis(mirror, guarded, script, redis_server)
    assert b"-EXECABORT Transaction discarded because of: NOPERM this user has no permissions to run the 'exec'" in out


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


def test_resp3_types(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        [b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw", b"SETNAME", b"fid"], [b"HSET", b"cache:h", b"f", b"v"],
        [b"HGETALL", b"cache:h"], [b"SADD", b"cache:s", b"a"], [b"SMEMBERS", b"cache:s"],
        [b"ZADD", b"cache:z", b"1.5", b"m"], [b"ZSCORE", b"cache:z", b"m"], [b"GET", b"cache:none"],
        [b"HGETALL", b"secret"], [b"CLIENT", b"GETNAME"], [b"HELLO"], [b"HELLO", b"2"], [b"HGETALL", b"cache:h"],
    )  # fmt: skip
    out = same_as_redis(mirror, guarded, script, redis_server)
    assert b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n" in out and b"~1\r\n" in out and b",1.5\r\n" in out and b"_\r\n" in out


def test_client_reply_modes(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"CLIENT", b"REPLY", b"OFF"], [b"SET", b"cache:a", b"1"], [b"GET", b"secret"], [b"NOSUCH"],
        [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"cache:a"], [b"CLIENT", b"REPLY", b"SKIP"], [b"GET", b"cache:a"],
        [b"GET", b"cache:a"], [b"CLIENT", b"REPLY", b"SKIP"], [b"GET", b"secret"], [b"GET", b"secret"],
        [b"CLIENT", b"REPLY", b"SKIP"], [b"CLIENT", b"REPLY", b"ON"], [b"PING"],
        [b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"GET", b"x"], [b"EXEC"], [b"CLIENT", b"REPLY", b"ON"], [b"PING"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server)


def test_inline_pipeline_and_reset(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = (
        b"AUTH alice alice-pw\r\nSET cache:i 'x y'\r\nGET cache:i\r\nGET secret\r\n\r\nPING\r\n"
        + cmds([b"MULTI"], [b"SET", b"cache:r", b"1"])
        + b'RESET\r\nGET cache:i\r\nAUTH alice alice-pw\r\nEXEC\r\nGET cache:r\r\nECHO "a\\x41"\r\n'
    )
    same_as_redis(mirror, guarded, script, redis_server)


def test_select_blocking_and_misc(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        LOGIN, [b"SELECT", b"3"], [b"SET", b"cache:db3", b"1"], [b"SELECT", b"0"], [b"GET", b"cache:db3"],
        [b"SWAPDB", b"0", b"3"], [b"BLPOP", b"cache:q", b"0.2"], [b"RPUSH", b"cache:q", b"a"],
        [b"BLMOVE", b"cache:q", b"cache:q2", b"LEFT", b"RIGHT", b"0.1"], [b"BLPOP", b"secret:q", b"0.1"],
        [b"BRPOP", b"cache:q2", b"cache:q", b"0.1"], [b"BZPOPMIN", b"cache:z", b"0.1"], [b"ZADD", b"cache:z", b"1", b"m"],
        [b"BZPOPMIN", b"cache:z", b"0.1"],
        [b"XADD", b"cache:x", b"1-1", b"f", b"v"], [b"XREAD", b"BLOCK", b"100", b"STREAMS", b"cache:x", b"0"],
        [b"WAIT", b"0", b"10"], [b"ACL", b"WHOAMI"], [b"ACL", b"DRYRUN", b"alice", b"GET", b"secret"],
        [b"ACL", b"DRYRUN", b"alice", b"GET", b"cache:1"], [b"QUIT"], [b"PING"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server, quiet=1.0)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_split_of_a_pipeline(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc, data: st.DataObject) -> None:
    script = cmds(LOGIN, [b"SET", b"cache:s", b"x" * 300], [b"GET", b"secret"], "GET cache:s\r\n", [b"MULTI"],
                  [b"GET", b"no"], [b"EXEC"], [b"HELLO", b"3"], [b"GET", b"cache:s"])  # fmt: skip
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(script) - 1), max_size=12))))
    same_as_redis(mirror, guarded, script, redis_server, chunks=cuts, quiet=0.3)


def test_acl_introspection_from_redisguard_policy(guarded: ProxyProc) -> None:
    out = exchange(guarded.plain_port, cmds([b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"USERS"], [b"ACL", b"GETUSER", b"alice"],
                                             [b"ACL", b"SETUSER", b"x"], [b"ACL", b"LIST"],
                                             [b"ACL", b"DELUSER", b"x"]))  # fmt: skip
    # redisguard's users, not Redis's
    assert b"*5\r\n$5\r\nalice\r\n$7\r\ndefault\r\n$3\r\nmon\r\n$6\r\nnoexec\r\n$6\r\nsorter\r\n" in out
    assert out.endswith(b"$30\r\nuser x off resetchannels -@all\r\n:1\r\n")  # SETUSER/DELUSER on redisguard's users
    assert b"user alice on #" in out and b"user mon on #" in out


def test_acl_getuser_dryrun_whoami_match_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(
        [b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"GETUSER", b"alice"], [b"ACL", b"GETUSER", b"nobody"],
        [b"ACL", b"DRYRUN", b"alice", b"SET", b"x", b"1"], [b"ACL", b"DRYRUN", b"alice", b"PUBLISH", b"c", b"m"],
        [b"ACL", b"DRYRUN", b"nobody", b"GET", b"a"], [b"ACL", b"DRYRUN", b"alice", b"NOSUCH"],
        [b"ACL", b"DRYRUN", b"alice", b"GET"], [b"ACL", b"WHOAMI"], [b"HELLO", b"3"], [b"ACL", b"GETUSER", b"alice"],
        [b"ACL", b"GETUSER", b"nobody"],
    )  # fmt: skip
    same_as_redis(mirror, guarded, script, redis_server)


def test_large_values_stream_through(tls_client: TLSClient) -> None:
    c = tls_client("admin", "admin-pw")
    big = b"\x00\xff" * (15 * 1024 * 1024)  # 30 MB
    assert c.set("cache:big", big) is True
    assert c.get("cache:big") == big
    c.delete("cache:big")


def test_monitor_stream(guarded: ProxyProc) -> None:
    with socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5) as m:
        m.sendall(cmds([b"AUTH", b"mon", b"mon-pw"], [b"MONITOR"]))
        time.sleep(0.3)
        assert read_until(m, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
        exchange(guarded.plain_port, cmds(LOGIN, [b"GET", b"cache:seen"]))
        time.sleep(0.3)
        stream = read_until(m, lambda d: b"cache:seen" in d)
        assert b'"GET" "cache:seen"' in stream
        assert b"alice-pw" not in stream and UPSTREAM_PASSWORD.encode() not in stream
    out = exchange(guarded.plain_port, cmds(LOGIN, [b"MONITOR"]))
    assert out.endswith(b"-NOPERM this user has no permissions to run the 'monitor' command\r\n")


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


def test_blocked_client_does_not_slow_others_and_releases_upstream(guarded: ProxyProc, redis_server: RedisProc) -> None:
    admin = redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    before = len(admin.client_list())
    s = socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=5)
    s.sendall(cmds(LOGIN, [b"BLPOP", b"cache:never", b"0"]))
    time.sleep(0.3)
    assert len(admin.client_list()) == before + 1
    start = time.monotonic()
    assert exchange(guarded.plain_port, cmds(LOGIN, [b"PING"])) == b"+OK\r\n+PONG\r\n"
    assert time.monotonic() - start < 3
    s.close()
    deadline = time.monotonic() + 5
    while len(admin.client_list()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(admin.client_list()) == before
    admin.close()


def test_upstream_restart_closes_client_cleanly(tmp_path: Path, certs: Path) -> None:
    r = start_redis()
    users = tmp_path / "users.acl"
    users.write_text("\n".join(POLICY) + "\n")
    p = start_proxy(tmp_path, certs, users, r.port)
    try:
        s = socket.create_connection(("127.0.0.1", p.plain_port), timeout=5)
        s.sendall(cmds(LOGIN, [b"BLPOP", b"cache:q", b"0"]))
        time.sleep(0.3)
        assert read_until(s, b"+OK\r\n") == b"+OK\r\n"
        r.stop()
        rest = b""
        while chunk := s.recv(100):
            rest += chunk
        assert rest == b""  # closed, as a direct client of the stopped Redis sees it
    finally:
        p.stop()
        r.stop()


def test_client_kill_on_redis_closes_the_client_as_redis_would(mirror: RedisProc, guarded: ProxyProc,
                                                               redis_server: RedisProc) -> None:  # fmt: skip
    """CLIENT KILL (here: of every normal client but the killer) on the upstream closes the proxied
    client's connection, after the replies Redis sent before; the same script straight to Redis."""
    script = cmds(LOGIN, [b"SET", b"cache:k", b"v"], [b"GET", b"cache:k"])
    for port in (mirror.port, guarded.plain_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(script)
            assert read_until(s, b"+OK\r\n+OK\r\n$1\r\nv\r\n") == b"+OK\r\n+OK\r\n$1\r\nv\r\n"
            target = mirror.port if port == mirror.port else redis_server.port
            user, pw = (b"mon", b"mon-pw") if port == mirror.port else (UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode())
            killed = raw_exchange(target, cmds([b"AUTH", user, pw], [b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"yes"]))
            assert killed.startswith(b"+OK\r\n:")
            assert read_until(s, lambda d: False, timeout=3) == b""  # EOF, no error line


def test_half_close_gets_every_reply(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    script = cmds(LOGIN, [b"SET", b"cache:h", b"1"], [b"INCR", b"cache:h"], [b"GET", b"other"], [b"GET", b"cache:h"])
    outs = []
    for port in (mirror.port, guarded.plain_port):
        _flush(mirror.port)
        _flush(redis_server.port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(script)
            s.shutdown(socket.SHUT_WR)
            outs.append(read_until(s, lambda d: False, timeout=3))
    assert outs[1] == outs[0] and outs[0].endswith(b"$1\r\n2\r\n")


def test_protected_commands_answer_as_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """DEBUG and MODULE LOAD are refused before AUTH and ACL, with Redis's text (enable-*-command no)."""
    same_as_redis(mirror, guarded, cmds([b"DEBUG", b"SLEEP", b"0"], [b"MODULE", b"LOAD", b"/x.so"], LOGIN,
                                        [b"DEBUG", b"SLEEP", b"0"], [b"MODULE", b"UNLOAD", b"x"]), redis_server)  # fmt: skip


def test_slow_reader_is_bounded(guarded: ProxyProc) -> None:
    """A client that pipelines 300 MB of replies and reads nothing: the proxy's memory stays small."""
    val = b"v" * (1 << 20)
    s = socket.create_connection(("127.0.0.1", guarded.plain_port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    s.sendall(cmds(LOGIN, [b"SET", b"cache:big1", val]))
    read_until(s, b"+OK\r\n+OK\r\n")
    threading.Thread(target=lambda: s.sendall(cmds(*[[b"GET", b"cache:big1"]] * 300)), daemon=True).start()
    time.sleep(2)
    rss = int(_group(rb"VmRSS:\s+(\d+)", Path(f"/proc/{guarded.proc.pid}/status").read_bytes()))
    assert rss < 150 * 1024, f"proxy RSS {rss} kB while a client is not reading"
    got = 0
    s.settimeout(10)
    reply = len(b"$%d\r\n" % len(val)) + len(val) + 2
    while got < 300 * reply:
        chunk = s.recv(1 << 20)
        assert chunk
        got += len(chunk)
    assert got == 300 * reply
    s.close()


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


def test_acl_answered_here_is_refused_inside_multi(guarded: ProxyProc) -> None:
    """Redis would queue ACL WHOAMI and answer it in EXEC's array; the proxy answers ACL from its own
    users, so inside MULTI it refuses instead (and EXEC aborts), never answering out of order."""
    out = exchange(guarded.plain_port, cmds(LOGIN, [b"MULTI"], [b"ACL", b"WHOAMI"], [b"GET", b"cache:a"], [b"EXEC"]))
    assert out == (b"+OK\r\n+OK\r\n-ERR redisguard: ACL WHOAMI inside MULTI is not supported\r\n+QUEUED\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n")  # fmt: skip


_MONITOR_LINE = re.compile(rb"\+\d+\.\d+ \[\d+ [^\]]+\] [^\r]*\r\n")


def test_pipelining_after_monitor(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """After MONITOR Redis still answers PING and RESET, refuses keyspace commands, and feeds the monitor
    stream in between: the same through redisguard (monitor lines normalized: times and addresses)."""
    script = cmds([b"AUTH", b"mon", b"mon-pw"], [b"MONITOR"], [b"PING"], [b"GET", b"cache:x"], [b"RESET"], [b"PING"])
    want = _MONITOR_LINE.sub(b"+MONITOR\r\n", exchange(mirror.port, script))
    got = _MONITOR_LINE.sub(b"+MONITOR\r\n", exchange(guarded.plain_port, script))
    assert got == want and want.endswith(b"+RESET\r\n-NOAUTH Authentication required.\r\n")


def test_protocol_error_after_valid_requests_matches_redis(mirror: RedisProc, guarded: ProxyProc,
                                                           redis_server: RedisProc) -> None:  # fmt: skip
    same_as_redis(mirror, guarded, cmds(LOGIN, [b"SET", b"cache:p", b"1"], [b"GET", b"cache:p"]) + b"*x\r\nPING\r\n",
                  redis_server)  # fmt: skip


def test_command_names_fold_ascii_only(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """Redis folds command names in ASCII only: the Kelvin sign in "\u212aEYS" does not make it KEYS."""
    same_as_redis(mirror, guarded, cmds(LOGIN, ["\u212aEYS".encode(), b"*"], [b"CONFIG", "G\u0130T".encode(), b"x"],
                                        [b"gEt", b"cache:x"]), redis_server)  # fmt: skip


@pytest.mark.parametrize("name, script", [(name, script) for name, script in [
    ("protocol error quoting CR", cmds(LOGIN) + b"*1\r\n\r\n"),
    ("protocol error quoting LF", cmds(LOGIN) + b"*1\r\n\n$3\r\n"),
    ("protocol error quoting a high byte", cmds(LOGIN) + b"*1\r\n\xff\r\n"),
    ("ACL DRYRUN naming a user with CR LF and a high byte",
     cmds([b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"DRYRUN", b"\r\n+OK\r\n\xff", b"GET", b"x"])),
    ("ACL DRYRUN naming a command with a NUL", cmds([b"AUTH", b"mon", b"mon-pw"], [b"ACL", b"DRYRUN", b"alice", b"g\0et\r\n"])),
    ("HELLO with an option holding CR LF", cmds([b"HELLO", b"2", b"\r\n:1\r\n"], LOGIN, [b"PING"])),
]], ids=lambda v: v if isinstance(v, str) else "")  # fmt: skip
def test_client_bytes_in_error_lines_match_redis(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc, name: str,
                                                 script: bytes) -> None:  # fmt: skip
    """addReplyErrorFormat: a client's CR or LF inside an error text becomes a space (the error line
    can never end early and fake a reply), a NUL ends the argument, other bytes are sent raw."""
    same_as_redis(mirror, guarded, script, redis_server)


def _monitored(port: int, run: Callable[[], object], user: bytes, password: bytes) -> list[bytes]:
    """The command names a MONITOR on the Redis at ``port`` sees while ``run`` runs (AUTH left out: the
    client's own login on one side, the proxy's upstream login on the other)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as m:
        m.sendall(cmds([b"AUTH", user, password], [b"MONITOR"]))
        assert read_until(m, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
        run()
        time.sleep(0.3)
        stream = read_until(m, lambda d: False, timeout=1.0)
    return [_group(rb'\] "([^"]*)"', line) for line in stream.split(b"\r\n")
            if line.startswith(b"+") and b'"' in line and b'] "auth"' not in line.lower()]  # fmt: skip


@pytest.mark.parametrize("name, script", [
    ("a refused command queued", [[b"MULTI"], [b"SET", b"cache:m", b"1"], [b"FLUSHALL"], [b"EXEC"]]),
    ("a refused key queued", [[b"MULTI"], [b"SET", b"cache:m", b"1"], [b"GET", b"other:k"], [b"EXEC"]]),
    ("lower case", [[b"multi"], [b"set", b"cache:m", b"1"], [b"flushall"], [b"exec"]]),
])  # fmt: skip
def test_monitor_sees_the_failed_exec_as_redis_does(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc,
                                                    name: str, script: list[list[bytes]]) -> None:  # fmt: skip
    """Redis's test "MONITOR correctly handles multi-exec cases": a transaction aborted by a refusal
    shows MULTI then EXEC (the refused command is never fed to monitors); through redisguard Redis
    sees the same, not a DISCARD."""
    data = cmds(LOGIN, *script)
    want = _monitored(mirror.port, lambda: exchange(mirror.port, data), b"mon", b"mon-pw")
    got = _monitored(redis_server.port, lambda: exchange(guarded.plain_port, data),
                     UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode())  # fmt: skip
    assert [c.lower() for c in want] == [b"multi", b"exec"] and got == want
    assert exchange(guarded.plain_port, data) == exchange(mirror.port, data)  # and the client sees what Redis says
    assert redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD).get("cache:m") is None


def test_reply_off_exec_aborted_by_watch_live(proxy: ProxyProc, redis_server: RedisProc) -> None:
    """The same sequence straight to Redis and through redisguard gives the same bytes (after AUTH)."""
    import socket

    import redis as redis_py

    from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER

    def read_until(s: socket.socket, done: Callable[[bytes], bool]) -> bytes:
        out = b""
        while not done(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out

    def run(port: int, user: bytes, password: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_command([b"AUTH", user, password]) + encode_command([b"WATCH", b"session:w"]))
            assert read_until(s, lambda b: b.count(b"\r\n") >= 2) == b"+OK\r\n+OK\r\n"
            other = redis_py.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
            other.set("session:w", "changed")  # EXEC will abort
            other.close()
            s.sendall(b"".join(encode_command(a) for a in (
                [b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"SUBSCRIBE", b"events:x"], [b"EXEC"],
                [b"CLIENT", b"REPLY", b"ON"], [b"GET", b"session:w"], [b"PING"])))  # fmt: skip
            return read_until(s, lambda b: b.endswith(b"+PONG\r\n"))

    direct = run(redis_server.port, UPSTREAM_USER.encode(), UPSTREAM_PASSWORD.encode())
    proxied = run(proxy.plain_port, b"alice", b"alice-pw")
    assert proxied == direct == b"+OK\r\n$7\r\nchanged\r\n+PONG\r\n"


_SORTS = [
    [b"ACL", b"LOG", b"RESET"], [b"RPUSH", b"cache:l", b"3", b"1", b"2"], [b"MULTI"],
    [b"SORT", b"cache:l", b"GET", b"secret:*"], [b"INCR", b"cache:n"], [b"SORT", b"cache:l", b"BY", b"secret:*"],
    [b"SORT", b"cache:l", b"BY", b"nosort"], [b"SORT_RO", b"cache:l", b"GET", b"#"],
    [b"SORT", b"cache:l", b"BY", b"w*", b"GET", b"x", b"STORE", b"cache:d"], [b"SORT", b"cache:l", b"x", b"GET", b"#"],
    [b"EXEC"], [b"SORT", b"cache:l", b"GET", b"secret:*"], [b"GET", b"cache:n"], [b"EXISTS", b"cache:d"],
    [b"WATCH", b"cache:w"], [b"SET", b"cache:w", b"1"], [b"MULTI"], [b"SORT_RO", b"cache:l", b"BY", b"x*"], [b"EXEC"],
    [b"MULTI"], [b"SORT", b"cache:l", b"GET", b"#", b"GET", b"x"], [b"GET"], [b"EXEC"], [b"ACL", b"LOG"],
]  # fmt: skip


@pytest.mark.parametrize("login", [[b"AUTH", b"sorter", b"s-pw"], [b"HELLO", b"3", b"AUTH", b"sorter", b"s-pw"]],
                         ids=["resp2", "resp3"])  # fmt: skip
def test_sort_refusal_is_made_at_exec_as_redis_does(mirror, guarded, redis_server, login) -> None:  # type: ignore[no-untyped-def]
    """SORT's BY/GET check runs inside the command: Redis queues the SORT (+QUEUED), runs the rest of
    the transaction and puts the error in EXEC's array; no ACL LOG entry. The proxy forwards a stand-in
    (the real SORT would read keys the user may not), and nothing of it leaks: not its reply, no key."""
    out = same_as_redis(mirror, guarded, cmds(login, *_SORTS), redis_server)
    assert b"+QUEUED\r\n" * 7 + b"*7\r\n-ERR GET option of SORT denied" in out and out.endswith(b"*0\r\n")
