"""Prometheus metrics and the health endpoints, on their own small asyncio HTTP listener.

Labels are bounded: users come from the users file, commands from the command table (else
``unknown``), listeners from config; never client addresses, keys or values.
"""

from __future__ import annotations

import asyncio
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from redisguard import __version__, fast

# redisguard_upstream_errors_total{reason}: every value exists from the start (at 0), for increase() in alerts.
UPSTREAM_ERROR_REASONS = ("auth", "noperm", "timeout", "refused", "tls", "connect", "error")
# redisguard_mirror_resync_total{reason}: what found mirror users missing from Redis (upstream.mirror_verify).
MIRROR_RESYNC_REASONS = ("auth", "reconnect", "health", "sighup")


class _UpstreamGauge(Gauge):
    """``redisguard_upstream_up``, which also feeds ``redisguard_upstream_transitions_total{to}`` (each change
    of value, the first one set aside) and ``redisguard_upstream_down_seconds_total`` (time spent at 0 since
    the first value), whoever sets it: the health check, a client's upstream connection, /readyz. Both carry
    what a scrape every 15 s or more misses: an outage or a flap shorter than the scrape interval."""

    transitions: Counter
    down_seconds: Counter
    _value_set: float | None = None
    _down_since = 0.0  # time.monotonic() of the last accounting while at 0

    def set(self, value: float) -> None:
        now = time.monotonic()
        if self._value_set == 0:
            self.down_seconds.inc(now - self._down_since)
        if self._value_set is not None and value != self._value_set:
            self.transitions.labels("down" if value == 0 else "up").inc()
        self._value_set, self._down_since = value, now
        super().set(value)

    def account(self) -> None:
        """Before a scrape: an outage still going on counts up to now."""
        if self._value_set == 0:
            now = time.monotonic()
            self.down_seconds.inc(now - self._down_since)
            self._down_since = now


