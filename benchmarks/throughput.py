"""redis-benchmark --tls through redisguard and the alternatives, in one run.

    .venv/bin/python benchmarks/throughput.py [--requests 100000] [--clients 50] [--out benchmarks/RESULTS.md]

Targets (each on a free loopback port, all in front of the same plaintext redis-server):
  redis-native-tls   redis-server's own TLS port (no proxy)
  stunnel            stunnel4 terminating TLS (if installed)
  haproxy            HAProxy in TCP mode terminating TLS (if installed)
  redisguard         TLS + ACL check per command, metrics on
  redisguard-nometrics  the same with [metrics] enabled = false (the cost of metrics)
Every target is hit by the same redis-benchmark invocation; the figures are requests per second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from redisguard.certs import init_dev_certs  # noqa: E402
from redisguard.demo import free_port, wait_port, write_config  # noqa: E402

PASSWORD = "bench-password"  # benchmark-only credential


def start(args: list[str], port: int, **kw) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    wait_port(port, p)
    return p


def redisguard(d: Path, certs: Path, redis_port: int, metrics: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    users = d / "users.acl"
    users.write_text(f"user default off\nuser bench on >{PASSWORD} ~* &* +@all -@dangerous\n")
    sub = d / str(port)
    sub.mkdir()
    cfg = write_config(sub, port, free_port(), redis_port, free_port(), users, certs, disabled="[]",
                       metrics=f"enabled = {'true' if metrics else 'false'}", log='level = "warning"')  # fmt: skip
    return start([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)], port), port


def bench(port: int, certs: Path, requests: int, clients: int, pipeline: int, auth: bool) -> dict[str, float]:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--tls", "--cacert", str(certs / "ca.pem"),
           "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "-t", "ping,set,get", "-q", "--csv"]  # fmt: skip
    if auth:
        cmd += ["--user", "bench", "-a", PASSWORD]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    res = {}
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2 and parts[0] != "test":
            with contextlib.suppress(ValueError):
                res[parts[0]] = float(parts[1])
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    certs = d / "certs"
    init_dev_certs(certs)
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, tuple[int, bool]] = {}
    try:
        rport, tport = free_port(), free_port()
        procs.append(start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--tls-port", str(tport), "--tls-cert-file", str(certs / "server.pem"),
                            "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.pem"),
                            "--tls-auth-clients", "no"], rport))  # fmt: skip
        wait_port(tport)
        targets["redis-native-tls"] = (tport, False)
        if shutil.which("stunnel4") or shutil.which("stunnel"):
            sport = free_port()
            conf = d / "stunnel.conf"
            conf.write_text(f"foreground = yes\npid =\n[redis]\naccept = 127.0.0.1:{sport}\nconnect = 127.0.0.1:{rport}\n"
                            f"cert = {certs}/server.pem\nkey = {certs}/server.key\n")  # fmt: skip
            procs.append(start([shutil.which("stunnel4") or "stunnel", str(conf)], sport))
            targets["stunnel"] = (sport, False)
        if shutil.which("haproxy"):
            hport = free_port()
            pem = d / "haproxy.pem"
            pem.write_text((certs / "server.pem").read_text() + (certs / "server.key").read_text())
            conf = d / "haproxy.cfg"
            conf.write_text(f"global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
                            f"  timeout server 60s\nfrontend f\n  bind 127.0.0.1:{hport} ssl crt {pem}\n  default_backend b\n"
                            f"backend b\n  server r 127.0.0.1:{rport}\n")  # fmt: skip
            procs.append(start(["haproxy", "-f", str(conf)], hport))
            targets["haproxy"] = (hport, False)
        for name, metrics in (("redisguard", True), ("redisguard-nometrics", False)):
            p, port = redisguard(d, certs, rport, metrics)
            procs.append(p)
            targets[name] = (port, True)
        rows = []
        for pipeline in (1, 16):
            for name, (port, auth) in targets.items():
                r = bench(port, certs, a.requests, a.clients, pipeline, auth)
                rows.append((pipeline, name, r.get("PING_INLINE", 0), r.get("PING_MBULK", 0), r.get("SET", 0), r.get("GET", 0)))
                print(f"P={pipeline:<3} {name:<22} " + "  ".join(f"{k}={v:,.0f}" for k, v in r.items()), flush=True)
        lines = [
            f"Run on {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; redis-benchmark -n {a.requests} -c {a.clients} -t ping,set,get --tls "
            "(requests/second, higher is better).", "",
            "| pipeline | target | PING_INLINE | PING_MBULK | SET | GET |", "|---|---|---:|---:|---:|---:|",
        ]  # fmt: skip
        lines += [f"| {p} | {n} | {a1:,.0f} | {a2:,.0f} | {s:,.0f} | {g:,.0f} |" for p, n, a1, a2, s, g in rows]
        Path(a.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
