"""Pure tests of the guards."""

from __future__ import annotations

import ipaddress

from redisguard.guards import AuthThrottle, source_allowed


def test_source_allowed() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert source_allowed("10.1.2.3", nets)
    assert source_allowed("::ffff:10.1.2.3", nets)  # IPv4-mapped
    assert source_allowed("2001:db8::1%eth0", nets)
    assert not source_allowed("127.0.0.1", nets)
    assert not source_allowed("not-an-ip", nets)


def test_auth_throttle_budget_refills_and_is_bounded() -> None:
    now = [0.0]
    t = AuthThrottle(per_minute=3, max_sources=2, clock=lambda: now[0])
    for _ in range(3):
        assert not t.blocked("a")
        t.failed("a")
    assert t.blocked("a") and not t.blocked("b")
    now[0] += 20  # one failure's worth refills every 20 s
    assert not t.blocked("a")
    t.failed("b")
    t.failed("c")  # "a" is forgotten: memory stays bounded
    assert len(t._budget) == 2
    assert not AuthThrottle(0).blocked("x")