class _WithNode:
    """The registry's samples with a constant ``node`` label (a sidecar per Redis Cluster node)."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry = registry
        self.node = node

    def collect(self) -> Any:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, "node": self.node}) for s in family.samples]
            yield family


class Metrics:
    def __init__(self, node: str = "") -> None:
        self.node = node
        disable_created_metrics()  # *_created series double the scrape and say nothing useful here
        self.before_render: list[Callable[[], None]] = []
        r = self.registry = CollectorRegistry()
        self.commands = Counter("redisguard_commands", "Commands decided, by verdict.",
                                ["user", "command", "result"], registry=r)  # fmt: skip
        self.denied = Counter("redisguard_denied_commands", "Commands refused, by reason (mode=\"audit\": "
                              "forwarded anyway, the policy would have refused them).",
                              ["user", "command", "reason", "mode"], registry=r)  # fmt: skip
        self.auth_failures = Counter("redisguard_auth_failures", "Failed authentications.",
                                     ["listener", "reason"], registry=r)  # fmt: skip
        self.auth_throttled = Counter("redisguard_auth_throttled", "AUTH attempts delayed by the brute-force "
                                      "throttle before being checked.", ["listener"], registry=r)  # fmt: skip
        self.auth_successes = Counter("redisguard_auth_successes", "Successful authentications.",
                                      ["listener", "method"], registry=r)  # fmt: skip
        self.connections_active = Gauge("redisguard_connections_active", "Open client connections.",
                                        ["listener"], registry=r)  # fmt: skip
        self.connections = Counter("redisguard_connections", "Accepted client connections.",
                                   ["listener"], registry=r)  # fmt: skip
        self.connections_rejected = Counter("redisguard_connections_rejected", "Refused connections.",
                                            ["listener", "reason"], registry=r)  # fmt: skip
        self.tls_handshake_failures = Counter("redisguard_tls_handshake_failures", "Failed TLS handshakes.",
                                              ["listener", "reason"], registry=r)  # fmt: skip
        self.upstream_up = _UpstreamGauge("redisguard_upstream_up", "1 if the last upstream connection (or health "
                                          "check) succeeded.", registry=r)  # fmt: skip
        self.upstream_up.transitions = Counter("redisguard_upstream_transitions", "Changes of redisguard_upstream_up, "
                                               "by the value it changed to (to=\"down\": an outage began, \"up\": it "
                                               "ended); flaps shorter than the scrape interval included.", ["to"],
                                               registry=r)  # fmt: skip
        for to in ("down", "up"):
            self.upstream_up.transitions.labels(to)
        self.upstream_up.down_seconds = Counter("redisguard_upstream_down_seconds", "Seconds redisguard_upstream_up "
                                                "has been 0 (as the health check and client connections saw it), an "
                                                "outage still going on included: increase() over a window is the "
                                                "downtime in it, whatever the scrape interval.", registry=r)  # fmt: skip
        self.before_render.append(self.upstream_up.account)
        self.upstream_errors = Counter("redisguard_upstream_errors", "Failed upstream health checks (a PING as the "
                                       "service user every [upstream] health_check_interval), by reason: auth (the "
                                       "service user's AUTH was refused), noperm, timeout, refused, tls, connect, error.",
                                       ["reason"], registry=r)  # fmt: skip
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(reason)
        self.upstream_auth_failures = Counter("redisguard_upstream_auth_failures", "Client upstream connections "
                                              "on which Redis refused the service user's AUTH (the client was told "
                                              "and closed).", registry=r)  # fmt: skip
        self.mirror_resyncs = Counter("redisguard_mirror_resync", "Times mirror users were found missing from (or "
                                      "different in) Redis and pushed again, by what found it: auth (a client's "
                                      "upstream AUTH as its mirror was refused), reconnect (Redis is back after the "
                                      "health check saw it down), health (the periodic check), sighup.",
                                      ["reason"], registry=r)  # fmt: skip
        for reason in MIRROR_RESYNC_REASONS:
            self.mirror_resyncs.labels(reason)
        self.mirrors_recreated = Counter("redisguard_mirror_users_recreated", "Mirror users pushed to Redis again "
                                         "because Redis no longer had them as redisguard made them.",
                                         registry=r)  # fmt: skip
        self.mirror_push_errors = Counter("redisguard_mirror_push_errors", "Mirror user changes (ACL SETUSER, "
                                          "DELUSER) Redis refused (-BUSY while a script runs, say); each is retried "
                                          "in the background with a growing delay until Redis takes it.",
                                          registry=r)  # fmt: skip
        self.mirrors_contested = Counter("redisguard_mirror_users_contested", "Mirror users Redis had with other "
                                         "rules or another password less than a minute after this instance pushed "
                                         "them: another instance in front of the same Redis with another users file "
                                         "or other service credentials, most likely.", registry=r)  # fmt: skip
        self.upstream_connect_failures = Counter("redisguard_upstream_connect_failures",
                                                 "Failed connections to the upstream Redis.", registry=r)  # fmt: skip
        self.upstream_connect_seconds = Histogram("redisguard_upstream_connect_seconds",
                                                  "Time to open an upstream connection.", registry=r)  # fmt: skip
        self.cert_expiry = Gauge("redisguard_certificate_expiry_timestamp_seconds",
                                 "When a loaded certificate expires.", ["cert"], registry=r)  # fmt: skip
        self.build_info = Gauge("redisguard_build_info", "Build information.",
                                ["version", "python", "redis_version", "fast_path"], registry=r)  # fmt: skip
        self.request_errors = Counter("redisguard_request_errors", "Requests answered with an error before any ACL "
                                      "verdict (unknown command, wrong arity, protocol error, unsupported).",
                                      ["reason"], registry=r)  # fmt: skip
        self.upstream_reply_seconds = Histogram(
            "redisguard_upstream_reply_seconds",
            "Time from forwarding a request to relaying its reply (sampled 1/64).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.config_reloads = Counter("redisguard_config_reload", "Reloads of users and certificates (SIGHUP).",
                                      ["result"], registry=r)  # fmt: skip
        self.config_last_reload_ok = Gauge("redisguard_config_last_reload_successful", "0 if the last reload "
                                           "(SIGHUP) failed and the previous users and certificates are still in use; "
                                           "1 if it succeeded or none was tried.", registry=r)  # fmt: skip
        self.config_last_reload_ok.set(1)
        self.audit_suppressed = Counter("redisguard_audit_events_suppressed",
                                        "Audit events dropped by the rate limit.", registry=r)  # fmt: skip
        self.tls_handshakes_pending = Gauge("redisguard_tls_handshakes_pending",
                                            "TLS handshakes in progress (accepted, not yet a client; with "
                                            "proxy_protocol, also connections waiting for their PROXY header).",
                                            ["listener"], registry=r)  # fmt: skip
        self.proxy_header_failures = Counter("redisguard_proxy_header_failures", "Connections closed on a "
                                             "proxy_protocol listener because their PROXY header was missing, "
                                             "malformed, too long, unsupported, too slow (timeout) or cut short (closed).",
                                             ["listener", "reason"], registry=r)  # fmt: skip
        self.accept_failures = Counter("redisguard_accept_failures", "accept() errors (EMFILE: out of file "
                                       "descriptors), by errno name.", ["listener", "error"], registry=r)  # fmt: skip
        self.fd_limit = Gauge("redisguard_file_descriptors_limit", "RLIMIT_NOFILE (soft) of the process.",
                              registry=r)  # fmt: skip
        self.fd_accounted = Gauge("redisguard_file_descriptors_accounted", "File descriptors the proxy counts as "
                                  "used or promised: its own at start, pending handshakes, 2 per client "
                                  "(client + upstream).", registry=r)  # fmt: skip
        self.event_loop_lag = Histogram(
            "redisguard_event_loop_lag_seconds",
            "How late a 0.25 s event-loop timer fires: time the loop spent on other work.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.policy_info = Gauge("redisguard_policy_info", "1, labelled with the digest of the policy in force: "
                                 "the users as ACL LIST lists them, [acl] disabled_commands and mode (sidecars of one "
                                 "cluster should agree; a reload or ACL SETUSER replaces the series).", ["digest"],
                                 registry=r)  # fmt: skip
        self.policy_digest = ""
        self.malloc_trims = Counter("redisguard_malloc_trims", "Calls of malloc_trim(0) after connections closed.",
                                    registry=r)  # fmt: skip

    def reload_result(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        self.config_last_reload_ok.set(1 if ok else 0)

    def set_policy_digest(self, digest: str) -> None:
        """One series at a time: the old digest's goes."""
        if digest != self.policy_digest:
            self.policy_info.clear()
            self.policy_info.labels(digest).set(1)
            self.policy_digest = digest

    def set_build_info(self, redis_version: str) -> None:
        self.build_info.labels(__version__, platform.python_version(), redis_version, fast.KERNEL).set(1)

    def render(self) -> bytes:
        for hook in self.before_render:
            hook()
        return generate_latest(_WithNode(self.registry, self.node) if self.node else self.registry)


