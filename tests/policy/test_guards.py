"""Pure tests of the guards (no sockets; the throttle runs on a fake clock)."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redisguard.policy.guards import AuthThrottle, source_allowed, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def throttle(per_minute: float = 20, **kw: Any) -> tuple[AuthThrottle, Clock]:
    clock = Clock()
    return AuthThrottle(per_minute, clock=clock, **kw), clock


def test_source_allowed() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert source_allowed("10.1.2.3", nets)
    assert source_allowed("::ffff:10.1.2.3", nets)  # IPv4-mapped
    assert source_allowed("2001:db8::1%eth0", nets)
    assert not source_allowed("127.0.0.1", nets)
    assert not source_allowed("not-an-ip", nets)


def test_source_key() -> None:
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"  # IPv4-mapped IPv6 counts as its IPv4
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"  # same /64, same key
    assert source_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"  # next /64, another key
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("[2001:db8::1]") == "2001:db8::/64"
    assert source_key("::1") == "::/64"
    assert source_key("unix") == "unix"  # not an address: unchanged
    assert source_key("") == ""


# -- the lockout the security review found ------------------------------------------------------


def simulate(attacker_users: list[str], seconds: float = 60.0, per_minute: float = 20,
             max_delay: float = 2.0) -> tuple[list[float], list[bool], list[float]]:  # fmt: skip
    """One source address shared by an attacker (10 wrong AUTHs per second, each on its own connection,
    so its waits overlap) and alice (the right password every 0.8 s). Each AUTH is evaluated after the
    delay the throttle gave it on arrival; returns alice's delays and whether each of her logins worked."""
    t, clock = throttle(per_minute, max_delay=max_delay)
    source = source_key("192.0.2.7")
    events: list[tuple[float, int, str, str]] = []  # (time, tie-breaker, phase, who)
    seq = itertools.count()
    for i in range(int(seconds * 10)):
        heapq.heappush(events, (i * 0.1, next(seq), "arrive", attacker_users[i % len(attacker_users)]))
    for i in range(int(seconds / 0.8)):
        heapq.heappush(events, (0.05 + i * 0.8, next(seq), "arrive", "legit-alice"))
    alice_delays: list[float] = []
    alice_ok: list[bool] = []
    attacker_delays: list[float] = []
    while events:
        clock.now, _, phase, who = heapq.heappop(events)
        user = "alice" if who == "legit-alice" else who
        if phase == "arrive":
            d = t.delay(source, user)
            assert 0.0 <= d <= max_delay
            (alice_delays if who == "legit-alice" else attacker_delays).append(d)
            heapq.heappush(events, (clock.now + d, next(seq), "check", who))
        elif who == "legit-alice":  # the password is checked after the wait, and it is right
            t.succeeded(source, user)
            alice_ok.append(True)
        else:
            t.failed(source, user)
    return alice_delays, alice_ok, attacker_delays


@pytest.mark.parametrize(
    "attacker_users",
    [["alice"], [f"rnd{i}" for i in range(600)], ["alice", "bob", "admin", "root"]],
    ids=["against-alice", "random-users", "spray"],
)
def test_wrong_password_flood_cannot_lock_out_the_right_password(attacker_users: list[str]) -> None:
    alice_delays, alice_ok, attacker_delays = simulate(attacker_users)
    assert len(alice_ok) == len(alice_delays) == 75  # 75 of 75 logins (the old throttle: 0 of 75)
    assert max(alice_delays) <= 2.0
    # ...and the attacker is slowed: once its budget is spent, its attempts wait the full max_delay.
    assert attacker_delays[100:] == [2.0] * len(attacker_delays[100:])


def test_lockout_scenario_with_other_settings() -> None:
    for per_minute, max_delay in [(1, 0.5), (5, 1.0), (600, 3.0)]:
        alice_delays, alice_ok, _ = simulate(["alice"], per_minute=per_minute, max_delay=max_delay)
        assert len(alice_ok) == 75 and max(alice_delays) <= max_delay


