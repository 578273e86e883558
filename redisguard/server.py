"""The proxy: start-up, listeners, reload (SIGHUP, ACL changes), readiness, signals, shutdown.

The jobs live in their own modules: :mod:`.listeners` (TLS accept and handshakes),
:mod:`.connection` (client/upstream pumps), :mod:`.upstream` (the one-off RESP client),
:mod:`.observe` (metrics and audit adapter).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import gc
import os
import resource
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import certs
from .acl import ACLError, ACLReplies, User, UsersFileError, load_users
from .acl.users_file import missing_default_message
from .audit import EventLimiter, get_logger
from .commands import CommandTable
from .config import Config, ListenerConfig
from .connection import ClientProtocol
from .guards import AuthThrottle
from .health import UpstreamMonitor
from .listeners import HandshakeBudget, TLSServer
from .metrics import Metrics, serve_http
from .observe import Observer
from .policy import Policy
from .reconfigure import reread
from .tls import TLSConfigError, server_context, upstream_context
from .upstream import fetch_command_table, protected_settings, upstream_request

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")


# The housekeeping timer: event-loop lag is how late it fires; it also decides when to trim memory.
TICK = 0.25
# malloc_trim(0) only after at least this many connections closed since the last trim.
TRIM_AFTER_CLOSES = 64


def _release(users: dict[str, User]) -> None:
    """Drop the previous users one at a time (in a worker thread, so the loop gets turns between)."""
    while users:
        users.popitem()


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.servers: list[asyncio.AbstractServer | TLSServer] = []
        self.clients: set[ClientProtocol] = set()
        self.active = {lst.name: 0 for lst in config.listeners}
        self.upstream_ssl = upstream_context(config.upstream)
        self.policy: Policy = None  # type: ignore[assignment]
        self.table: CommandTable = None  # type: ignore[assignment]
        self.last_upstream_error = ""
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self.reloading: asyncio.Future[None] | None = None
        self.background: set[asyncio.Future[None]] = set()
        self.reload_again = False
        # Decisions on huge requests run here, one at a time, so they never stall the event loop.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="redisguard-decide")
        lim = config.limits
        self.handshakes = HandshakeBudget(lim.max_pending_handshakes, lim.max_handshakes_per_source,
                                          self.metrics.tls_handshakes_pending)  # fmt: skip
        # Connection events are rate-limited per event name; what is dropped is counted.
        self.events = EventLimiter(config.log.audit_connections_per_second, self.metrics.audit_suppressed.inc)
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_base = 0  # descriptors open before the first client: listeners, logs, the loop's own
        self.metrics.fd_accounted.set_function(lambda: self.fd_limit - self.fds_left())
        self.closed_since_trim = 0
        self.trim = _malloc_trim()
        self.next_trim = 0.0
        self.tick_due = 0.0
        self.tick_handle: asyncio.TimerHandle | None = None
        self.monitor = UpstreamMonitor(config, self.metrics)  # redisguard_upstream_up on a quiet host

    def fds_left(self) -> int:
        """File descriptors not yet used or promised. Each client counts two, its own and the upstream
        connection it may open at its first command, so logged-in clients never find the table full."""
        return self.fd_limit - self.fd_base - 2 * len(self.clients) - self.handshakes.count

    def accept_failed(self, lst: ListenerConfig, e: OSError) -> None:
        self.metrics.accept_failures.labels(lst.name, errno.errorcode.get(e.errno or 0, "other")).inc()
        self.events.log(log.warning, "accept_failed", listener=lst.name, error=str(e))

    def _tick(self) -> None:
        """Every TICK seconds: observe how late this timer fired (event-loop lag); now and then, give
        memory freed by closed connections back to the OS (glibc keeps it otherwise)."""
        now = time.monotonic()
        self.metrics.event_loop_lag.observe(max(0.0, now - self.tick_due))
        self.tick_due = now + TICK
        self.tick_handle = asyncio.get_running_loop().call_later(TICK, self._tick)
        interval = self.config.limits.memory_trim_interval
        if interval and self.trim is not None and now >= self.next_trim and self.closed_since_trim >= TRIM_AFTER_CLOSES:
            self.next_trim = now + interval
            closed, self.closed_since_trim = self.closed_since_trim, 0
            self.trim()
            self.metrics.malloc_trims.inc()
            log.debug("malloc_trim", closed=closed, seconds=round(time.monotonic() - now, 4))

    def note_upstream_error(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        if msg != self.last_upstream_error:
            log.warning("upstream_unavailable", upstream=self.config.upstream.where, error=msg)
        self.last_upstream_error = msg

    async def load_policy(self) -> None:
        cfg = self.config
        table = None
        if cfg.upstream.fetch_command_table:
            try:
                table = await fetch_command_table(cfg)
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                log.warning("command_table_fallback", reason=str(e) or type(e).__name__,
                            detail="using the shipped Redis 7.0 snapshot")  # fmt: skip
        self.table = table or CommandTable.snapshot()
        users = load_users(cfg.acl.users_file, self.table)
        if users["default"].implicit:  # Redis's open default; a reload would refuse this file
            log.warning("users_file_implicit_default", detail=missing_default_message(str(cfg.acl.users_file)))
        observer = Observer(self.metrics, users, cfg.metrics.enabled, cfg.log.audit_keys, cfg.log.audit_denied_per_second)
        self.policy = Policy(
            self.table, users, frozenset(cfg.acl.disabled_commands), cfg.upstream.username,
            cfg.upstream.password, cfg.limits.max_request_bytes, observer,
            AuthThrottle(cfg.limits.auth_failures_per_minute), ACLReplies(users).prepare(),
            cfg.acl.enable_debug_command, cfg.acl.enable_module_command, str(cfg.acl.users_file),
        )  # fmt: skip
        self.policy.on_users_changed = self._users_changed
        if "upstream" in (cfg.acl.enable_debug_command, cfg.acl.enable_module_command):
            # Redis sees every proxied client as local, so "local" there means local to redisguard here
            upstream = await protected_settings(cfg) if cfg.upstream.fetch_command_table else {}
            for key in ("enable_debug_command", "enable_module_command"):
                if getattr(cfg.acl, key) == "upstream":
                    setattr(self.policy, key, upstream.get(key, "no"))
        self.metrics.set_build_info(self.table.redis_version)

    async def start(self) -> None:
        self.fd_limit = _raise_fd_limit()
        self.metrics.fd_limit.set(self.fd_limit)
        await self.load_policy()
        gc.collect()
        gc.freeze()  # the users and the command table live as long as the process: keep them out of GC passes
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._exception_handler)
        for lst in self.config.listeners:
            factory = self._factory(lst)
            if lst.type == "unix":
                assert lst.path is not None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lst.path)
                srv = await loop.create_unix_server(factory, str(lst.path))
                os.chmod(lst.path, lst.socket_mode)
            elif lst.type == "tls":
                self._load_certificates(lst)
                srv = TLSServer(self, lst)  # type: ignore[assignment]
            else:
                srv = await loop.create_server(factory, lst.host, lst.port, reuse_address=True, backlog=1024)
            self.servers.append(srv)
        if self.config.metrics.enabled:
            m = self.config.metrics
            self.servers.append(await serve_http(self.metrics, m.host, m.port, self.ready))
        self.fd_base = _open_fds()
        self.tick_due = time.monotonic() + TICK
        self.tick_handle = loop.call_later(TICK, self._tick)
        self.monitor.start()
        log.info(
            "redisguard_started",
            listeners=[f"{lst.name}={lst.type}://{self.bound(i)}" for i, lst in enumerate(self.config.listeners)],
            upstream=self.config.upstream.where,
            redis_version=self.table.redis_version,
            users=len(self.policy.users),
            metrics=f"http://{self.config.metrics.host}:{self.metrics_port()}/metrics"
            if self.config.metrics.enabled else "off",
            fd_limit=self.fd_limit, malloc_trim=self.trim is not None,
        )  # fmt: skip

    def bound(self, index: int) -> str:
        lst = self.config.listeners[index]
        if lst.type == "unix":
            return str(lst.path)
        sock = self.servers[index].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    def metrics_port(self) -> int:
        if not self.config.metrics.enabled:
            return 0
        return int(self.servers[len(self.config.listeners)].sockets[0].getsockname()[1])

    def _factory(self, lst: ListenerConfig) -> Any:
        return lambda: ClientProtocol(self, lst)

    def _load_certificates(self, lst: ListenerConfig) -> None:
        """Build the listener's TLS context (new handshakes use it) and export expiry times."""
        self.tls_contexts[lst.name] = server_context(lst)
        self._export_expiry(lst)

    def _export_expiry(self, lst: ListenerConfig) -> None:
        assert lst.tls is not None
        self.metrics.cert_expiry.labels(f"{lst.name}:server").set(certs.not_after(lst.tls.cert_file))
        if lst.tls.ca_file:
            self.metrics.cert_expiry.labels(f"{lst.name}:ca").set(certs.not_after(lst.tls.ca_file))

    def reload(self) -> None:
        """SIGHUP: re-read the users file and every listener's certificates, off the event loop.

        A SIGHUP during a reload runs one more reload after it (the files may have changed again)."""
        if self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            return
        self.reloading = asyncio.ensure_future(self._reload())

    async def _reload(self) -> None:
        """All or nothing: parse and build everything in a worker thread, then swap it in at once.

        New handshakes and logins use the new files; see _rebind_sessions for connected clients. A
        users file without an explicit `user default` line is refused: Redis would make `default`
        `on nopass +@all`, silently opening the proxy to anyone."""
        cfg = self.config
        tls = [lst for lst in cfg.listeners if lst.type == "tls"]

        def load() -> tuple[dict[str, User], ACLReplies, dict[str, ssl.SSLContext], Any]:
            changes = reread(cfg)  # the TOML too: what changed is applied or logged as needing a restart
            users = load_users(cfg.acl.users_file, self.table, require_default=True)
            return users, ACLReplies(users).prepare(), {lst.name: server_context(lst) for lst in tls}, changes

        while True:
            self.reload_again = False
            # A full garbage collection over 10,000 users' command sets holds the GIL for ~60 ms,
            # wherever it runs: none while loading, and what is loaded is frozen out of later ones.
            gc.disable()
            before = self.policy.users
            try:
                users, acl_replies, contexts, changes = await asyncio.to_thread(load)
            except (UsersFileError, ACLError, TLSConfigError, OSError, ValueError) as e:
                gc.enable()
                self.metrics.reload_result(False)
                audit.error("config_reload_failed", error=str(e), detail="kept the previous users and certificates")
            else:
                if self.policy.users is not before:
                    # ACL SETUSER/DELUSER/LOAD changed the users while the file was being read (and ACL
                    # SAVE may have rewritten it): what was read may be stale. Read it again.
                    gc.enable()
                    self.reload_again = True
                    continue
                for lst in tls:
                    self._export_expiry(lst)
                self.tls_contexts.update(contexts)
                old = (self.policy.users, self.policy.acl_replies)
                self.policy.users = users
                self.policy.acl_replies = acl_replies
                self.policy.observer.users = users  # type: ignore[attr-defined]
                dropped = self._rebind_sessions(users)
                gc.freeze()
                gc.enable()
                # Freeing 10,000 users is ~20 ms: not on the loop, and on the decisions' own worker
                # thread, so no offloaded decision can be reading the old users meanwhile.
                await asyncio.get_running_loop().run_in_executor(self.executor, _release, old[0])
                del old
                self.metrics.reload_result(True)
                changes.apply(self)
                audit.info("config_reloaded", users=len(users), listeners=sorted(contexts), disconnected=dropped,
                           applied=changes.applied, restart_required=changes.restart)  # fmt: skip
            if not self.reload_again:
                return

    def _users_changed(self, users: dict[str, User], changed: set[str] | None, deleted: list[str]) -> None:
        """ACL SETUSER / DELUSER / LOAD changed the users: move or disconnect the other clients, and
        rebuild the ACL replies off the loop."""
        self.policy.observer.users = users  # type: ignore[attr-defined]
        dropped = self._rebind_sessions(users, changed, deleted)
        audit.info("users_changed", users=len(users), changed=sorted(changed) if changed is not None else "all",
                   deleted=deleted, disconnected=dropped)  # fmt: skip

        async def rebuild() -> None:
            acl_replies = await asyncio.to_thread(ACLReplies(users).prepare)
            if self.policy.users is users and self.policy.acl_replies is None:
                self.policy.acl_replies = acl_replies

        self.background.add(task := asyncio.ensure_future(rebuild()))
        task.add_done_callback(self.background.discard)

    def _rebind_sessions(self, users: dict[str, User], changed: set[str] | None = None, deleted: Sequence[str] = ()) -> int:
        """Move logged-in clients to their new user, or disconnect them (Session.rebind says which)."""
        dropped = 0
        for client in list(self.clients):
            session = client.session
            if session is None or client.closed:
                continue
            why = session.rebind(users, changed, deleted)
            if why:
                session.kill()  # not one more request under the old rules, even before the close completes
                dropped += 1
                self.events.log(audit.info, "connection_closed", listener=client.listener.name, peer=session.peer,
                                user=session.user.name, reason=why)  # fmt: skip
                client.close()
        return dropped

    async def ready(self) -> tuple[bool, str]:
        """Listeners up, certificates loaded, and the upstream answers PING as the service user."""
        if len(self.servers) < len(self.config.listeners):
            return False, "listeners not started"
        missing = [lst.name for lst in self.config.listeners if lst.type == "tls" and lst.name not in self.tls_contexts]
        if missing:
            return False, f"certificates not loaded for {', '.join(missing)}"
        try:
            (pong,) = await upstream_request(self.config, [[b"PING"]], 2.0)
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self.metrics.upstream_up.set(0)
            return False, f"upstream {self.config.upstream.where} unavailable: {e or type(e).__name__}"
        self.metrics.upstream_up.set(1)
        return (pong == b"PONG"), f"ready: upstream answered {pong!r}"

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError):
            # A TLS connection torn down mid-stream: the client is gone, the proxy is fine.
            log.debug("connection_error", message=context.get("message", ""), error=repr(exc))
            return
        log.error("internal_error", message=context.get("message", ""), error=repr(exc))

    async def stop(self, grace: float = 5.0) -> None:
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None
        await self.monitor.stop()
        for srv in self.servers:
            srv.close()
        deadline = time.monotonic() + grace
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.clients):
            c.close()
        for lst in self.config.listeners:
            if lst.type == "unix" and lst.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lst.path)


def _raise_fd_limit() -> int:
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


def _open_fds() -> int:
    """File descriptors open now (Linux /proc; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return 32


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), which hands free heap pages back to the OS; None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: int(fn(0))


async def run(config: Config) -> None:
    proxy = Proxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    await stop.wait()
    log.info("redisguard_stopping", clients=len(proxy.clients))
    await proxy.stop()
    log.info("redisguard_stopped")

