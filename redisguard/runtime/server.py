"""The proxy's lifecycle: start-up, listeners, readiness, signals, the drain.

The other jobs live in their own modules: :mod:`.housekeeping` (the loop-lag and memory-trim timer,
the policy digest, the descriptor limit), :mod:`.reload` (SIGHUP and ACL changes), and below runtime/,
``transport/`` (listeners, connections, the state they share), ``upstream/`` (the one-off RESP client,
mirror users, the health check), ``observe/`` (metrics and audit).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redisguard.acl import ACLReplies, User, load_users
from redisguard.acl.users_file import missing_default_message
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config, ListenerConfig
from redisguard.observe.audit import get_logger
from redisguard.observe.events import Observer
from redisguard.observe.metrics import Metrics, serve_http
from redisguard.observe.profile import TrafficProfile
from redisguard.observe.profile_store import ProfileStore
from redisguard.policy.decide import Policy, Shared
from redisguard.policy.guards import AuthThrottle
from redisguard.runtime.housekeeping import Housekeeping, open_fds, raise_fd_limit
from redisguard.runtime.loading import export_expiry
from redisguard.runtime.reload import Reloader
from redisguard.runtime.watch import FileWatch
from redisguard.transport.connection import ClientProtocol
from redisguard.transport.context import Client, ConnectionContext, share
from redisguard.transport.handshakes import HandshakeBudget
from redisguard.transport.listeners import REUSE_PORT, TLSServer
from redisguard.transport.proxied import ProxiedClientProtocol
from redisguard.transport.tls import read_listener_files, server_context, upstream_context
from redisguard.upstream.client import fetch_command_table, protected_settings, upstream_request
from redisguard.upstream.health import UpstreamMonitor
from redisguard.upstream.identity import install as install_identity

if TYPE_CHECKING:
    from redisguard.runtime.worker_link import WorkerLink

log = get_logger("redisguard")
audit = get_logger("redisguard.audit")


class Proxy:
    """One event loop serving every listener: the whole proxy, or one of ``[server] workers`` processes
    (``worker``: its channel to the supervisor, see :mod:`.supervisor`)."""

    def __init__(self, config: Config, worker: WorkerLink | None = None) -> None:
        self.config = config
        self.worker = worker
        self.metrics = Metrics(node=config.metrics.node)
        self.servers: list[asyncio.Server | TLSServer] = []
        # set by load_policy, before anything reads them
        self.shared: Shared
        self.ctx: ConnectionContext
        self.table: CommandTable
        self.reloader: Reloader
        self.housekeeping: Housekeeping
        self.monitor = UpstreamMonitor(config, self.metrics)  # redisguard_upstream_up on a quiet host
        self.profile_store: ProfileStore | None = None  # the traffic profile's file ([profile])
        self.watch: FileWatch | None = None  # [server] reload_interval
        self.unix_inodes: dict[Path, int] = {}  # the unix sockets this process made (its drain removes only those)

    @property
    def policy(self) -> Policy:
        return self.shared.policy

    @property
    def clients(self) -> set[Client]:
        return self.ctx.clients

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
        policy = await _policy(cfg, self.table, users)
        observer = Observer(self.metrics, users, cfg.metrics.enabled, cfg.log.audit_keys, cfg.log.audit_denied_per_second)
        lim, n = cfg.limits, cfg.server.workers  # with workers, each has its share of the proxy's limits
        self.shared = Shared(policy, observer, AuthThrottle(lim.auth_failures_per_minute / n), ACLReplies(users).prepare())
        # login rules; identity = "mirror": the mirror users (whose health check verifies them)
        self.monitor.mirror = await install_identity(self.shared, cfg, self.metrics)
        handshakes = HandshakeBudget(share(lim.max_pending_handshakes, n), share(lim.max_handshakes_per_source, n),
                                     self.metrics.tls_handshakes_pending)  # fmt: skip
        self.ctx = ConnectionContext(cfg, self.shared, self.metrics, handshakes, upstream_context(cfg.upstream))
        if cfg.profile.file is not None:
            self.shared.profile = TrafficProfile()
            self.profile_store = ProfileStore(self.shared.profile, cfg.profile.file, cfg.profile.interval)
        self.reloader = Reloader(cfg, self.table, self.shared, self.ctx, self._set_config)
        self.metrics.fd_accounted.set_function(lambda: self.ctx.fd_limit - self.ctx.fds_left())
        self.metrics.set_build_info(self.table.redis_version)
        self.housekeeping = Housekeeping(self.ctx)
        if self.worker is not None:
            self.worker.attach(self)

    async def start(self) -> None:
        fd_limit = raise_fd_limit()
        self.metrics.fd_limit.set(fd_limit)
        # (its baseline now: a change while starting is not missed); with workers only the first watches, and
        # the supervisor hands every worker the bytes it found stable
        if self.config.server.reload_interval and (self.worker is None or self.worker.index == 0):
            self.watch = FileWatch(self.config, self.reload, self.metrics)
        await self.load_policy()
        if self.worker is not None:  # the changes the supervisor has sent so far, before any client
            await self.worker.open()
        self.ctx.fd_limit = fd_limit
        gc.collect()
        gc.freeze()  # the users and the command table live as long as the process: keep them out of GC passes
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._exception_handler)
        srv: asyncio.Server | TLSServer
        for lst in self.config.listeners:
            factory = self._factory(lst)
            if lst.type == "unix" and self.worker is not None:
                srv = await loop.create_unix_server(factory, sock=self.worker.inherited[lst.name])
            elif lst.type == "unix":
                assert lst.path is not None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lst.path)
                srv = await loop.create_unix_server(factory, str(lst.path))
                os.chmod(lst.path, lst.socket_mode)
                self.unix_inodes[lst.path] = os.stat(lst.path).st_ino
            elif lst.type == "tls":
                self._load_certificates(lst)
                srv = TLSServer(self.ctx, lst)
            else:  # (with workers, each binds its own: SO_REUSEPORT; unix sockets are the supervisor's)
                srv = await loop.create_server(factory, lst.host, lst.port, reuse_address=True, reuse_port=REUSE_PORT,
                                               backlog=1024)  # fmt: skip
            self.servers.append(srv)
        if self.config.metrics.enabled and self.worker is None:  # with workers, the supervisor serves it
            m = self.config.metrics
            self.servers.append(await serve_http(self.metrics, m.host, m.port, self.ready, reuse_port=REUSE_PORT))
        self.ctx.fd_base = open_fds()
        self.housekeeping.start()
        self.monitor.start()
        if self.watch is not None:
            self.watch.start()
        if self.profile_store is not None:
            self.profile_store.start()
        if self.worker is not None:
            self.worker.started()
        log.info(
            "redisguard_started",
            listeners=[f"{lst.name}={lst.type}://{self.bound(i)}" for i, lst in enumerate(self.config.listeners)],
            upstream=self.config.upstream.where,
            redis_version=self.table.redis_version,
            users=len(self.policy.users),
            metrics="off" if not self.config.metrics.enabled else "the supervisor's" if self.worker is not None
            else f"http://{self.config.metrics.host}:{self.metrics_port()}/metrics",
            fd_limit=fd_limit, malloc_trim=self.housekeeping.trim is not None,
        )  # fmt: skip

    def bound(self, index: int) -> str:
        lst = self.config.listeners[index]
        if lst.type == "unix":
            return str(lst.path)
        sock = self.servers[index].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    def metrics_port(self) -> int:
        if not self.config.metrics.enabled or self.worker is not None:
            return 0
        return int(self.servers[len(self.config.listeners)].sockets[0].getsockname()[1])

    def _factory(self, lst: ListenerConfig) -> Any:
        cls = ProxiedClientProtocol if lst.proxy_protocol else ClientProtocol  # tcp/unix; TLS reads it in listeners.py
        return lambda: cls(self.ctx, lst)

    def _load_certificates(self, lst: ListenerConfig) -> None:
        """Build the listener's TLS context (new handshakes use it) and export expiry times."""
        files = read_listener_files(lst)  # once: the context and the expiry metric come from the same bytes
        self.ctx.tls_contexts[lst.name] = server_context(lst, files)
        export_expiry(self.metrics, lst, files)

    def _set_config(self, config: Config) -> None:
        """A reload applied settings that may change live (reconfigure.LIVE)."""
        self.config = self.ctx.config = config  # (the reloader's loader keeps its own)

    def reload(self, files: dict[Path, bytes] | None = None) -> None:
        """SIGHUP, or the file watch with the files it found stable (``files``): re-read the users file and
        every listener's certificates (see :mod:`.reload`); with workers, every worker does, in the
        supervisor's order of users changes (each reads the files itself, twice); in mirror mode, also
        check that Redis still has every mirror user (whether or not the users changed)."""
        if self.worker is not None:
            self.worker.request_reload(files)
        else:
            self.reloader.reload(files)
        if self.policy.mirror is not None:
            self.policy.mirror.verify("sighup")

    async def ready(self) -> tuple[bool, str]:
        """Listeners up, certificates loaded, and the upstream answers PING as the service user."""
        if self.ctx.draining:
            return False, "draining: shutting down"
        if len(self.servers) < len(self.config.listeners):
            return False, "listeners not started"
        missing = [lst.name for lst in self.config.listeners if lst.type == "tls" and lst.name not in self.ctx.tls_contexts]
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

    async def stop(self) -> None:
        """The drain: unready at once, no new connections, every client answered for what it sent and
        closed once quiet (ClientProtocol.drain), the rest cut after [server] drain_timeout."""
        self.ctx.draining = True  # connections admitted from now on (a PROXY header completing) drain too
        self.housekeeping.stop()
        await self.monitor.stop()
        if self.watch is not None:
            await self.watch.stop()
        for srv in self.servers[: len(self.config.listeners)]:  # (the metrics endpoint answers to the end)
            srv.close()
        for c in list(self.ctx.clients):
            c.drain()
        deadline = time.monotonic() + self.config.server.drain_timeout
        while self.ctx.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.ctx.clients:
            log.warning("drain_timeout", clients=len(self.ctx.clients), detail="closed before they were done")
        for c in list(self.ctx.clients):
            c.abort()
        if self.profile_store is not None:
            await self.profile_store.stop()
        if self.worker is not None:
            return  # the supervisor owns the unix socket paths
        for path, inode in self.unix_inodes.items():
            remove_socket(path, inode)


