"""A proxy's upkeep besides serving: the timer that measures event-loop lag and now and then hands freed
memory back to the OS, the policy digest kept current for scrapes, and the process's descriptor limit."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import time
from collections.abc import Callable

from redisguard.observe.audit import get_logger
from redisguard.transport.context import ConnectionContext

log = get_logger("redisguard")

# The housekeeping timer: event-loop lag is how late it fires; it also decides when to trim memory.
TICK = 0.25
# malloc_trim(0) only after at least this many TLS handshakes or closed connections since the last
# trim: a handshake's transient buffers (tens of KiB) stay in glibc's free lists otherwise, and a burst of
# handshakes would leave the resident size far above what the connections hold.
TRIM_AFTER_CHURN = 64


class Housekeeping:
    """The tick and the policy digest of one proxy (``ctx``: its config, policy, metrics, churn)."""

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        self.metrics = ctx.metrics
        self.trim = malloc_trim()
        self.next_trim = 0.0
        self.tick_due = 0.0
        self.tick_handle: asyncio.TimerHandle | None = None
        self.policy_key: tuple[bytes, frozenset[str], bool] | None = None  # what the policy digest was made of
        self.metrics.before_render.append(self.policy_info)
        self.policy_info()

    def start(self) -> None:
        self.tick_due = time.monotonic() + TICK
        self.tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stop(self) -> None:
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None

    def _tick(self) -> None:
        """Every TICK seconds: observe how late this timer fired (event-loop lag); now and then, give
        memory freed by closed connections back to the OS (glibc keeps it otherwise)."""
        now = time.monotonic()
        self.metrics.event_loop_lag.observe(max(0.0, now - self.tick_due))
        self.tick_due = now + TICK
        self.tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)
        ctx = self.ctx
        interval = ctx.config.limits.memory_trim_interval  # (ctx.config: the running config, after reloads too)
        if interval and self.trim is not None and now >= self.next_trim and ctx.churn_since_trim >= TRIM_AFTER_CHURN:
            self.next_trim = now + interval
            churn, ctx.churn_since_trim = ctx.churn_since_trim, 0
            self.trim()
            self.metrics.malloc_trims.inc()
            log.debug("malloc_trim", churn=churn, seconds=round(time.monotonic() - now, 4))

    def policy_info(self) -> None:
        """Before a scrape: the digest of the policy in force, once its ACL LIST reply is built (off the
        loop after every change; until then the previous digest stays, for a moment)."""
        shared = self.ctx.shared
        replies, policy = shared.acl_replies, shared.policy
        listed = replies.listed if replies is not None and replies.users is policy.users else None
        if listed is not None:
            key = (listed, policy.disabled, policy.audit_all)
            if key != self.policy_key:  # (hashed once per change, not per scrape)
                self.policy_key = key
                self.metrics.set_policy_digest(policy.digest(listed))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (if allowed) and return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def open_fds() -> int:
    """File descriptors open now (Linux /proc; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 32


def malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), which hands free heap pages back to the OS; None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))
