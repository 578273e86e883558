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

**Metrics: an aggregating endpoint, not prometheus-client's multiprocess mode.** The supervisor
serves the one ``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] address``; for ``/metrics`` it
asks every worker for its exposition over the private channel (:mod:`.worker_link`) and merges them
(:mod:`.metrics_merge`: counters and histograms summed, counting gauges summed, the others by min or
max). Multiprocess mode was not chosen because it changes the hot path and the metrics we have: every
increment becomes a write into a memory-mapped file, ``set_function`` gauges (descriptors accounted)
are not supported, the allowed-command tallies the observer flushes before a render would only be
flushed in the process that renders, and its files must be managed per pid. Aggregating keeps each
worker's metrics exactly as in one process (and ``workers = 1`` untouched), at the cost of one
round trip per worker per scrape. The supervisor adds ``redisguard_workers{state}`` (configured,
running, ready) and ``redisguard_worker_restarts_total``. ``/readyz`` is ready only when all N workers
are up and each is ready (its listeners, certificates, the upstream PING).

**ACL administration** (ACL SETUSER / DELUSER / LOAD) is ordered here, with the reloads, into one
stream every worker applies; the client is answered once every worker has applied its change, and a
worker that does not within ACK_TIMEOUT (LOAD_ACK_TIMEOUT for an ACL LOAD) is killed and restarted
rather than left serving the old rights: see :mod:`.worker_link`. A worker forked later catches up
from the journal of changes since the last reload and the stream, before it listens.

**Per worker** (documented in the README): the AUTH throttle, ACL LOG, the audit-log rate limits
and the upstream health check. Limits are shared: each worker gets ``ceil(limit / N)`` of a
listener's ``max_connections``, ``max_pending_handshakes`` and ``max_handshakes_per_source``, and
``auth_failures_per_minute / N``, so the proxy as a whole holds what the config says (the kernel's
spread is not exact, so one worker may refuse a little before the total is reached); ``fd_reserve`` is
per process, as the descriptor limit is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest

from redisguard.acl import ACLError, UsersFileError
from redisguard.acl.users_file import read_users_file
from redisguard.config.model import Config
from redisguard.files.versions import FileChanged, FileUnreadable, read_now
from redisguard.observe import metrics_merge
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import serve_http
from redisguard.runtime.server import remove_socket, run
from redisguard.runtime.watch import watched_files
from redisguard.runtime.worker_link import Endpoint, Journal, WorkerLink, encode_files, read_message
from redisguard.transport.listeners import REUSE_PORT

log = get_logger("redisguard")

BACKOFF, BACKOFF_MAX = 0.5, 30.0  # restart delay: doubles while a worker keeps dying early
STABLE_AFTER = 10.0  # a worker that ran this long before exiting starts the count again
MAX_EARLY_EXITS = 5  # this many early exits in a row: give up
STOP_MARGIN = 10.0  # SIGTERM, then SIGKILL for workers still running this long after their drain_timeout
ASK_TIMEOUT = 5.0  # a worker's answer to a metrics or readiness request
PR_SET_PDEATHSIG = 1
# A worker applies an ACL SETUSER / DELUSER at once (on the loop, well under a second even with 10,000
# users); an ACL LOAD reads the users file in its turn, after any reload in flight.
ACK_TIMEOUT = 10.0
LOAD_ACK_TIMEOUT = 60.0