def remove_socket(path: Path, inode: int) -> None:
    """Unlink the unix socket this process made at ``path``, not a replacement's made there during the drain."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


async def _policy(cfg: Config, table: CommandTable, users: dict[str, User]) -> Policy:
    """The policy the config asks for, over ``users``."""
    protected = {"enable_debug_command": cfg.acl.enable_debug_command,
                 "enable_module_command": cfg.acl.enable_module_command}
    if "upstream" in protected.values():
        # Redis sees every proxied client as local, so "local" there means local to redisguard here
        upstream = await protected_settings(cfg) if cfg.upstream.fetch_command_table else {}
        protected = {k: upstream.get(k, "no") if v == "upstream" else v for k, v in protected.items()}
    return Policy(table, users, frozenset(cfg.acl.disabled_commands), cfg.upstream.username,
                  cfg.upstream.password, cfg.limits.max_request_bytes, users_file=str(cfg.acl.users_file),
                  audit_all=cfg.acl.mode == "audit",
                  audit_users=tuple(u.encode("utf-8", "surrogateescape") for u in cfg.acl.audit_users),
                  enable_debug_command=protected["enable_debug_command"],
                  enable_module_command=protected["enable_module_command"])  # fmt: skip


async def run(config: Config, worker: WorkerLink | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or, for a worker, until the supervisor's channel closes)."""
    proxy = Proxy(config, worker)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = worker.stop if worker is not None else asyncio.Event()  # (a worker's: also its channel's end)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    link = worker.reader if worker is not None else None
    await stop.wait()
    log.info("redisguard_stopping", clients=len(proxy.clients))
    await proxy.stop()
    if link is not None:  # answered the supervisor's scrapes while draining
        link.cancel()
    log.info("redisguard_stopped")

