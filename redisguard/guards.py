"""Connection-level guards that need no I/O: source networks and AUTH brute-force throttling.

server.py asks these where it accepts connections (and counts connections per listener itself).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_allowed(host: str, networks: Iterable[Network]) -> bool:
    """The firewall rule: is the peer address inside one of ``networks``? (IPv4-mapped IPv6 counts as IPv4.)"""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


class AuthThrottle:
    """Per-source limit on failed AUTHs: a sliding budget of ``per_minute`` failures.

    A source over budget gets ``-WRONGPASS`` without its password being checked (so guessing is
    pointless, and the answer does not tell it that it is being throttled) until its budget refills.
    Memory is bounded: at most ``max_sources`` addresses are remembered, oldest forgotten first."""

    def __init__(self, per_minute: float, max_sources: int = 65536, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.max_sources = max_sources
        self.clock = clock
        self._budget: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, last)

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def _tokens(self, source: str) -> float:
        tokens, last = self._budget.get(source, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - last) * self.rate)

    def blocked(self, source: str) -> bool:
        return self.enabled and self._tokens(source) < 1

    def failed(self, source: str) -> None:
        if not self.enabled:
            return
        tokens = self._tokens(source) - 1
        self._budget[source] = (max(tokens, 0.0), self.clock())
        self._budget.move_to_end(source)
        while len(self._budget) > self.max_sources:
            self._budget.popitem(last=False)