# -- semantics ----------------------------------------------------------------------------------


def test_constants_follow_per_minute() -> None:
    t, _ = throttle(20)
    assert t.enabled and t.free == 5 and t.rate == pytest.approx(1 / 3) and t.steps_to_max == 7
    assert throttle(3)[0].free == 1 and throttle(1)[0].free == 1 and throttle(0.5)[0].free == 1
    with pytest.raises(ValueError):
        AuthThrottle(-1)
    with pytest.raises(ValueError):
        AuthThrottle(10, max_entries=0)


def test_progressive_delay_per_pair() -> None:
    t, _ = throttle(8)  # free = 2, source budget 8
    seen = []
    for _ in range(12):
        seen.append(t.delay("s", "alice"))
        t.failed("s", "alice")
    assert seen == [0, 0, 0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert t.throttled("s", "alice")
    assert not t.throttled("s2", "alice")  # another source is not affected
    # The pair's delay is not the source's: another user from s is delayed only by the source budget.
    assert t.delay("s", "bob") == 0.4  # 12 failures from s: 4 past its budget of 8
    assert not t.throttled("other", "bob")


def test_source_budget_across_users() -> None:
    t, _ = throttle(8)
    seen = []
    for i in range(12):
        seen.append(t.delay("s", "fresh"))
        t.failed("s", f"user{i}")  # one failure per user: no pair ever gets past its free failures
    assert seen == [0] * 9 + [0.05, 0.1, 0.2]
    assert t.delay("s", "user3") == 0.4 and t.delay("t", "fresh") == 0


def test_failures_decay() -> None:
    t, clock = throttle(6)  # free = 1; one failure forgiven every 10 s
    for _ in range(4):
        t.failed("s", "alice")
    assert t.delay("s", "alice") == 0.2
    clock.now += 10
    assert t.delay("s", "alice") == 0.1
    clock.now += 5  # half a failure forgiven: a partly drained failure still counts
    assert t.delay("s", "alice") == 0.1
    clock.now += 5
    assert t.delay("s", "alice") == 0.05
    clock.now += 10
    assert t.delay("s", "alice") == 0  # back within the free failure: an honest typo is forgotten
    t.failed("s", "alice")
    assert t.delay("s", "alice") == 0.05  # 1 left + 1 new
    clock.now += 1000
    assert t.delay("s", "alice") == 0


def test_counters_are_capped_so_an_attack_is_forgotten_quickly() -> None:
    t, clock = throttle(20)  # rate 1/3 per second, steps_to_max 7
    for _ in range(10_000):
        t.failed("s", "alice")
    assert t.delay("s", "alice") == 2.0
    clock.now += 7 * 3 - 0.01
    assert 0 < t.delay("s", "alice") <= 0.05 + 1e-9
    clock.now += 0.02
    assert t.delay("s", "alice") == 0  # 21 s after the last of 10 000 failures, not 10 000 * 3 s


def test_succeeded_resets_the_pair_not_the_source() -> None:
    t, _ = throttle(8)
    for _ in range(8):
        t.failed("s", "mallory")
    assert t.delay("s", "mallory") == 1.6  # pair: 6 past the free 2; source: at its budget, not past it
    t.succeeded("s", "mallory")
    assert t.delay("s", "mallory") == 0
    t.failed("s", "mallory")
    # The pair starts again from nothing, but the source still remembers all 9 failures: logging in to
    # one's own account between guesses does not buy a fresh source budget.
    assert t.delay("s", "mallory") == 0.05 and t.delay("s", "alice") == 0.05
    t.succeeded("s", "never-failed")  # harmless


def test_time_going_backwards_adds_nothing() -> None:
    t, clock = throttle(6)
    clock.now = 100
    for _ in range(3):
        t.failed("s", "a")
    clock.now = 50
    assert t.delay("s", "a") == 0.1


def test_disabled() -> None:
    t, clock = throttle(0)
    assert not t.enabled
    for _ in range(1000):
        t.failed("s", "alice")
        assert t.delay("s", "alice") == 0 and not t.throttled("s", "alice")
    assert not t._pairs and not t._sources
    assert AuthThrottle(0).delay("x", "y") == 0


def test_zero_max_delay_never_delays() -> None:
    t, _ = throttle(1, max_delay=0)
    for _ in range(50):
        t.failed("s", "a")
    assert t.delay("s", "a") == 0


# -- memory -------------------------------------------------------------------------------------


def test_memory_bounded_under_a_flood_of_users_and_sources() -> None:
    t, clock = throttle(20, max_entries=1000)
    for i in range(100_000):
        t.failed("s", f"random-user-{i}")
        t.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "alice")
        clock.now += 0.001
    assert len(t._pairs) == 1000 and len(t._sources) == 1000
    assert t.delay("s", "anyone") == 2.0  # the flooding source is still remembered and slowed
    t2, _ = throttle(20)  # the default bound, 65536
    for i in range(100_000):
        t2.failed(f"src{i}", f"user{i}")
    assert len(t2._pairs) == len(t2._sources) == 65536