def parse_samples(text: str) -> dict[str, float]:
    """A Prometheus text exposition as {'name{labels}': value} (for the demo and the tests)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def serve_http(
    metrics: Metrics | Callable[[], Awaitable[bytes]], host: str, port: int,
    ready: Callable[[], Awaitable[tuple[bool, str]]], sock: socket.socket | None = None, reuse_port: bool = False,
) -> asyncio.Server:  # fmt: skip
    """/metrics, /healthz (alive), /readyz (listeners up, certs loaded, upstream answers).

    ``metrics``: this process's, or (the supervisor of workers) a coroutine that renders the text;
    ``sock``: an already bound socket instead of ``host`` and ``port`` (bound with SO_REUSEPORT if
    ``reuse_port``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.split()
            path = parts[1].split(b"?")[0] if len(parts) >= 2 else b""
            if path == b"/metrics":
                body = metrics.render() if isinstance(metrics, Metrics) else await metrics()
                status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
            elif path == b"/healthz":
                status, ctype, body = b"200 OK", b"text/plain", b"ok\n"
            elif path == b"/readyz":
                ok, why = await ready()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                ctype, body = b"text/plain", (why + "\n").encode()
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
            writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, ctype, len(body)) + body)  # fmt: skip
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    if sock is not None:
        return await asyncio.start_server(handle, sock=sock)
    return await asyncio.start_server(handle, host, port, reuse_port=reuse_port)
