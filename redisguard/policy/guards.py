"""Connection-level guards that need no I/O: source networks and AUTH brute-force throttling.

server.py asks these where it accepts connections (and counts connections per listener itself).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def source_key(host: str) -> str:
    """The key AUTH throttling counts a peer address under: IPv4 as is, IPv4-mapped IPv6 as its IPv4,
    other IPv6 as its /64 (one subscriber or host usually owns a whole /64, so per-address keys would
    let it rotate to a fresh budget per guess). Zone ids (``%eth0``) and brackets are dropped; anything
    that is not an IP address (a unix socket peer) is returned unchanged. Pass the address only, no port."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


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
    """AUTH brute-force throttling by *delay*, never by refusal.

    Theory of operation
    -------------------
    The session asks :meth:`delay` when an AUTH arrives, waits that many seconds, then checks the
    password exactly as it would without a throttle, and reports the outcome with :meth:`failed` or
    :meth:`succeeded`. A correct password therefore always succeeds, at worst ``max_delay`` seconds
    late: a flood of wrong passwords from a shared address (NAT, loopback, a load balancer) slows the
    honest client down but cannot lock it out. (The old design refused over-budget AUTHs unchecked,
    which let ~10 wrong AUTHs/s lock out every client behind the same address.)

    Two failure counters, each a leaky bucket that drains at ``per_minute / 60`` failures per second
    (so an honest typo is forgotten, and a burst is forgiven in about a minute per ``per_minute``):

    * per (source, user) pair: the first ``free = max(1, per_minute // 4)`` failures cost nothing; each
      further failure doubles the delay, from ``BASE_DELAY`` (0.05 s) up to ``max_delay``.
    * per source, across all users: failures beyond the ``per_minute`` budget delay *every* AUTH from
      that source (same doubling from ``BASE_DELAY``, same cap), so spraying many user names from one
      address is slowed down too. A success does not reset it: an attacker could otherwise reset its
      budget by logging into its own account between guesses.

    ``delay = max(pair delay, source delay)``, always in ``[0, max_delay]``, and computed from the
    state when the attempt arrives: attempts that are already waiting do not lengthen each other's
    waits. A counter stops growing where its delay reaches ``max_delay`` (``steps_to_max`` past its
    threshold), so after an attack stops the delay is gone within ``steps_to_max / rate`` seconds
    (21 s at the default 20 per minute).

    What this does not do: it paces each attempt, not each source, so an attacker with many
    concurrent connections gets about ``connections / max_delay`` guesses per second from one address;
    the per-source connection limits bound that. Nor does it count failures per user across sources
    (a distributed guesser against one account is slowed only per pair).

    Keys. ``source`` is taken as given (a string, no port). Pass ``source_key(host)`` so that an IPv6
    client cannot rotate through the 2**64 addresses of its own /64 to get a fresh budget for each.
    ``user`` is the name the client sent, known or not, so a flood of random user names creates pairs;
    that is what the memory bound is for.

    Memory. At most ``max_entries`` pairs and ``max_entries`` sources are remembered, least recently
    failed first forgotten (OrderedDict, O(1) per call). Only failures create entries; :meth:`delay`
    never does. Trade-off: a flood of failures with random user names (or from many sources) can
    push an older entry out, and a forgotten entry means *less* throttling for it, never a lockout.
    An entry under active attack is refreshed by every failure, so pushing it out needs more than
    ``max_entries`` other failures between two of its own, and from one source those failures are
    themselves slowed by that source's counter (which they refresh rather than evict).
    """

    BASE_DELAY = 0.05  # seconds: the first delay past the free failures; doubles per further failure
    _EPS = 1e-6  # counters are floats that drain continuously; ignore rounding crumbs

    def __init__(
        self,
        per_minute: float,
        max_entries: int = 65536,
        max_delay: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 0 or max_delay < 0 or max_entries < 1:
            raise ValueError("AuthThrottle: per_minute and max_delay must be >= 0 and max_entries >= 1")
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0  # failures forgiven per second
        self.free = max(1, int(self.per_minute // 4))  # failures per (source, user) that cost nothing
        self.max_entries = max_entries
        self.max_delay = float(max_delay)
        self.clock = clock
        # Failures past a threshold that already bring the delay to max_delay; counters stop there.
        ratio = self.max_delay / self.BASE_DELAY
        self.steps_to_max = 1 + (math.ceil(math.log2(ratio)) if ratio > 1 else 0)
        self._pairs: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()  # -> (failures, at)
        self._sources: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (failures, at)

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    # -- queries -----------------------------------------------------------------------------------
    def delay(self, source: str, user: str) -> float:
        """Seconds to wait before checking this AUTH attempt's password (then check it normally)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        pair = self._level(self._pairs.get((source, user)), now)
        src = self._level(self._sources.get(source), now)
        return max(self._delay_for(pair - self.free), self._delay_for(src - self.per_minute))

    def throttled(self, source: str, user: str) -> bool:
        """Would this attempt be delayed? (For metrics labels and audit reasons.)"""
        return self.delay(source, user) > 0

    # -- outcomes ----------------------------------------------------------------------------------
    def failed(self, source: str, user: str) -> None:
        """Record a failed AUTH (wrong password, unknown or disabled user) after it was checked."""
        if not self.enabled:
            return
        now = self.clock()
        self._bump(self._pairs, (source, user), self.free + self.steps_to_max, now)
        self._bump(self._sources, source, self.per_minute + self.steps_to_max, now)

    def succeeded(self, source: str, user: str) -> None:
        """Forget the pair's failures; the source's counter stays (see the class docstring)."""
        self._pairs.pop((source, user), None)

    # -- internals ---------------------------------------------------------------------------------
    def _level(self, entry: tuple[float, float] | None, now: float) -> float:
        if entry is None:
            return 0.0
        failures, at = entry
        return max(0.0, failures - max(0.0, now - at) * self.rate)

    def _delay_for(self, excess: float) -> float:
        steps = math.ceil(excess - self._EPS)  # a partly drained failure still counts as one
        if steps <= 0:
            return 0.0
        if steps >= self.steps_to_max:
            return self.max_delay
        return min(self.max_delay, self.BASE_DELAY * 2.0 ** (steps - 1))

    def _bump(self, table: OrderedDict[Any, tuple[float, float]], key: Any, cap: float, now: float) -> None:
        failures = min(cap, self._level(table.get(key), now) + 1.0)
        table[key] = (failures, now)
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)
