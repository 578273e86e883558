"""What the suite measures against one target: redis-benchmark runs (plus a load of denied commands
for the mixed workload), memory per idle TLS connection, and TLS handshakes per second. Each also
reads the CPU time the target's process(es) spent, from /proc: on a shared 2-core machine CPU per
request is steadier than requests per second."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import uvloop

from benchmarks.targets import Target

CLIENTS = 50


@dataclass(frozen=True)
class Workload:
    """One redis-benchmark invocation (``-t tests``)."""

    label: str
    pipeline: int = 1
    tests: str = ""  # "get" / "set"
    datasize: int = 3


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    cpu_us: float | None = None  # the target's CPU time per request (all its processes and threads)

    def __str__(self) -> str:
        cpu = f", {self.cpu_us:.1f} µs CPU/req" if self.cpu_us is not None else ""
        return f"{self.rps:,.0f} rps, p50 {self.p50_ms:.3f} ms{cpu}"


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (every thread included), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone: counts nothing
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from the state (3)
    return total / _TICK


@contextmanager
def cpu_meter(t: Target) -> Iterator[list[float]]:
    """Yields a list that holds the target's CPU seconds spent inside the block, once it ends."""
    pids = t.pids()
    spent: list[float] = []
    before = cpu_seconds(pids)
    yield spent
    spent.append(cpu_seconds(pids) - before)


def benchmark_argv(t: Target, ca: Path, w: Workload, requests: int, clients: int = CLIENTS) -> list[str]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(t.port), "-n", str(requests), "-c", str(clients),
            "-P", str(w.pipeline), "-d", str(w.datasize), "--csv", "-q"]  # fmt: skip
    if t.tls:
        argv += ["--tls", "--cacert", str(ca)]
    if t.auth:
        argv += ["--user", t.auth[0], "-a", t.auth[1]]
    return argv + ["-t", w.tests]


def parse_csv(out: str) -> Result:
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r.get("rps")]
    if len(rows) != 1:
        raise RuntimeError(f"expected one redis-benchmark CSV row, got: {out.strip()[-500:]!r}")
    return Result(float(rows[0]["rps"]), float(rows[0]["p50_latency_ms"]))


