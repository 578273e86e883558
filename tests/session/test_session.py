"""The session, sans-IO: bytes in, bytes out, no sockets. Fuzzed and driven by hand."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard import fast
from redisguard.acl import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared, decide
from redisguard.policy.guards import AuthThrottle
from redisguard.protocol.resp import encode_command
from redisguard.session.core import Mode, Session
from redisguard.session.pipeline import OFFLOAD_ARGC, TURN_NS, cost_of
from tests.redis_model import redis_parse

TABLE = CommandTable.snapshot()
USERS = parse_users(
    "user default off\n"
    "user bob on >bob-pw %R~report:* +get +mget +ping +client|reply +echo\n"
    "user alice on >alice-pw ~app:* &news +@all -@dangerous +monitor\n",
    TABLE,
)


def session(user: str | None = "bob", throttle: AuthThrottle | None = None) -> Session:
    s = Session(Shared(Policy(TABLE, USERS), throttle=throttle), "test", "10.0.0.1:5000")
    if user:
        s.client_data(encode_command([b"AUTH", user.encode(), user.encode() + b"-pw"]))
        assert s.to_client == [b"+OK\r\n"]
        s.to_client.clear()
    return s


def forwarded(s: Session) -> list[list[bytes]]:
    reqs, err = redis_parse(b"".join(s.to_upstream))
    assert err is None
    return reqs


def test_client_reply_skip_then_a_refusal_keeps_replies_in_place() -> None:
    """SKIP, then a request the proxy refuses itself: Redis never sees either, so the next replies are
    not shifted (a reply going to the wrong request would leak app:2 to the GET of app:1)."""
    s = session("alice")
    s.client_data(b"CLIENT REPLY SKIP\r\nGET victim:key\r\nGET app:1\r\nGET app:2\r\n")
    assert forwarded(s) == [[b"GET", b"app:1"], [b"GET", b"app:2"]]
    s.upstream_data(b"$2\r\nv1\r\n$2\r\nv2\r\n")
    assert b"".join(s.to_client) == b"$2\r\nv1\r\n$2\r\nv2\r\n"


def test_client_reply_skip_swallows_the_forwarded_reply() -> None:
    s = session("alice")
    s.client_data(b"CLIENT REPLY SKIP\r\nGET app:1\r\nGET app:2\r\n")
    assert forwarded(s) == [[b"GET", b"app:1"], [b"GET", b"app:2"]]  # SKIP itself stays here
    s.upstream_data(b"$2\r\nv1\r\n$2\r\nv2\r\n")
    assert b"".join(s.to_client) == b"$2\r\nv2\r\n"


def test_requests_before_a_protocol_error_run() -> None:
    s = session()
    s.client_data(b"GET report:1\r\nPING\r\n*x\r\nGET report:2\r\n")
    assert forwarded(s) == [[b"GET", b"report:1"], [b"PING"]]
    s.upstream_data(b"$-1\r\n+PONG\r\n")
    assert b"".join(s.to_client) == b"$-1\r\n+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    assert s.closing


def test_empty_multibulk_is_skipped() -> None:
    s = session()
    s.client_data(b"*0\r\n*1\r\n$4\r\nPING\r\n")
    assert forwarded(s) == [[b"PING"]] and not s.closing


def test_huge_request_is_decided_off_the_loop() -> None:
    s = session()
    argv = [b"MGET", *[b"report:%d" % i for i in range(OFFLOAD_ARGC + 1)]]
    s.client_data(encode_command(argv) + encode_command([b"PING"]))
    assert s.paused and s.offload == argv and not s.to_upstream  # nothing decided on the loop
    s.client_data(encode_command([b"GET", b"report:x"]))  # arrives while paused: queued behind
    s.offloaded(*s.decide_offloaded(s.offload))
    assert not s.paused
    assert forwarded(s) == [argv, [b"PING"], [b"GET", b"report:x"]]
    s.upstream_data(b"*%d\r\n" % (len(argv) - 1) + b"$-1\r\n" * (len(argv) - 1) + b"+PONG\r\n$-1\r\n")
    denied = [b"MGET", *[b"report:%d" % i for i in range(OFFLOAD_ARGC)], b"secret"]
    s.to_upstream.clear()
    s.client_data(encode_command(denied))
    s.offloaded(*s.decide_offloaded(s.offload))
    assert not s.to_upstream and s.to_client[-1].startswith(b"-NOPERM")


COST_USERS = parse_users(
    "user default off\n"
    "user pre on >pre-pw ~app:* ~cache:* +@all -@dangerous\n"
    "user glob on >glob-pw " + " ".join(f"~*:p{i}:*" for i in range(10)) + " +@all -@dangerous\n"
    "user many on >many-pw " + " ".join(f"~*:p{i}:*" for i in range(100)) + " +@all -@dangerous\n",
    TABLE,
)


@pytest.mark.parametrize(
    ("user", "argv", "offloaded"),
    [
        ("pre", [b"GET", b"app:" + b"x" * (1 << 20)], False),  # `app:*` is a startswith: cheap for any key
        ("pre", [b"SET", b"app:1", b"v" * (4 << 20)], False),  # a large value, nothing to match in it
        ("pre", [b"MSET", *[b"app:%d" % (i // 2) for i in range(1000)]], False),
        ("pre", [b"MGET", *[b"app:%d" % i for i in range(OFFLOAD_ARGC + 1)]], True),  # arguments alone
        ("glob", [b"GET", b":" * 1024], False),
        ("glob", [b"GET", b":" * (64 << 10)], True),  # 10 patterns x 64 KiB in the general matcher
        ("many", [b"GET", b":" * 512], False),
        ("many", [b"GET", b":" * (4 << 10)], True),
        ("many", [b"MSET", *[b"k:p9:%d" % (i // 2) for i in range(200)]], True),  # 100 calls per argument
    ],
)
def test_offload_is_decided_by_the_cost_of_matching(user: str, argv: list[bytes], offloaded: bool) -> None:
    """Not by size: what leaves the loop is what costs the user's patterns ~1 ms or more to check; the
    verdict and the order of replies are the same either way."""
    s = Session(Shared(Policy(TABLE, COST_USERS)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", user.encode(), user.encode() + b"-pw"]))
    s.to_client.clear()
    s.client_data(encode_command(argv) + encode_command([b"PING"]))
    # the figures are the compiled matcher's; the pure twin's estimate is higher, it offloads more
    assert (s.offload == argv) is offloaded if fast.COMPILED else (s.offload == argv or not offloaded)
    if s.offload is not None:
        assert s.paused and not s.to_upstream
        s.offloaded(*s.decide_offloaded(s.offload))
    want = [argv, [b"PING"]] if verdict_allows(s, argv) else [[b"PING"]]
    assert forwarded(s) == want


PREFIX_USERS = parse_users("user default off\nuser many on >many-pw " + " ".join(f"~p{i}:*" for i in range(1000)) + " +get\n",
                           TABLE)  # fmt: skip


@pytest.mark.parametrize("denied", [None, 7, 150])
def test_estimated_work_per_turn_is_bounded_fast_path_included(denied: int | None) -> None:
    """A pipeline of cheap requests (a GET against 1,000 patterns: far below OFFLOAD_NS each) is decided
    TURN_NS of estimated work per turn, on the fast path or not (a refusal at request ``denied``), and
    forwarded whole and in order over the turns (the refusal's reply waits in order behind the relayed)."""
    s = Session(Shared(Policy(TABLE, PREFIX_USERS)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"many", b"many-pw"]))
    s.to_client.clear()
    gets = [[b"GET", b"p999:%d" % i if i != denied else b"nomatch"] for i in range(300)]
    each = cost_of(s.user).of(gets[0])
    assert each < TURN_NS / 2  # never offloaded: only their number adds up
    s.client_data(b"".join(encode_command(g) for g in gets))
    per_turn = TURN_NS // each + 1  # the budget is checked before each request: it may run over by one
    turns, seen = 1, 0
    while True:
        now = len(forwarded(s))
        assert now - seen <= per_turn, (turns, now - seen)
        seen = now
        if not s.backlog:
            break
        s.resume()  # what the transport does on the next turn
        turns += 1
    assert turns >= 300 // per_turn
    assert forwarded(s) == [g for i, g in enumerate(gets) if i != denied]