class Channel(Endpoint):
    """One worker process's end of the channel, seen from the supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writer: asyncio.StreamWriter | None = None
        self.backlog: list[dict[str, Any]] = []  # sent before the stream was open
        self.waiting: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self.up = False  # the worker said its listeners are up
        self.synced = False  # the worker applies the stream of changes from here on (it asked to sync)


@dataclass(eq=False)
class Pending:
    """A change sent to every worker, not yet applied by all of them."""

    msg: dict[str, Any]
    origin: int
    generation: int  # reloads before it: its journal lines are stale after another reload
    waiting: set[int]  # the slots that must say they applied it
    lines: dict[str, str | None] = field(default_factory=dict)  # the users it made, for the journal


@dataclass
class Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    early_exits: int = 0
    channel: Channel | None = None
    last: metrics_merge.Families = field(default_factory=dict)  # the worker's last scrape


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.n = config.server.workers
        self.slots = [Slot(i) for i in range(self.n)]
        self.journal: Journal = {}  # ACL SETUSER / DELUSER since the last reload, for new workers
        self.seq = 0  # the stream of users changes: the last sequence number given
        self.generation = 0  # reloads so far
        self.pending: dict[int, Pending] = {}  # changes sent, by sequence number, not yet applied everywhere
        self.retired: metrics_merge.Families = {}  # counters of workers that exited
        self.inherited: dict[str, socket.socket] = {}  # unix listeners, by name
        self.unix_inodes: dict[Path, int] = {}  # their paths (only these are removed at the end)
        self.metrics_sock: socket.socket | None = None
        self.stopping = False
        self.code = 0
        self.done: asyncio.Future[int] | None = None
        self.next_id = 0
        self.tasks: set[asyncio.Future[Any]] = set()
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.workers_gauge = Gauge("redisguard_workers", "Worker processes: configured ([server] workers), running "
                                   "(forked, not yet exited), ready (listeners up).", ["state"], registry=r)  # fmt: skip
        self.restarts = Counter("redisguard_worker_restarts", "Workers forked again after one exited unexpectedly.",
                                registry=r)  # fmt: skip

    # -- before the loop ---------------------------------------------------------------------------
    def bind(self) -> None:
        """The sockets the workers share: unix listeners (they accept on them) and the metrics port."""
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
            http = await serve_http(self.render, m.host, m.port, self.ready, sock=self.metrics_sock)
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
        for change in self.pending.values():  # (its journal copy has the committed ones)
            slot.channel.send(change.msg)
        self._task(self._serve_channel(slot, slot.channel))

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
            uvloop.run(run(self.config, WorkerLink(sock, index, self.journal, self.inherited)))
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

    async def _serve_channel(self, slot: Slot, ch: Channel) -> None:
        reader, ch.writer = await asyncio.open_unix_connection(sock=ch.sock)
        for queued in ch.backlog:
            ch.send(queued)
        ch.backlog.clear()
        try:
            while (msg := await read_message(reader)) is not None:
                if "op" not in msg:  # an answer to ask()
                    fut = ch.waiting.get(msg.get("id", -1))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif msg.get("op") == "started":
                    ch.up = True
                    log.info("worker_started", worker=slot.index, pid=slot.pid)
                elif msg.get("op") == "sync":
                    ch.synced = True  # every change from here on waits for its word
                    ch.send({"op": "synced"})
                elif msg.get("op") == "change":
                    self.change(slot, msg)
                elif msg.get("op") == "applied":
                    self.applied(slot, msg)
                elif msg.get("op") == "reload_request":
                    self.reload_all("worker", msg.get("files"))
        finally:
            ch.up = False
            for fut in ch.waiting.values():
                if not fut.done():
                    fut.set_result(None)
            ch.writer.close()

    # -- what the workers ask for ------------------------------------------------------------------
    def change(self, origin: Slot, msg: dict[str, Any]) -> None:
        """ACL SETUSER / DELUSER / LOAD on one worker: the next in the stream, sent to every worker."""
        self.seq += 1
        out = {"op": "apply", "seq": self.seq, "origin": origin.index, "pid": origin.pid, "id": msg["id"],
               "change": msg["change"]}  # fmt: skip
        load = msg["change"][0] == "load"
        if load:
            self.journal.clear()  # the file is the truth again
            self.generation += 1
            try:  # read once, here, for every worker: they cannot load different versions of it
                out["data"] = base64.b64encode(read_users_file(self.config.acl.users_file)).decode()
            except UsersFileError as e:
                out["error"] = str(e)
        waiting = {s.index for s in self.slots if s.channel is not None and s.channel.synced}
        change = self.pending[self.seq] = Pending(out, origin.index, self.generation, waiting)
        self._broadcast(out)
        self._task(self._deadline(self.seq, change, LOAD_ACK_TIMEOUT if load else ACK_TIMEOUT))

    def applied(self, slot: Slot, msg: dict[str, Any]) -> None:
        change = self.pending.get(msg["seq"])
        if change is None:
            return
        if not change.lines:  # (every worker renders the same lines; the origin may be gone)
            change.lines = {**msg.get("set", {}), **dict.fromkeys(msg.get("deleted", []))}
        change.waiting.discard(slot.index)
        self._committed(msg["seq"])

    def _committed(self, seq: int) -> None:
        """Once every worker has applied change ``seq`` (or is gone): journal it, tell its origin."""
        change = self.pending[seq]
        if change.waiting:
            return
        del self.pending[seq]
        if change.generation == self.generation:
            self.journal.update(change.lines)
        origin = self.slots[change.origin]
        if origin.channel is not None and origin.pid == change.msg["pid"]:  # (not a restarted worker in its slot)
            origin.channel.send({"op": "committed", "id": change.msg["id"]})

    async def _deadline(self, seq: int, change: Pending, timeout: float) -> None:
        """A worker that has not applied a change in time is killed, never left with the old rights."""
        await asyncio.sleep(timeout)
        if seq not in self.pending:
            return
        for index in sorted(change.waiting):
            slot = self.slots[index]
            log.error("worker_killed", worker=index, detail=f"did not apply an ACL change within {timeout:g} s")
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        # (its exit is reaped: _exited then commits the change)

    def reload_all(self, why: str, files: dict[str, str] | None = None) -> None:
        """SIGHUP, or a worker's SIGHUP or file watch: every worker reloads (users file, certificates,
        TOML) from the same bytes — ``files`` (encoded), as the file watch found them stable, or read
        here now, once and re-read (read_now) — so no two workers can load different versions."""
        if self.stopping:
            return
        self.journal.clear()  # the files are the truth again
        self.generation += 1
        log.info("reload_workers", reason=why, workers=self.n)
        msg: dict[str, Any] = {"op": "reload", "files": files}
        if files is None:
            try:  # (a few MiB at most, on the supervisor's loop: it carries no client traffic)
                msg["files"] = encode_files(read_now(watched_files(self.config)))
            except (FileChanged, FileUnreadable) as e:
                msg = {"op": "reload", "error": str(e)}
        self._broadcast(msg)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.send(msg)

    async def ask(self, slot: Slot, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A worker's answer to a request, or None (no worker, it exited, or it did not answer in time)."""
        ch = slot.channel
        if ch is None or not ch.up:
            return None
        self.next_id += 1
        rid = self.next_id
        fut = ch.waiting[rid] = asyncio.get_running_loop().create_future()
        ch.send({**msg, "id": rid})
        try:
            return await asyncio.wait_for(fut, ASK_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            ch.waiting.pop(rid, None)

    async def render(self) -> bytes:
        answers = await asyncio.gather(*(self.ask(s, {"op": "metrics"}) for s in self.slots))
        for slot, answer in zip(self.slots, answers, strict=True):
            if answer is not None:
                slot.last = metrics_merge.parse(answer["text"])
        merged = metrics_merge.merge([s.last for s in self.slots if s.pid], self.retired)
        self.workers_gauge.labels("configured").set(self.n)
        self.workers_gauge.labels("running").set(sum(1 for s in self.slots if s.pid))
        self.workers_gauge.labels("ready").set(sum(1 for s in self.slots if s.channel is not None and s.channel.up))
        return metrics_merge.render(merged) + generate_latest(self.registry)

    async def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        up = sum(1 for s in self.slots if s.channel is not None and s.channel.up)
        if up < self.n:
            return False, f"{up} of {self.n} workers up"
        answers = await asyncio.gather(*(self.ask(s, {"op": "ready"}) for s in self.slots))
        whys = []
        for slot, answer in zip(self.slots, answers, strict=True):
            if answer is None or not answer["ok"]:
                return False, f"worker {slot.index}: {answer['why'] if answer else 'did not answer'}"
            whys.append(answer["why"])
        return True, f"{whys[0]}; {self.n} workers"

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
        metrics_merge.retire(self.retired, slot.last)
        slot.pid, slot.last, slot.channel = 0, {}, None
        for seq, change in list(self.pending.items()):  # a worker that is gone serves no one
            change.waiting.discard(slot.index)
            self._committed(seq)
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
        self.restarts.inc()
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
