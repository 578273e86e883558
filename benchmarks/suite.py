"""redisguard side by side with the alternatives, in one run: `python benchmarks/suite.py`.

    .venv/bin/python benchmarks/suite.py                # the full run (~10 minutes): writes benchmarks/results/
                                                        # <YYYY-MM-DD-HHMM>.md and the block in benchmarks/README.md
    .venv/bin/python benchmarks/suite.py --quick        # a smoke run: tiny sizes, prints the report only

Starts, on free loopback ports and all in front of one plaintext redis-server: Redis itself (plaintext,
the limit; and its native TLS port), stunnel4, HAProxy (TCP mode, TLS termination), a bare Python
uvloop TLS relay (benchmarks/relay.py, the floor) and redisguard with a realistic policy (metrics on,
log level warning); with 2 workers too if this redisguard supports ``[server] workers``. Then, target
after target in the same run (so the figures compare as ratios even on a noisy machine):
redis-benchmark --tls -c 50 (GET and SET at P=1 and P=16, 1 KiB values, a mix with ~5% denied
commands), redisguard with 10 vs 10,000 users, the cost per ACL decision, memory per idle TLS
connection and TLS handshakes per second. Work files live in a temp dir; every process started is
stopped by PID at the end, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import acl_decision  # noqa: E402
from benchmarks.measure import MixedResult, Workload, benchmark, handshakes, idle_memory, mixed  # noqa: E402
from benchmarks.report import Report, machine, update_readme  # noqa: E402
from benchmarks.targets import (  # noqa: E402
    INSTALL_HINT,
    REPO,
    Processes,
    Target,
    start_haproxy,
    start_redis,
    start_redisguard,
    start_relay,
    start_stunnel,
    workers_supported,
)
from redisguard.cli.certs import init_dev_certs  # noqa: E402

WORKLOADS = [
    Workload("GET P=1", 1, tests="get"),
    Workload("SET P=1", 1, tests="set"),
    Workload("GET P=16", 16, tests="get"),
    Workload("SET P=16", 16, tests="set"),
    Workload("GET 1 KiB P=1", 1, tests="get", datasize=1024),
    Workload("SET 1 KiB P=1", 1, tests="set", datasize=1024),
]
MIXED_PIPELINES = (1, 16)
SECTIONS = ("throughput", "mixed", "users", "acl", "idle", "handshakes")
RATIO_TITLES = {"stunnel": "stunnel", "haproxy": "HAProxy", "relay": "relay"}  # target kind -> ratio column
T = TypeVar("T")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:5]))  # fmt: skip
    ap.add_argument("--requests", type=int, help="requests per redis-benchmark run (default 100000; --quick 2000)")
    ap.add_argument("--idle", type=int, help="idle TLS connections per target (default 2000; --quick 200)")
    ap.add_argument("--handshake-seconds", type=float, help="per target and mode (default 5; --quick 2)")
    ap.add_argument("--workers", default="1,2", help="redisguard worker counts to run (default 1,2; >1 needs support)")
    ap.add_argument("--many-users", type=int, help="users in the large users file (default 10000)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for checking the suite itself; the figures mean nothing")
    ap.add_argument("--out", type=Path, help="results directory (default benchmarks/results; --quick: none, unless given)")
    ap.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    ap.add_argument("--skip", default="", help="sections to leave out, comma-separated: " + ",".join(SECTIONS))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) for a look afterwards")
    a = ap.parse_args(argv)
    quick = a.quick
    a.requests = a.requests or (2000 if quick else 100_000)
    a.idle = a.idle or (200 if quick else 2000)
    a.handshake_seconds = a.handshake_seconds or (2.0 if quick else 5.0)
    a.many_users = a.many_users or 10_000
    a.acl_iterations = 20_000 if quick else 200_000
    a.workers = sorted({int(w) for w in a.workers.split(",") if w.strip()})
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if a.out is None and not quick:
        a.out = REPO / "benchmarks" / "results"
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stopped_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C does, so the ``finally`` that stops the targets runs."""

    def raise_exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def raise_nofile() -> None:
    # 2,000 idle connections per target: the suite holds them and the targets inherit the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def each(targets: list[Target], what: str, fn: Callable[[Target], T]) -> dict[str, T]:
    """``fn`` for every target in turn, with a progress line; one failing target is a note, not the end."""
    out: dict[str, T] = {}
    for t in targets:
        try:
            out[t.name] = fn(t)
        except RuntimeError as e:
            log(f"  {what} / {t.name}: FAILED: {e}")
            continue
        log(f"  {what} / {t.name}: {out[t.name]}")
    return out


def allowed_rps(report: Report, name: str, pipeline: int) -> float | None:
    """The mean of the target's GET and SET rate at this pipeline depth, if the run measured them."""
    rates = [report.throughput.get(f"{cmd} P={pipeline}", {}).get(name) for cmd in ("GET", "SET")]
    return sum(r.rps for r in rates if r) / 2 if all(rates) else None


def redisguard_tickets(cfg: Path) -> str:
    """How redisguard's TLS server context handles resumption, read from the context it would build."""
    from redisguard.config.load import load_config
    from redisguard.transport.tls import server_context

    ctx = server_context(next(lst for lst in load_config(cfg).listeners if lst.type == "tls"))
    tickets = "off (OP_NO_TICKET)" if ctx.options & ssl.OP_NO_TICKET else f"on, {ctx.num_tickets} per handshake"
    return (f"redisguard's TLS server context (redisguard/transport/tls.py): OpenSSL's defaults for resumption: session tickets "
            f"{tickets}; the ticket key is per context, kept until the listener's settings or certificates change, "
            f"and built by the supervisor before it forks: every worker has the same key, so a session resumes "
            f"whichever worker accepts it, and across a reload that changes no certificate (not across a restart).")  # fmt: skip


