"""The upstream health check: ``redisguard_upstream_up`` stays true to Redis on a quiet host.

Client connections set the gauge when they open their upstream connection, but a host with no
traffic would show a dead Redis as up forever. Every ``[upstream] health_check_interval`` seconds
this opens a short-lived connection as the service user (its AUTH, then PING), bounded by
``connect_timeout`` plus a 2-second reply budget, off the clients' path. A failure counts in
``redisguard_upstream_errors_total{reason}`` (``auth``: Redis refused the service user's password) and
is logged once when the state changes — down, auth refused, recovered — never once per check.

In mirror mode each check also verifies the mirror users (Redis is the truth): their names after
every PING that answers, and fully (a login as each) when Redis is back after a failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from redisguard.config.model import Config
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics
from redisguard.upstream.client import UpstreamReplyError, upstream_request
from redisguard.upstream.identity import MirrorIdentity

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")

REPLY_TIMEOUT = 2.0


def failure_reason(e: BaseException) -> str:
    """A bounded label (one of metrics.UPSTREAM_ERROR_REASONS) for why a check failed."""
    if isinstance(e, UpstreamReplyError):
        code = e.reply.split(" ", 1)[0]
        return {"WRONGPASS": "auth", "NOAUTH": "auth", "NOPERM": "noperm"}.get(code, "error")
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ssl.SSLError):
        return "tls"
    if isinstance(e, ConnectionRefusedError | FileNotFoundError):
        return "refused"
    if isinstance(e, OSError):
        return "connect"
    return "error"


class UpstreamMonitor:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.state = ""  # "" before the first check, then "up" or the last failure reason
        self.task: asyncio.Future[None] | None = None
        self.mirror: MirrorIdentity | None = None  # [upstream] identity = "mirror": verified on each check

    async def check(self) -> str:
        """One check: updates the gauge and the counter, logs a change of state; returns the state."""
        up = self.config.upstream
        try:
            (pong,) = await asyncio.wait_for(upstream_request(self.config, [[b"PING"]], REPLY_TIMEOUT),
                                             up.connect_timeout + REPLY_TIMEOUT)  # fmt: skip
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            reason = failure_reason(e)
            self.metrics.upstream_errors.labels(reason).inc()
            self.metrics.upstream_up.set(0)
            self._changed(reason, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            return reason
        self.metrics.upstream_up.set(1)
        back = self.state not in ("", "up")
        self._changed("up", repr(pong))
        if self.mirror is not None:  # in the background (coalesced, at most one a second): PINGs keep their pace
            self.mirror.verify("reconnect" if back else "health", full=back)
        return "up"

    def _changed(self, state: str, detail: str) -> None:
        if state == self.state:
            return
        before, self.state = self.state, state
        up = self.config.upstream
        if state == "up":
            if before:
                log.info("upstream_recovered", upstream=up.where, was=before)
        elif state == "auth":
            audit.error("upstream_auth_failed", upstream=up.where, user=up.username or "default", error=detail,
                        detail="Redis refused the service user's AUTH: check [upstream] username and "
                        "password_file / password_env against the Redis ACL user (clients get 'upstream "
                        "authentication failed')")  # fmt: skip
        else:
            log.warning("upstream_down", upstream=up.where, reason=state, error=detail)

    async def run(self, interval: float) -> None:
        while True:
            await self.check()
            await asyncio.sleep(interval)

    def start(self) -> None:
        interval = self.config.upstream.health_check_interval
        if interval > 0 and self.task is None:
            self.task = asyncio.ensure_future(self.run(interval))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
