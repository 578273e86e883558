"""Protocol fidelity, transactions: MULTI/EXEC/DISCARD/WATCH through redisguard as straight to Redis:
refusals queued, EXEC itself refused, ACL inside MULTI, SORT's refusal made at EXEC, what MONITOR sees
of an aborted EXEC, CLIENT REPLY OFF over an EXEC a WATCH aborts."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, read_until
from tests.system.conftest import LOGIN, _group, cmds, exchange, same_as_redis


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


def test_acl_answered_here_is_refused_inside_multi(guarded: ProxyProc) -> None:
    """Redis would queue ACL WHOAMI and answer it in EXEC's array; the proxy answers ACL from its own
    users, so inside MULTI it refuses instead (and EXEC aborts), never answering out of order."""
    out = exchange(guarded.plain_port, cmds(LOGIN, [b"MULTI"], [b"ACL", b"WHOAMI"], [b"GET", b"cache:a"], [b"EXEC"]))
    assert out == (b"+OK\r\n+OK\r\n-ERR redisguard: ACL WHOAMI inside MULTI is not supported\r\n+QUEUED\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n")  # fmt: skip


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