def run(a: argparse.Namespace, work: Path, ps: Processes, report: Report) -> None:
    certs = work / "certs"
    init_dev_certs(certs)  # redisguard's own dev CA and server certificate, for every target
    ca = certs / "ca.pem"
    plain, redis_tls = start_redis(ps, certs)
    refs: list[Target] = [plain, redis_tls]
    for name, starter in (("stunnel", start_stunnel), ("HAProxy", start_haproxy)):
        try:
            t = starter(ps, certs, plain.port)
        except RuntimeError as e:  # installed but would not start: the rest of the run is still worth having
            report.notes.append(f"{name} did not start: left out ({str(e).splitlines()[0]})")
            log(f"{name} did not start: {e}")
            continue
        if t is None:
            report.notes.append(f"{name} is not installed: left out (`{INSTALL_HINT}`)")
            log(f"{name} not installed: skipped ({INSTALL_HINT})")
        else:
            refs.append(t)
    relay = start_relay(ps, certs, plain.port)
    refs.append(relay)
    guards = [start_redisguard(ps, certs, plain.port, "redisguard")] if 1 in a.workers else []
    for w in (w for w in a.workers if w > 1):
        why = workers_supported(work, certs)
        if why is None:
            guards.append(start_redisguard(ps, certs, plain.port, f"redisguard, {w} workers", workers=w))
        else:
            report.notes.append(f"redisguard {w} workers: not run, this redisguard refuses `[server] workers` ({why})")
            log(f"workers = {w}: not supported by this redisguard: {why}")
    report.references = {RATIO_TITLES[t.kind]: t.name for t in refs if t.kind in RATIO_TITLES}
    report.proxied = [g.name for g in guards]
    targets = refs + guards
    tls_targets = [t for t in targets if t.tls]
    time.sleep(1.0)  # everyone listening and settled (redisguard fetches COMMAND INFO at start)

    def mix(pipeline: int, t: Target) -> MixedResult:
        return mixed(t, ca, pipeline, a.requests, allowed_rps(report, t.name, pipeline))

    if "idle" not in a.skip:  # first: on fresh processes, no target reuses memory earlier connections freed
        log(f"{a.idle} idle TLS connections per target:")
        report.idle = each(tls_targets, "idle", lambda t: idle_memory(t, ca, a.idle))
    if "throughput" not in a.skip:
        for w in WORKLOADS:
            log(f"{w.label}:")
            report.throughput[w.label] = each(targets, w.label, functools.partial(benchmark, ca=ca, w=w, requests=a.requests))
    if "mixed" not in a.skip:
        for p in MIXED_PIPELINES:
            label = f"GET+SET with ~5% denied, P={p}"
            log(f"{label}:")
            res = each(targets, label, functools.partial(mix, p))
            report.throughput[label] = {n: m.allowed for n, m in res.items()}
            report.denied_share[label] = {n: m.denied_share for n, m in res.items()}
    if "users" not in a.skip and guards and 1 in a.workers:
        many = start_redisguard(ps, certs, plain.port, f"{a.many_users:,} users", users=a.many_users)
        few = Target("10 users", guards[0].port, guards[0].proc, auth=guards[0].auth, kind="redisguard")
        get16 = Workload("GET P=16", 16, tests="get")
        log("users file size:")
        report.users_scale = each([few, many], "GET P=16", lambda t: benchmark(t, ca, get16, a.requests))
        ps.stop(many.proc)
    if "acl" not in a.skip:
        log("ACL decision cost (in process)...")
        report.acl = acl_decision.measure(a.acl_iterations)
    if "handshakes" not in a.skip:
        log(f"TLS handshakes, {a.handshake_seconds:g} s per target and mode:")
        secs = a.handshake_seconds
        for t in tls_targets:
            full = each([t], "full handshakes", lambda t: handshakes(t, ca, secs, resume=False))
            resumed = each([t], "resumed handshakes", lambda t: handshakes(t, ca, secs, resume=True))
            if full and resumed:
                report.handshakes[t.name] = (full[t.name], resumed[t.name])
        if guards:
            assert guards[0].config is not None
            report.notes.append(redisguard_tickets(guards[0].config))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    missing = [b for b in ("redis-server", "redis-benchmark") if shutil.which(b) is None]
    if missing:
        log(f"{', '.join(missing)} not found: apt-get install redis-server redis-tools")
        return 2
    raise_nofile()
    command = "benchmarks/suite.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    params = (f"{a.requests:,} requests per redis-benchmark run, 50 clients; {a.idle:,} idle connections; "
              f"{a.handshake_seconds:g} s per handshake test")
    if a.quick:
        params += "; --quick: sizes too small for the figures to mean anything"
    report = Report(command.strip(), params, machine(REPO), {}, [])
    work = Path(tempfile.mkdtemp(prefix="redisguard-suite-"))
    ps = Processes(work)
    try:
        with stopped_on_signals():
            run(a, work, ps, report)
    except KeyboardInterrupt:
        log("interrupted: stopping every process the suite started")
        return 130
    finally:
        ps.stop_all()
        if a.keep:
            log(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report.render()
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"{time.strftime('%Y-%m-%d-%H%M')}{'-quick' if a.quick else ''}.md"
        path.write_text(text)
        log(f"wrote {path}")
        if not a.no_readme and not a.quick:
            update_readme(REPO / "benchmarks" / "README.md", text)
            log("updated benchmarks/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
