"""``[server] workers = N`` with N > 1: a supervisor and N worker processes, one event loop each.

``workers = 1`` (the default) never comes here: :func:`redisguard.runtime.server.run` serves in the one
process, exactly as before.

**Process model.** The process the user starts is the supervisor. After the config and the preflight
checks it binds what the workers share (unix-socket listeners, which cannot use SO_REUSEPORT; the
metrics port), then forks the workers. A worker is a whole proxy (:class:`~redisguard.runtime.server.Proxy`)
on its own uvloop loop: it loads the users and the command table itself, binds its own TCP/TLS
sockets with SO_REUSEPORT (the kernel spreads new connections over the workers), and accepts on the
inherited unix sockets. The supervisor runs a plain asyncio loop with no client traffic; it forks from
that loop (the child forgets the parent's loop and signal handlers before it starts its own, and never
returns into the parent's code). It

- restarts a worker that exits unexpectedly, after 0.5 s doubling to 30 s while it keeps dying within
  10 s of its start; after 5 such deaths in a row it stops everything and exits 1 (a worker that cannot
  start is a configuration or environment problem a restart loop would only hide);
- turns SIGHUP into a reload of every worker, and SIGTERM/SIGINT into a drain: every worker stops
  accepting, gives its clients up to [server] drain_timeout, and exits; workers still there 10 s later are killed; then
  it removes the unix socket paths and exits;
- dies with its workers and they with it: a worker gets SIGTERM when the supervisor dies
  (PR_SET_PDEATHSIG) and also stops when its channel to the supervisor closes.

**Its parts**: the slots and their channels (:mod:`.slots`), the one stream of users changes every
worker applies, ACL SETUSER / DELUSER / LOAD ordered with the reloads (:mod:`.change_stream`), and
the one ``/metrics`` and ``/readyz``, every worker's merged (:mod:`.aggregate`). This module is the
processes: fork, restart policy, stop.

**Per worker** (documented in the README): the AUTH throttle, ACL LOG, the audit-log rate limits
and the upstream health check. Limits are shared: each worker gets ``ceil(limit / N)`` of a
listener's ``max_connections``, ``max_pending_handshakes`` and ``max_handshakes_per_source``, and
``auth_failures_per_minute / N``, so the proxy as a whole holds what the config says (the kernel's
spread is not exact, so one worker may refuse a little before the total is reached); ``fd_reserve`` is
per process, as the descriptor limit is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import structlog

from redisguard.acl import ACLError, UsersFileError
from redisguard.config.model import Config
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import serve_http
from redisguard.runtime.aggregate import Aggregate
from redisguard.runtime.change_stream import ChangeStream
from redisguard.runtime.server import remove_socket, run
from redisguard.runtime.slots import Channel, Message, Slot
from redisguard.runtime.worker_link import WorkerLink
from redisguard.transport.listeners import REUSE_PORT
from redisguard.transport.tls import TLSConfigError, server_context

log = get_logger("redisguard")

BACKOFF, BACKOFF_MAX = 0.5, 30.0  # restart delay: doubles while a worker keeps dying early
STABLE_AFTER = 10.0  # a worker that ran this long before exiting starts the count again
MAX_EARLY_EXITS = 5  # this many early exits in a row: give up
STOP_MARGIN = 10.0  # SIGTERM, then SIGKILL for workers still running this long after their drain_timeout
PR_SET_PDEATHSIG = 1


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.n = config.server.workers
        self.slots = [Slot(i) for i in range(self.n)]
        self.stream = ChangeStream(config, self.slots, self._task)  # users changes and reloads, in one order
        self.aggregate = Aggregate(self.slots)  # /metrics and /readyz
        self.inherited: dict[str, socket.socket] = {}  # unix listeners, by name
        self.unix_inodes: dict[Path, int] = {}  # their paths (only these are removed at the end)
        self.metrics_sock: socket.socket | None = None
        self.stopping = False
        self.code = 0
        self.done: asyncio.Future[int] | None = None
        self.tasks: set[asyncio.Future[Any]] = set()

    # -- before the loop ---------------------------------------------------------------------------
    def bind(self) -> None:
        """The sockets the workers share: unix listeners (they accept on them) and the metrics port;
        and the TLS contexts, built here once so that every worker forked from here inherits the same
        one (transport/tls.py ``_built``): one session-ticket key for the instance."""
        for lst in self.config.listeners:
            if lst.type == "tls":
                with contextlib.suppress(TLSConfigError):  # (each worker reports it as it starts)
                    server_context(lst)
        for lst in self.config.listeners:
            if lst.type != "unix":
                continue
            assert lst.path is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lst.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(lst.path))
            os.chmod(lst.path, lst.socket_mode)
            self.unix_inodes[lst.path] = os.stat(lst.path).st_ino
            sock.listen(1024)
            sock.setblocking(False)
            self.inherited[lst.name] = sock
        m = self.config.metrics
        if m.enabled:
            family = socket.AF_INET6 if ":" in m.host else socket.AF_INET
            self.metrics_sock = socket.create_server((m.host, m.port), family=family, reuse_port=REUSE_PORT)

    # -- the supervisor's loop ---------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload_all, "sighup")
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        http = None
        if self.metrics_sock is not None:
            m = self.config.metrics
            http = await serve_http(self.aggregate.render, m.host, m.port, self.ready, sock=self.metrics_sock)
        for slot in self.slots:
            self.spawn(slot)
        log.info("redisguard_supervisor_started", workers=self.n, pids=[s.pid for s in self.slots],
                 metrics=f"http://{self.config.metrics.host}:{self.config.metrics.port}/metrics"
                 if http is not None else "off")  # fmt: skip
        code = await self.done
        if http is not None:
            http.close()
        for sock in self.inherited.values():
            sock.close()
        for path, inode in self.unix_inodes.items():
            remove_socket(path, inode)
        log.info("redisguard_stopped", workers=self.n)
        return code

    def spawn(self, slot: Slot) -> None:
        ours, theirs = socket.socketpair()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's loop
            code = 1
            try:
                ours.close()
                code = self._worker(slot.index, theirs, supervisor)
            finally:
                os._exit(code)
        theirs.close()
        slot.pid, slot.started = pid, time.monotonic()
        slot.channel = Channel(ours)
        self.stream.catch_up(slot.channel)
        self._task(slot.channel.serve(slot, self._message))

    def _worker(self, index: int, sock: socket.socket, supervisor: int) -> int:
        """In the forked child: forget the supervisor's loop, signal handlers and sockets, then serve."""
        import uvloop

        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop_policy(None)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
        _die_with_parent()
        if os.getppid() != supervisor:  # it died before prctl took effect
            return 0
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        for other in self.slots:
            if other.channel is not None:
                other.channel.sock.close()
        structlog.contextvars.bind_contextvars(worker=index)
        try:
            uvloop.run(run(self.config, WorkerLink(sock, index, self.stream.journal, self.inherited)))
        except (UsersFileError, ACLError, ValueError, OSError) as e:
            print(f"redisguard: worker {index}: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            pass
        except BaseException:
            traceback.print_exc()
            return 1
        return 0

    def _task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- what the workers ask for ------------------------------------------------------------------
    def _message(self, slot: Slot, msg: Message) -> None:
        op = msg.get("op")
        if op == "change":
            self.stream.change(slot, msg)
        elif op == "applied":
            self.stream.applied(slot, msg)
        elif op == "reload_request":
            self.reload_all("worker", msg.get("files"))
        elif op == "reloaded":
            self.aggregate.reloaded(msg["generation"], msg["ok"])

    def reload_all(self, why: str, files: dict[str, str] | None = None) -> None:
        """SIGHUP, or a worker's SIGHUP or file watch: every worker reloads (see ChangeStream.reload)."""
        if not self.stopping:
            self.stream.reload(why, files)

    async def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        return await self.aggregate.ready()

    # -- exits, restarts, stop ---------------------------------------------------------------------
    def reap(self) -> None:
        """SIGCHLD: collect every exited worker; restart it unless stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, os.waitstatus_to_exitcode(status))
        if self.stopping and not any(s.pid for s in self.slots) and self.done is not None and not self.done.done():
            self.done.set_result(self.code)

    def _exited(self, slot: Slot, code: int) -> None:
        self.aggregate.retire(slot)
        slot.pid, slot.channel = 0, None
        self.stream.gone(slot)
        if self.stopping:
            log.info("worker_stopped", worker=slot.index, exit=code)
            return
        lived = time.monotonic() - slot.started
        slot.early_exits = slot.early_exits + 1 if lived < STABLE_AFTER else 1
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if slot.early_exits > MAX_EARLY_EXITS:
            log.error("worker_restart_limit", worker=slot.index, exit=how,
                      detail=f"a worker exited {slot.early_exits} times in a row within {STABLE_AFTER:g} s of its "
                      "start: stopping (see the worker's error above)")  # fmt: skip
            self.stop(1)
            return
        delay = min(BACKOFF_MAX, BACKOFF * 2 ** (slot.early_exits - 1))
        log.warning("worker_exited", worker=slot.index, exit=how, lived=round(lived, 1), restart_in=delay)
        asyncio.get_running_loop().call_later(delay, self._restart, slot)

    def _restart(self, slot: Slot) -> None:
        if self.stopping or slot.pid:
            return
        self.aggregate.restarts.inc()
        self.spawn(slot)

    def stop(self, code: int = 0) -> None:
        """SIGTERM/SIGINT: every worker drains and exits; then the supervisor does."""
        if self.stopping:
            return
        self.stopping, self.code = True, code
        live = [s.pid for s in self.slots if s.pid]
        log.info("redisguard_stopping", workers=len(live))
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(self.config.server.drain_timeout + STOP_MARGIN, self._kill_stragglers)
        self.reap()

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            if slot.pid:
                log.warning("worker_killed", worker=slot.index, detail="still running after drain_timeout + 10 s")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """Linux: SIGTERM (a drain) for this process when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(config: Config) -> int:
    """``redisguard serve`` with ``[server] workers`` > 1: the exit code."""
    sup = Supervisor(config)
    sup.bind()
    return asyncio.run(sup.run())