def test_delay_creates_no_state() -> None:
    t, _ = throttle(20, max_entries=10)
    for i in range(1000):
        t.delay(f"s{i}", f"u{i}")
        t.throttled(f"s{i}", f"u{i}")
    assert not t._pairs and not t._sources


def test_a_pair_under_attack_stays_remembered_while_it_keeps_failing() -> None:
    # Eviction is least-recently-failed first: a pair that keeps failing is refreshed each time, so a
    # flood of other names must exceed max_entries between two of its failures to push it out.
    t, _ = throttle(8, max_entries=100)
    rng = random.Random(1)
    for _ in range(20):
        t.failed("s", "alice")
        for _ in range(99):
            t.failed(f"src{rng.random()}", f"u{rng.random()}")
    assert t.delay("s", "alice") == 2.0
    # Trade-off: more than max_entries other failures in between do forget it, which only means less
    # throttling for that pair, never a lockout.
    for i in range(100):
        t.failed(f"x{i}", "u")
    assert t.delay("s", "alice") == 0


# -- properties ---------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["fail", "ok", "delay"]),
        st.sampled_from(["s1", "s2", "s3"]),
        st.sampled_from(["alice", "bob", "x"]),
        st.floats(min_value=0, max_value=30, allow_nan=False),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    per_minute=st.floats(min_value=0, max_value=10_000, allow_nan=False),
    max_delay=st.floats(min_value=0, max_value=10, allow_nan=False),
    max_entries=st.integers(min_value=1, max_value=4),
    steps=ops,
)
def test_delay_is_always_within_bounds(
    per_minute: float, max_delay: float, max_entries: int, steps: list[tuple[str, str, str, float]]
) -> None:
    t, clock = throttle(per_minute, max_delay=max_delay, max_entries=max_entries)
    for op, source, user, dt in steps:
        clock.now += dt
        if op == "fail":
            t.failed(source, user)
        elif op == "ok":
            t.succeeded(source, user)
        d = t.delay(source, user)
        assert 0.0 <= d <= max_delay
        assert t.throttled(source, user) == (d > 0)
        if per_minute == 0:
            assert d == 0
        assert len(t._pairs) <= max_entries and len(t._sources) <= max_entries


@settings(max_examples=200, deadline=None)
@given(per_minute=st.floats(min_value=0.1, max_value=1000, allow_nan=False), n=st.integers(0, 60))
def test_more_failures_never_mean_less_delay(per_minute: float, n: int) -> None:
    t, _ = throttle(per_minute)
    last = 0.0
    for _ in range(n):
        t.failed("s", "alice")
        d = t.delay("s", "alice")
        assert d >= last
        last = d