def verdict_allows(s: Session, argv: list[bytes]) -> bool:
    return decide(s.policy, s.user, argv, False, False).error is None


def throttled_session() -> Session:
    """A client whose address has failed bob's password 3 times (per_minute=4: the next AUTH waits)."""
    s = session(None, AuthThrottle(per_minute=4, clock=lambda: 0.0))
    for i in range(3):
        s.client_data(encode_command([b"AUTH", b"bob", b"wrong%d" % i]))
        while s.paused:
            s.resume()
    assert s.to_client.count(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n") == 3
    s.to_client.clear()
    return s


def test_throttled_auth_waits_then_is_checked() -> None:
    s = throttled_session()
    s.client_data(encode_command([b"AUTH", b"bob", b"bob-pw"]) + encode_command([b"GET", b"report:1"]))
    assert s.paused and s.wait > 0 and not s.to_client and not s.to_upstream  # waits, nothing decided
    s.resume()
    assert s.to_client == [b"+OK\r\n"] and forwarded(s) == [[b"GET", b"report:1"]]


def test_throttle_holds_no_client_chosen_names() -> None:
    s = session(None, AuthThrottle(per_minute=4))
    for i in range(200):
        s.client_data(encode_command([b"AUTH", b"%d" % i + b"u" * 16000, b"x"]))
        while s.paused:
            s.resume()
    assert len(s.shared.throttle._pairs) == 1  # every unknown name shares one key per source


def test_throttled_auth_then_a_big_request_in_the_same_write() -> None:
    """The requests behind a throttled AUTH wait unparsed: they get the limits in force after the AUTH."""
    s = throttled_session()
    mget = [b"MGET", *[b"report:%d" % i for i in range(2000)]]
    s.client_data(encode_command([b"AUTH", b"bob", b"bob-pw"]))
    assert s.paused
    s.client_data(encode_command(mget))  # what the transport has already read, while paused
    s.resume()
    while s.paused:
        s.offloaded(*s.decide_offloaded(s.offload)) if s.offload is not None else s.resume()
    assert s.to_client == [b"+OK\r\n"] and forwarded(s) == [mget]


# -- fuzz: whatever the bytes, nothing bob may not run reaches Redis, and nothing escapes ----------
PIECES = [
    encode_command([b"GET", b"report:1"]), encode_command([b"GET", b"secret"]), encode_command([b"SET", b"report:1", b"x"]),
    encode_command([b"FLUSHALL"]), encode_command([b"MULTI"]), encode_command([b"EXEC"]),
    encode_command([b"CLIENT", b"REPLY", b"SKIP"]), encode_command([b"CLIENT", b"REPLY", b"OFF"]),
    encode_command([b"CLIENT", b"REPLY", b"ON"]), encode_command([b"HELLO", b"3"]), encode_command([b"RESET"]),
    encode_command([b"AUTH", b"alice", b"wrong"]), encode_command([b"AUTH", b"bob", b"bob-pw"]),
    b"GET report:2\r\n", b"FLUSHALL\r\n", b"~2\r\n$3\r\nGET\r\n$8\r\nreport:1\r\n", b"|1\r\n+x\r\n:1\r\n",
    b"%1\r\n*1\r\n$1\r\na\r\n$1\r\nb\r\n", b"*1\r\n", b"$4\r\n", b"\r\n", b"\x00", b"*0\r\n", b"PING\n",
    b"*2\r\n$3\r\nGET\r\n$3\r\nab\r\n", b'"open\r\n', b">1\r\n+a\r\n",
]  # fmt: skip


# CI runs a bounded budget; a longer run: REDISGUARD_FUZZ_EXAMPLES=200000 pytest tests/session/test_session.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("REDISGUARD_FUZZ_EXAMPLES", "400"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.lists(st.integers(1, 300), max_size=5))
def test_fuzz_nothing_denied_reaches_redis(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    s = session()
    user = s.user
    bounds = sorted({c for c in cuts if c < len(stream)})
    for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True):
        s.client_data(stream[a:b])
        while s.paused:
            s.offloaded(*s.decide_offloaded(s.offload)) if s.offload is not None else s.resume()
    for argv in forwarded(s):
        if argv[0].upper() in (b"AUTH", b"DISCARD", b"UNWATCH"):
            continue  # the proxy's own AUTH as the service user, and the DISCARD of an aborted EXEC
        if argv[0].upper() == b"RESET":
            break  # after RESET the session is `default` (off): the rest was decided for it
        v = decide(s.policy, user, argv, False)
        assert v.error is None, (argv, v)


def test_certificate_login_and_rebind_without_sockets() -> None:
    s = session(None)
    assert not s.login_certificate("nobody") and not s.authenticated
    assert s.login_certificate("bob") and s.authenticated and s.user.name == "bob"
    s.client_data(encode_command([b"GET", b"report:1"]))
    assert forwarded(s) == [[b"GET", b"report:1"]]
    # ACL SETUSER of another user: untouched; of bob: moved to the new rules; reload with bob changed: gone
    new = parse_users("user default off\nuser bob on >bob-pw %R~other:* +get\n", TABLE)
    assert s.rebind(new, {"alice"}, []) == "" and s.user is USERS["bob"]
    assert s.rebind(new, {"bob"}, []) == "" and s.user is new["bob"]
    assert s.rebind(USERS, None, []) == "user changed by reload"
    assert s.rebind(new, {"bob"}, ["bob"]) == "user deleted" or s.rebind({}, None, []) == "user deleted"


def test_exec_after_the_users_rules_changed_discards_the_transaction() -> None:
    """Redis checks every queued command again at EXEC; a revocation in between must not let them run."""
    s = session("alice")
    s.client_data(b"MULTI\r\nGET app:1\r\nSET app:1 x\r\n")
    s.upstream_data(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n")
    revoked = parse_users("user default off\nuser alice on >alice-pw ~other:* +@all -@dangerous\n", TABLE)
    s.shared.swap(s.policy.with_users(revoked), {"alice"}, [])
    assert s.rebind(revoked, {"alice"}, []) == ""
    s.to_upstream.clear()
    s.client_data(b"EXEC\r\n")
    # the queued GET/SET never run: a request Redis refuses at queue time marks the transaction, and
    # Redis aborts it at EXEC (as MONITOR would show it without the proxy)
    assert forwarded(s) == [[b"GET"], [b"EXEC"]]
    s.upstream_data(b"-ERR wrong number of arguments for 'get' command\r\n"
                    b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert s.to_client[-1].startswith(b"-EXECABORT Transaction discarded because of: NOPERM ACLs rules changed")


def test_a_verdict_made_off_the_loop_is_not_used_after_a_revocation() -> None:
    users = parse_users("user default off\nuser ops on >ops-pw ~* +@all\n", TABLE)
    s = Session(Shared(Policy(TABLE, users)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"ops", b"ops-pw"]))
    big = [b"MGET", *[b"k%d" % i for i in range(OFFLOAD_ARGC + 1)]]
    s.client_data(encode_command(big))
    assert s.offload is not None
    job = s.decide_offloaded(s.offload)  # decided as +@all ...
    revoked = parse_users("user default off\nuser ops on >ops-pw ~* -@all +ping\n", TABLE)
    s.shared.swap(s.policy.with_users(revoked), {"ops"}, [])
    s.rebind(revoked, {"ops"}, [])  # ... but ACL SETUSER took +@all away meanwhile
    s.to_upstream.clear()
    s.offloaded(*job)
    assert s.paused and s.offload == big and not s.to_upstream  # decided again, off the loop
    s.offloaded(*s.decide_offloaded(s.offload))
    assert not s.to_upstream and s.to_client[-1].startswith(b"-NOPERM this user has no permissions to run the 'mget'")


def test_deleted_users_session_decides_nothing_more() -> None:
    s = session("alice")
    s.kill()
    s.client_data(b"GET app:1\r\n")
    assert not s.to_upstream


def test_modes_follow_the_commands() -> None:
    s = session("alice")
    assert s.mode is Mode.NORMAL

    def after(request: bytes) -> Mode:
        s.client_data(request)
        return s.mode

    assert after(b"MULTI\r\n") is Mode.MULTI
    assert after(b"DISCARD\r\n") is Mode.NORMAL
    assert after(b"SUBSCRIBE news\r\n") is Mode.SUBSCRIBED and not s.idle
    s.upstream_data(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    assert after(b"UNSUBSCRIBE news\r\n") is Mode.NORMAL
    assert after(b"QUIT\r\n") is Mode.CLOSING
    m = session("alice")
    m.client_data(b"MONITOR\r\n")
    m.upstream_data(b"+OK\r\n")
    assert m.mode is Mode.MONITOR and not m.idle


def test_a_refusal_mid_pipeline_stays_in_place_whatever_the_reply_split() -> None:
    """GET / refused / GET / pub-sub message interleaved (RESP3 push): every split of Redis's bytes
    gives the client the same bytes, in request order."""
    replies = b"$2\r\nv1\r\n>3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n$2\r\nv2\r\n"
    want = None
    for cut in range(len(replies) + 1):
        s = session("alice")
        s.client_data(b"HELLO 3\r\n")
        s.upstream_data(b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
        s.data_for_client()
        s.client_data(b"GET app:1\r\nGET victim\r\nGET app:2\r\n")
        assert forwarded(s)[-2:] == [[b"GET", b"app:1"], [b"GET", b"app:2"]]
        s.upstream_data(replies[:cut])
        first = s.data_for_client()
        s.upstream_data(replies[cut:])
        got = first + s.data_for_client()
        want = want or got
        assert got == want
    assert want is not None
    assert want.startswith(b"$2\r\nv1\r\n-NOPERM this user has no permissions to access one of the keys used as "
                           b"arguments\r\n>3\r\n")
    assert want.endswith(b"$2\r\nv2\r\n")


def test_outputs_are_taken_once() -> None:
    s = session("alice")
    s.client_data(b"GET app:1\r\n")
    assert s.data_for_upstream() == b"*2\r\n$3\r\nGET\r\n$5\r\napp:1\r\n" and s.data_for_upstream() == b""
    s.upstream_data(b"$1\r\nx\r\n")
    assert s.data_for_client() == b"$1\r\nx\r\n" and s.data_for_client() == b""


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
