"""Red-team 4 regressions (each fails on the code as reviewed; see attacks/ for end-to-end scripts)."""

from __future__ import annotations

from redisguard.acl import new_user
from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.observe.least_privilege import suggest_file
from redisguard.observe.profile import TrafficProfile
from redisguard.policy.decide import Policy, Shared
from redisguard.protocol.resp import encode_command
from redisguard.session.core import Session


def test_plan_entries_stay_bounded_with_unknown_names(table: CommandTable) -> None:
    user = new_user("weak", table, ["on", "nopass", "-@all"])
    policy = Policy(table, {"weak": user})  # (it keeps its plans; a plan asks it while it is in force)
    plan = policy.plan(user, Session.special)
    for i in range(5000):
        plan.allowed([b"nosuch%d" % i])
        plan.allowed([b"NOSUCH%d" % i])
    assert len(plan.entries) <= 2 * len(table.commands)


def test_suggest_cannot_be_injected_through_key_names(table: CommandTable) -> None:
    get = table.get("get")
    for evil in (b"zz +@all allkeys", b"zz\nuser intruder on nopass +@all allkeys"):
        prof = TrafficProfile()
        for key in (b"cache:1", evil):
            prof.record("app", get, [b"GET", key], [(1, 1)], [])
        try:
            users = parse_users("user default off\n" + suggest_file(prof, None), table, require_default=True)
        except Exception:
            continue  # refusing to produce/load such a file is fine too
        assert set(users) == {"default", "app"}
        assert not users["app"].root.allcommands and not users["app"].root.allkeys
        assert "flushall" not in users["app"].root.allowed


def test_audited_user_cannot_change_other_users(table: CommandTable) -> None:
    users = parse_users("user default off\nuser legacy-app on >pw ~app:* +get\n"
                        "user prod-admin on >admin-pw ~* +@all\n", table, require_default=True)
    shared = Shared(Policy(table, users, audit_users=(b"legacy-*",)))
    s = Session(shared, "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"legacy-app", b"pw"]))
    s.client_data(encode_command([b"ACL", b"SETUSER", b"prod-admin", b"resetpass", b">pwned"]))
    if s.offload is not None:  # decided off the loop in the proxy: do it inline here
        s.offloaded(*s.decide_offloaded(s.offload))
    assert shared.policy.users["prod-admin"].check_password(b"admin-pw")
    assert not shared.policy.users["prod-admin"].check_password(b"pwned")


def test_reply_off_aborted_exec_with_subscribe_keeps_replies_in_order(table: CommandTable) -> None:
    """Under CLIENT REPLY OFF nothing would say whether EXEC ran (a WATCH can abort it): SUBSCRIBE inside
    MULTI after WATCH is refused then, so the proxy never guesses the subscription state."""
    users = parse_users("user default off\nuser app on >pw ~* &* +@all\n", table, require_default=True)
    s = Session(Shared(Policy(table, users)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"app", b"pw"]))
    assert s.data_for_client() == b"+OK\r\n"
    s.client_data(encode_command([b"WATCH", b"k"]))
    s.upstream_data(b"+OK\r\n")
    assert s.data_for_client() == b"+OK\r\n"
    for argv in ([b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"SUBSCRIBE", b"ch"], [b"EXEC"]):
        s.client_data(encode_command(argv))
    sent = s.data_for_upstream()
    # refused; the EXEC aborted upstream too (a request Redis refuses at queue time, then EXEC: no replies under OFF)
    assert b"SUBSCRIBE" not in sent and sent.endswith(encode_command([b"GET"]) + encode_command([b"EXEC"]))
    assert not s.subscribed and not s.paused
    s.client_data(encode_command([b"CLIENT", b"REPLY", b"ON"]))
    assert b"REPLY" in s.data_for_upstream()  # Redis must see it, else replies stay off for good
    s.upstream_data(b"+OK\r\n")
    assert s.data_for_client() == b"+OK\r\n"
    s.client_data(encode_command([b"GET", b"k"]))
    s.upstream_data(b"$1\r\nv\r\n")
    assert s.data_for_client() == b"$1\r\nv\r\n"


def test_exec_with_subscribe_holds_the_pipeline_until_its_reply(table: CommandTable) -> None:
    """Whether EXEC ran (WATCH can abort it) decides whether a RESP2 client is subscribed, which decides
    what comes next: requests behind such an EXEC are decided only once its reply is in."""
    users = parse_users("user default off\nuser app on >pw ~* &* +@all\n", table, require_default=True)
    for reply, subscribed in ((b"*-1\r\n", False), (b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", True)):
        s = Session(Shared(Policy(table, users)), "test", "10.0.0.1:5000")
        s.client_data(encode_command([b"AUTH", b"app", b"pw"]))
        s.data_for_client()
        s.client_data(b"".join(encode_command(a) for a in ([b"MULTI"], [b"SUBSCRIBE", b"ch"], [b"EXEC"], [b"GET", b"k"])))
        assert b"GET" not in s.data_for_upstream() and s.paused  # held behind EXEC
        s.upstream_data(b"+OK\r\n+QUEUED\r\n" + reply)
        assert s.subscribed == subscribed and not s.paused
        s.resume()  # what the transport does when the session is no longer held
        if subscribed:  # RESP2 subscribed context: Redis would refuse GET, so does the proxy
            assert b"GET" not in s.data_for_upstream()
            assert s.data_for_client().endswith(b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / "
                                                b"(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n")
        else:
            assert s.data_for_upstream() == encode_command([b"GET", b"k"])


def test_reply_off_exec_aborted_by_watch_live(proxy, redis_server) -> None:  # type: ignore[no-untyped-def]
    """The same sequence straight to Redis and through redisguard gives the same bytes (after AUTH)."""
    import socket

    import redis as redis_py

    from .helpers import UPSTREAM_PASSWORD, UPSTREAM_USER

    def read_until(s: socket.socket, done) -> bytes:  # type: ignore[no-untyped-def]
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
