"""Logging: structlog, JSON by default, readable console output on a TTY.

Audit events (one per verdict that matters) carry ``event``, ``user``, ``command``, ``reason``,
``listener``, ``peer``, ``tls_identity``; never passwords, never argument values.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (PrintLogger writes the newline separately): [server] workers share stderr,
        # and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "redisguard") -> structlog.typing.FilteringBoundLogger:
    return cast(structlog.typing.FilteringBoundLogger, structlog.get_logger(name))  # the configured wrapper_class


class RateLimiter:
    """Token bucket for noisy events (denied commands, connections): a flood must not fill a disk.

    ``on_suppressed`` is called for every event the bucket drops (the suppressed-events counter)."""

    def __init__(self, per_second: float = 100.0, burst: int = 200, on_suppressed: Callable[[], Any] | None = None) -> None:
        self.rate = per_second
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.suppressed = 0
        self.on_suppressed = on_suppressed

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        if self.on_suppressed is not None:
            self.on_suppressed()
        return False

    def log(self, emit: Callable[..., Any], event: str, **fields: Any) -> None:
        """``emit(event, **fields)`` (e.g. ``audit.warning``) if the budget allows; else count it as suppressed."""
        if self.allow():
            emit(event, **fields)


class EventLimiter:
    """One :class:`RateLimiter` per event name, so a flood of one kind (rejected connections) does not
    hide the lines of another (accept failures, timeouts). Event names come from the code: bounded."""

    def __init__(self, per_second: float, on_suppressed: Callable[[], Any] | None = None) -> None:
        self.per_second = per_second
        self.on_suppressed = on_suppressed
        self.limiters: dict[str, RateLimiter] = {}

    def log(self, emit: Callable[..., Any], event: str, **fields: Any) -> None:
        limiter = self.limiters.get(event)
        if limiter is None:
            limiter = self.limiters[event] = RateLimiter(self.per_second, int(self.per_second * 2) + 1, self.on_suppressed)
        limiter.log(emit, event, **fields)
