"""What every connection shares, and nothing more: the narrow state the transports read and count.

:class:`~redisguard.runtime.server.Proxy` owns one and hands it to each listener and connection, so a
connection cannot start, stop or reload anything; it admits, counts and relays.
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import resource
import ssl
from typing import Any, Protocol

from redisguard.config.model import Config, ListenerConfig
from redisguard.observe.audit import EventLimiter, get_logger
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import Shared
from redisguard.policy.guards import source_allowed, source_key
from redisguard.session.machine import Session
from redisguard.session.state import ClientState
from redisguard.transport.handshakes import HandshakeBudget

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")


def peer_name(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"


def redis_addr(addr: Any, unix_path: Any = "") -> bytes:
    """A socket address as Redis's CLIENT LIST shows it: ``ip:port``, ``[ip6]:port``, ``path:0``."""
    if isinstance(addr, tuple):
        host = str(addr[0])
        return (f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}").encode()
    return f"{unix_path}:0".encode()


def source_of(peername: Any) -> str:
    """The source a per-source limit counts: the address (an IPv6 client by its /64)."""
    return source_key(str(peername[0])) if isinstance(peername, tuple) else ""


def from_proxy(lst: ListenerConfig, peername: Any) -> bool:
    """Is this socket peer one of the listener's proxy_sources (whose PROXY headers are trusted)?"""
    if not isinstance(peername, tuple):
        return "unix" in lst.proxy_sources
    return source_allowed(str(peername[0]), [n for n in lst.proxy_sources if not isinstance(n, str)])


def share(limit: int, workers: int) -> int:
    """One worker's part of a limit the config sets for the whole proxy (rounded up)."""
    return -(-limit // workers)


def is_local(peername: Any) -> bool:
    """A unix-socket or loopback client: what Redis calls local (for DEBUG and MODULE LOAD)."""
    if not isinstance(peername, tuple):
        return True
    try:
        addr = ipaddress.ip_address(str(peername[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


class Client(Protocol):
    """A client connection as the runtime drives it (connection.py's ClientProtocol): a reload rebinds
    or closes its session, a drain winds it down."""

    @property
    def session(self) -> Session | None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def listener(self) -> ListenerConfig: ...
    def close(self) -> None: ...
    def drain(self) -> None: ...
    def abort(self) -> None: ...


class ConnectionContext:
    def __init__(self, config: Config, shared: Shared, metrics: Metrics, handshakes: HandshakeBudget,
                 upstream_ssl: ssl.SSLContext | None) -> None:  # fmt: skip
        self.config = config
        self.shared = shared  # the policy in force, swapped whole on reload
        self.metrics = metrics
        self.handshakes = handshakes
        self.upstream_ssl = upstream_ssl
        self.clients: set[Client] = set()
        # Proxied clients by their upstream socket's address (Redis's addr=): CLIENT LIST/INFO/KILL.
        self.upstream_clients: dict[bytes, ClientState] = {}
        self.active = {lst.name: 0 for lst in config.listeners}
        # Each listener's max_connections (with [server] workers, this worker's share: rounded up).
        self.max_connections = {lst.name: share(lst.max_connections, config.server.workers) for lst in config.listeners}
        self.tls_contexts: dict[str, ssl.SSLContext] = {}  # per TLS listener; a reload replaces them
        # Connection events are rate-limited per event name; what is dropped is counted.
        self.events = EventLimiter(config.log.audit_connections_per_second, metrics.audit_suppressed.inc)
        # Decisions on huge requests run here, one at a time, so they never stall the event loop.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="redisguard-decide")
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_base = 0  # descriptors open before the first client: listeners, logs, the loop's own
        self.churn_since_trim = 0  # TLS handshakes done and connections closed since memory was last given back
        self.last_upstream_error = ""
        self.draining = False  # SIGTERM: /readyz unready, every connection drains (Proxy.stop)

    def fds_left(self) -> int:
        """File descriptors not yet used or promised. Each client counts two, its own and the upstream
        connection it may open at its first command, so logged-in clients never find the table full."""
        hs = self.handshakes
        return self.fd_limit - self.fd_base - 2 * len(self.clients) - hs.count - hs.waiting

    def accept_failed(self, lst: ListenerConfig, e: OSError) -> None:
        self.metrics.accept_failures.labels(lst.name, errno.errorcode.get(e.errno or 0, "other")).inc()
        self.events.log(log.warning, "accept_failed", listener=lst.name, error=str(e))

    def upstream_error(self, e: BaseException) -> None:
        """An upstream connection failed: logged once per distinct error, not once per client."""
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last_upstream_error:
            log.warning("upstream_unavailable", upstream=self.config.upstream.where, error=msg)
        self.last_upstream_error = msg

    def refusal(self, lst: ListenerConfig, peername: Any, handshake: bool = False, proxied: bool = False) -> str:
        """Why this connection must be refused ("" = accept). ``handshake``: a TLS socket about to start
        its handshake (or a proxy_protocol connection about to wait for its header), which must also fit
        the pending-handshake budget. ``proxied``: ``peername`` is a load balancer's, the client's
        address is not known yet: what depends on it (allowed_sources, the per-source budget) is
        checked by :meth:`client_refusal` once the PROXY header has named it."""
        ctx = self
        if proxied:
            pass
        elif lst.allowed_sources and isinstance(peername, tuple) and not source_allowed(peername[0], lst.allowed_sources):
            return "source_not_allowed"
        hs, name = ctx.handshakes, lst.name
        if ctx.active[name] + hs.by_listener.get(name, 0) + hs.waiting_by_listener.get(name, 0) >= ctx.max_connections[name]:
            return "limit"
        if ctx.fds_left() < ctx.config.limits.fd_reserve:
            return "fd_reserve"
        if handshake:
            return ctx.handshakes.refusal("" if proxied else source_of(peername))
        return ""

    def client_refusal(self, lst: ListenerConfig, peername: Any) -> str:
        """A TLS connection's PROXY header named its client: allowed_sources and the per-source
        handshake budget for that address, before any TLS work ("" = go on)."""
        if lst.allowed_sources and isinstance(peername, tuple) and not source_allowed(str(peername[0]), lst.allowed_sources):
            return "source_not_allowed"
        if self.handshakes.by_source.get(source_of(peername), 0) >= self.handshakes.per_source:
            return "handshake_limit_source"
        return ""

    def proxy_header_failed(self, lst: ListenerConfig, peername: Any, reason: str, detail: str) -> None:
        """A connection on a proxy_protocol listener sent no valid PROXY header: counted and logged."""
        self.metrics.proxy_header_failures.labels(lst.name, reason).inc()
        self.metrics.connections_rejected.labels(lst.name, "proxy_header").inc()
        self.events.log(audit.warning, "proxy_header_failed", listener=lst.name, peer=peer_name(peername), reason=reason,
                        detail=detail)  # fmt: skip
        self.churn_since_trim += 1
