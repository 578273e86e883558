"""Protocol fidelity, ACL introspection and MONITOR: ACL answered from redisguard's users as Redis
answers from its own (USERS, GETUSER, DRYRUN, WHOAMI), the MONITOR stream (no password in it), and
requests pipelined after MONITOR."""

from __future__ import annotations

import re
import socket
import time

from tests.helpers import UPSTREAM_PASSWORD, ProxyProc, RedisProc, read_until
from tests.system.conftest import LOGIN, cmds, exchange, same_as_redis


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


_MONITOR_LINE = re.compile(rb"\+\d+\.\d+ \[\d+ [^\]]+\] [^\r]*\r\n")


def test_pipelining_after_monitor(mirror: RedisProc, guarded: ProxyProc, redis_server: RedisProc) -> None:
    """After MONITOR Redis still answers PING and RESET, refuses keyspace commands, and feeds the monitor
    stream in between: the same through redisguard (monitor lines normalized: times and addresses)."""
    script = cmds([b"AUTH", b"mon", b"mon-pw"], [b"MONITOR"], [b"PING"], [b"GET", b"cache:x"], [b"RESET"], [b"PING"])
    want = _MONITOR_LINE.sub(b"+MONITOR\r\n", exchange(mirror.port, script))
    got = _MONITOR_LINE.sub(b"+MONITOR\r\n", exchange(guarded.plain_port, script))
    assert got == want and want.endswith(b"+RESET\r\n-NOAUTH Authentication required.\r\n")
