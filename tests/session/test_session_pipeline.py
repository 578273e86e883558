"""The session's pipeline, sans-IO: requests parsed and relayed in order, refusals slotted in place
whatever the split of Redis's replies, costly decisions made off the loop (and made again after a
revocation), the estimated work of one turn bounded."""

from __future__ import annotations

import pytest

from redisguard import fast
from redisguard.acl import parse_users
from redisguard.policy.decide import Policy, Shared, decide
from redisguard.protocol.resp import encode_command
from redisguard.session.effects import Offload
from redisguard.session.machine import Session
from redisguard.session.pipeline import OFFLOAD_ARGC, TURN_NS, cost_of
from tests.session.conftest import TABLE, forwarded, session


def offload_argv(s: Session) -> list[bytes]:
    """The request the session waits to have decided off the loop."""
    assert isinstance(s.effect, Offload)
    return s.effect.argv


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
    assert s.paused and s.effect == Offload(argv) and not s.to_upstream  # nothing decided on the loop
    s.client_data(encode_command([b"GET", b"report:x"]))  # arrives while paused: queued behind
    s.offloaded(*s.decide_offloaded(offload_argv(s)))
    assert not s.paused
    assert forwarded(s) == [argv, [b"PING"], [b"GET", b"report:x"]]
    s.upstream_data(b"*%d\r\n" % (len(argv) - 1) + b"$-1\r\n" * (len(argv) - 1) + b"+PONG\r\n$-1\r\n")
    denied = [b"MGET", *[b"report:%d" % i for i in range(OFFLOAD_ARGC)], b"secret"]
    s.to_upstream.clear()
    s.client_data(encode_command(denied))
    s.offloaded(*s.decide_offloaded(offload_argv(s)))
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
    assert (s.effect == Offload(argv)) is offloaded if fast.COMPILED else (s.effect == Offload(argv) or not offloaded)
    if s.effect is not None:
        assert s.paused and not s.to_upstream
        s.offloaded(*s.decide_offloaded(offload_argv(s)))
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


def test_a_verdict_made_off_the_loop_is_not_used_after_a_revocation() -> None:
    users = parse_users("user default off\nuser ops on >ops-pw ~* +@all\n", TABLE)
    s = Session(Shared(Policy(TABLE, users)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"ops", b"ops-pw"]))
    big = [b"MGET", *[b"k%d" % i for i in range(OFFLOAD_ARGC + 1)]]
    s.client_data(encode_command(big))
    job = s.decide_offloaded(offload_argv(s))  # decided as +@all ...
    revoked = parse_users("user default off\nuser ops on >ops-pw ~* -@all +ping\n", TABLE)
    s.shared.swap(s.policy.with_users(revoked), {"ops"}, [])
    s.rebind(revoked, {"ops"}, [])  # ... but ACL SETUSER took +@all away meanwhile
    s.to_upstream.clear()
    s.offloaded(*job)
    assert s.paused and s.effect == Offload(big) and not s.to_upstream  # decided again, off the loop
    s.offloaded(*s.decide_offloaded(offload_argv(s)))
    assert not s.to_upstream and s.to_client[-1].startswith(b"-NOPERM this user has no permissions to run the 'mget'")


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