def run_benchmarks(argvs: list[list[str]], timeout: float = 1800) -> list[Result]:
    """Run redis-benchmark processes side by side (one for a plain workload) and parse each one's CSV.
    They are killed if anything goes wrong, so none outlives the suite."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"redis-benchmark exited {p.returncode}: {err.strip()[-500:]}")
    return [parse_csv(out) for out, _ in outs]


def benchmark(t: Target, ca: Path, w: Workload, requests: int) -> Result:
    with cpu_meter(t) as cpu:
        r = run_benchmarks([benchmark_argv(t, ca, w, requests)])[0]
    return replace(r, cpu_us=cpu[0] / requests * 1e6)


# The mixed workload: redis-benchmark GET and SET clients (24 + 24), and alongside them a few clients
# sending a command the bench user may not run (redisguard answers -NOPERM itself; the other targets just
# run it). redis-benchmark exits on the first error reply, so the denied load is our own client (below),
# paced at DENIED_SHARE of the rate the same target reached for plain GET and SET at that pipeline depth
# earlier in the run. The share it came to is measured and reported.
MIX_CLIENTS = 24  # per allowed command
DENIED_CLIENTS = 3  # enough connections to keep up with the pace at P=1
DENIED_SHARE = 0.05


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class DeniedLoad:
    """``clients`` connections in a thread of their own, each sending ``pipeline`` ``GET secret:<n>`` at
    a time and waiting for the replies (one line each: -NOPERM, or a nil from plain Redis), at ``pace``
    commands per second in all (None: as fast as the replies come), until stopped. ``rate`` is commands
    answered per second while it ran."""

    def __init__(self, t: Target, ca: Path, clients: int, pipeline: int, pace: float | None) -> None:
        self.t, self.ca, self.clients, self.pipeline = t, ca, clients, pipeline
        self.interval = pipeline * clients / pace if pace else 0.0  # between one connection's batches
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.count = 0
        self.elapsed = 0.0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def __enter__(self) -> DeniedLoad:
        self.thread.start()
        self.ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"{self.t.name}: denied load failed: {self.error!r}")

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as e:  # (raised in the caller's thread by __exit__)
            self.error = e
        finally:
            self.ready.set()

    async def _main(self) -> None:
        ctx = client_context(self.ca) if self.t.tls else None
        conns = [await asyncio.open_connection("127.0.0.1", self.t.port, ssl=ctx) for _ in range(self.clients)]
        for r, w in conns:
            if self.t.auth:
                w.write(command(b"AUTH", *(s.encode() for s in self.t.auth)))
                if not (await r.readline()).startswith(b"+OK"):
                    raise RuntimeError("AUTH failed")
        t0 = time.perf_counter()
        self.ready.set()
        await asyncio.gather(*(self._loop(r, w) for r, w in conns))
        self.elapsed = time.perf_counter() - t0
        for _, w in conns:
            w.close()

    async def _loop(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + random.random() * self.interval  # (spread the connections' batches)
        while not self.stop.is_set():
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            due = max(due + self.interval, loop.time() - 10 * self.interval)  # behind: catch up, but not in a burst
            w.write(b"".join(command(b"GET", b"secret:%d" % random.randrange(100_000)) for _ in range(self.pipeline)))
            for _ in range(self.pipeline):
                line = await r.readline()
                if not line.startswith((b"-NOPERM", b"$-1")):
                    raise RuntimeError(f"unexpected reply to a denied GET: {line!r}")
            self.count += self.pipeline


@dataclass(frozen=True)
class MixedResult:
    allowed: Result  # GET + SET together: rps summed, the slower p50; CPU per command of either kind
    denied_share: float  # of all commands, as run

    def __str__(self) -> str:
        return f"{self.allowed} (allowed), {self.denied_share:.1%} denied"


def mixed(t: Target, ca: Path, pipeline: int, requests: int, allowed_rps: float | None) -> MixedResult:
    """``allowed_rps``: what the target did for GET and SET alone (sets the denied pace; None: unpaced)."""
    n = requests // 2
    argvs = [benchmark_argv(t, ca, Workload(test, pipeline, tests=test), n, MIX_CLIENTS) for test in ("get", "set")]
    pace = allowed_rps * DENIED_SHARE / (1 - DENIED_SHARE) if allowed_rps else None
    with cpu_meter(t) as cpu, DeniedLoad(t, ca, DENIED_CLIENTS, pipeline, pace) as denied:
        get, set_ = run_benchmarks(argvs)
    allowed = Result(get.rps + set_.rps, max(get.p50_ms, set_.p50_ms), cpu[0] / (2 * n + denied.count) * 1e6)
    return MixedResult(allowed, denied.rate / (denied.rate + allowed.rps))


# --- memory per idle TLS connection ----------------------------------------------------------------


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass  # gone: counts nothing
    return total


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def hello(t: Target) -> bytes:
    """What each connection sends: AUTH where the target enforces ACLs (so it holds an upstream
    connection, as the plain proxies do), then PING."""
    auth = b""
    if t.auth:
        user, pw = (s.encode() for s in t.auth)
        auth = b"*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(user), user, len(pw), pw)
    return auth + b"*1\r\n$4\r\nPING\r\n"


@dataclass(frozen=True)
class IdleResult:
    connected: int
    kib_per_conn: float
    setup_s: float

    def __str__(self) -> str:
        return f"{self.connected} connections, {self.kib_per_conn:.1f} KiB each"


async def _idle(t: Target, ca: Path, n: int, handshakes_at_once: int) -> IdleResult:
    ctx = client_context(ca)
    gate = asyncio.Semaphore(handshakes_at_once)  # below redisguard's max_handshakes_per_source (64)
    replies = 2 if t.auth else 1
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with gate:
            r, w = await asyncio.open_connection("127.0.0.1", t.port, ssl=ctx)
            writers.append(w)
            w.write(hello(t))
            for _ in range(replies):
                line = await r.readline()
                if not line.startswith((b"+", b"$")):
                    raise RuntimeError(f"{t.name}: unexpected reply {line!r}")

    pids = t.pids()
    before = rss_kib(pids)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    setup = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # let the servers finish their own bookkeeping before counting
    after = rss_kib(pids)
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    ok = sum(1 for r in results if r is None)
    if ok < n:
        err = next(r for r in results if r is not None)
        raise RuntimeError(f"{t.name}: {n - ok} of {n} idle connections failed: {err!r}")
    return IdleResult(ok, (after - before) / n, setup)


def idle_memory(t: Target, ca: Path, n: int, handshakes_at_once: int = 32) -> IdleResult:
    """Open ``n`` TLS connections that each did one round trip and then sit idle; RSS growth of the
    target's process(es) per connection, from /proc (Redis's own for Redis TLS, the proxy's for proxies)."""
    result = asyncio.run(_idle(t, ca, n, handshakes_at_once))
    time.sleep(1.0)  # the closes reach the server before the next target is measured
    return result


# --- TLS handshakes per second ---------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeResult:
    per_second: float
    reused: float  # share of handshakes that resumed a session
    cpu_us: float  # the target's CPU time per connection (handshake, PING, close)

    def __str__(self) -> str:
        return f"{self.per_second:,.0f}/s ({self.reused:.0%} resumed), {self.cpu_us:.0f} µs CPU each"


def handshakes(t: Target, ca: Path, seconds: float, resume: bool, threads: int = 4) -> HandshakeResult:
    """Sequential connect + handshake + PING round trip + close from a few client threads (the ssl
    module releases the GIL during handshakes), for ``seconds``. With ``resume`` each thread offers the
    session from its last full handshake (a TLS 1.3 ticket arrives after the handshake, hence the round
    trip before the session is taken)."""
    ctx = client_context(ca)
    stop = time.monotonic() + seconds
    counts: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        done = reused = 0
        session: ssl.SSLSession | None = None
        try:
            while time.monotonic() < stop:
                with socket.create_connection(("127.0.0.1", t.port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost", session=session if resume else None) as s:  # fmt: skip
                    s.sendall(b"*1\r\n$4\r\nPING\r\n")
                    if not s.recv(256):
                        raise RuntimeError("closed before replying")
                    done += 1
                    reused += bool(s.session_reused)
                    if resume:
                        session = s.session  # the newest ticket
        except BaseException as e:  # (reported in the main thread)
            errors.append(e)
        counts.append((done, reused))

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    with cpu_meter(t) as cpu:
        started = time.monotonic()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{t.name}: handshake test failed: {errors[0]!r}")
    done = max(sum(c[0] for c in counts), 1)
    return HandshakeResult(done / elapsed, sum(c[1] for c in counts) / done, cpu[0] / done * 1e6)
