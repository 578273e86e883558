"""Session events → Prometheus metrics and structlog audit lines (the metrics/audit adapter)."""

from __future__ import annotations

from redisguard.acl import User
from redisguard.acl.user import printable_name
from redisguard.observe.audit import RateLimiter, get_logger
from redisguard.observe.metrics import Metrics
from redisguard.policy.ports import ClientInfo

audit = get_logger("redisguard.audit")


class Observer:
    """Turns session events into metrics and audit-log lines."""

    def __init__(
        self,
        metrics: Metrics,
        users: dict[str, User],
        count: bool = True,
        audit_keys: bool = False,
        rate: float = 100.0,
    ) -> None:
        self.metrics = metrics
        self.users = users
        self.count = count  # false: no per-request metrics (to measure what they cost)
        self.audit_keys = audit_keys
        self.limiter = RateLimiter(per_second=rate, burst=int(rate * 2) + 1, on_suppressed=metrics.audit_suppressed.inc)
        self._allowed: dict[tuple[str, str], int] = {}
        metrics.before_render.append(self.flush)

    def flush(self) -> None:
        """Move the allowed-command tallies into redisguard_commands_total (called before a scrape)."""
        counts, self._allowed = self._allowed, {}
        for (user, cmd), n in counts.items():
            self.metrics.commands.labels(user, cmd, "allowed").inc(n)

    def reply_latency(self, seconds: float) -> None:
        if self.count:
            self.metrics.upstream_reply_seconds.observe(seconds)

    def _user(self, name: str) -> str:
        return printable_name(name) if name in self.users else "unknown"

    def command(self, session: ClientInfo, cmd: str, allowed: bool, reason: str) -> None:
        user = printable_name(session.user.name)
        if reason in _REQUEST_ERRORS:
            if self.count:
                self.metrics.request_errors.labels(reason).inc()
            return
        if not self.count:
            if not allowed:
                self.limiter.log(self._audit_denied, "command_denied", session=session, user=user, cmd=cmd, reason=reason)
            return
        if allowed:
            # The hot path: a plain dict increment, moved into the Prometheus counter at scrape time.
            key = (user, cmd)
            allowed_counts = self._allowed
            allowed_counts[key] = allowed_counts.get(key, 0) + 1
            return
        self.metrics.commands.labels(user, cmd, "denied").inc()
        self.metrics.denied.labels(user, cmd, reason, "enforce").inc()
        self.limiter.log(self._audit_denied, "command_denied", session=session, user=user, cmd=cmd, reason=reason)

    def allowed(self, labels: list[tuple[str, str]]) -> None:
        """A batch of allowed requests, by (user, command) labels (the session's fast path)."""
        if self.count:
            counts = self._allowed
            for key in labels:
                counts[key] = counts.get(key, 0) + 1

    def would_deny(self, session: ClientInfo, cmd: str, reason: str) -> None:
        """Audit mode: the policy would refuse this request; it is forwarded."""
        user = printable_name(session.user.name)
        if self.count:
            self.metrics.denied.labels(user, cmd, reason, "audit").inc()
        self.limiter.log(self._audit_denied, "would_deny", session=session, user=user, cmd=cmd, reason=reason)

    def upstream_auth_failed(self, session: ClientInfo) -> None:
        """Redis refused the service user's (mirror mode: the mirror user's) AUTH on a client's upstream
        connection. In mirror mode the mirrors are verified, so the next connection finds it back."""
        self.metrics.upstream_auth_failures.inc()
        mirror = session.policy.mirror
        if mirror is None:
            detail = "Redis refused the service user's AUTH: check [upstream] username and password"
        else:
            mirror.verify("auth")  # (the link has asked already for a first login; a re-login had not)
            detail = "Redis refused the mirror user's AUTH: the mirror users are verified against Redis again"
        self.limiter.log(audit.error, "upstream_auth_failed", listener=session.listener, peer=session.peer,
                         user=printable_name(session.user.name), detail=detail)  # fmt: skip

    def _audit_denied(self, event: str, session: ClientInfo, user: str, cmd: str, reason: str) -> None:
        extra = {"keys": session.last_keys()} if self.audit_keys else {}  # only for the lines that are written
        audit.warning(event, user=user, command=cmd, reason=reason, listener=session.listener,
                      peer=session.peer, tls_identity=session.tls_identity, **extra)  # fmt: skip

    def throttled(self, session: ClientInfo, delay: float) -> None:
        self.metrics.auth_throttled.labels(session.listener).inc()

    def auth(self, session: ClientInfo, ok: bool, username: str, reason: str, method: str) -> None:
        if ok:
            self.metrics.auth_successes.labels(session.listener, method).inc()
            audit.info("auth_success", user=printable_name(username), method=method, listener=session.listener,
                       peer=session.peer, tls_identity=session.tls_identity)  # fmt: skip
        else:
            self.metrics.auth_failures.labels(session.listener, reason).inc()
            self.limiter.log(audit.warning, "auth_failure", user=self._user(username), reason=reason,
                             listener=session.listener, peer=session.peer,
                             tls_identity=session.tls_identity)  # fmt: skip


_REQUEST_ERRORS = frozenset({"unknown_command", "arity", "unsupported", "protocol", "context", "protected"})
