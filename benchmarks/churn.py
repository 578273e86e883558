"""Memory under connection churn and pending handshakes: `python benchmarks/churn.py`.

Starts a scratch redis-server and redisguard (as the tests do), then
  1. churns TLS connections with a few concurrent workers (handshake, PING -> -NOAUTH, close) and
     prints the redisguard process's RSS before, right after, and a few seconds after the churn
     (when the malloc_trim timer has had its chance);
  2. opens N silent TCP connections to the TLS port (each one a pending handshake), waits until the
     proxy counts them all, and prints the RSS they cost per connection; then closes them;
  3. a burst: holds B TLS connections at once (each sent PING), then closes them all: RSS before,
     held, and a few seconds after (where malloc_trim matters).

    python benchmarks/churn.py                      # 36,000 cycles, 4 workers, 2,000 pending, trim on
    python benchmarks/churn.py --no-trim            # the same with memory_trim_interval = 0
    MALLOC_ARENA_MAX=2 python benchmarks/churn.py   # as the Docker image runs it
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisguard.cli.certs import init_dev_certs  # noqa: E402
from redisguard.observe.metrics import parse_samples  # noqa: E402
from tests.helpers import USERS_ACL, start_proxy, start_redis  # noqa: E402

PENDING = 'redisguard_tls_handshakes_pending{listener="tls"}'


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def scrape(port: int) -> dict[str, float]:
    return parse_samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())


async def churn(port: int, ctx: ssl.SSLContext, cycles: int, workers: int) -> tuple[int, int]:
    left = cycles
    failed = 0

    async def worker() -> None:
        nonlocal left, failed
        while left > 0:
            left -= 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
                writer.write(b"PING\r\n")
                await reader.readline()  # -NOAUTH
                writer.close()
                await writer.wait_closed()
            except (OSError, ssl.SSLError, ConnectionError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return cycles, failed


async def burst(port: int, ctx: ssl.SSLContext, n: int, hold: Callable[[], None]) -> None:
    gate = asyncio.Semaphore(50)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(b"PING\r\n")
            await reader.readline()
            return writer

    writers = await asyncio.gather(*(one() for _ in range(n)))
    hold()
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=36000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--burst", type=int, default=2000, help="TLS connections held at once (0 = skip)")
    ap.add_argument("--pending", type=int, default=2000, help="silent TCP connections (0 = skip)")
    ap.add_argument("--no-trim", action="store_true", help="memory_trim_interval = 0")
    ap.add_argument("--settle", type=float, default=6.0, help="seconds to wait after each phase")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="redisguard-churn-"))
    certs = d / "certs"
    init_dev_certs(certs)
    users = d / "users.acl"
    users.write_text(USERS_ACL)
    redis = start_redis()
    n = max(args.pending, args.burst)
    limits = (f"handshake_timeout = 120.0\nauth_timeout = 120.0\nmax_pending_handshakes = {n + 100}\n"
              f"max_handshakes_per_source = {n + 100}\nmemory_trim_interval = {0.0 if args.no_trim else 1.0}\n")  # fmt: skip
    proxy = start_proxy(d, certs, users, redis.port, limits=limits)
    pid = proxy.proc.pid
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    try:
        env = os.environ.get("MALLOC_ARENA_MAX", "unset")
        print(f"redisguard pid {pid}; trim {'off' if args.no_trim else 'on'}; MALLOC_ARENA_MAX={env}")
        asyncio.run(churn(proxy.tls_port, ctx, 200, args.workers))  # warm-up: imports, caches, first arenas
        time.sleep(1.5)
        before = rss_kib(pid)
        t0 = time.monotonic()
        done, failed = asyncio.run(churn(proxy.tls_port, ctx, args.cycles, args.workers))
        took = time.monotonic() - t0
        after = rss_kib(pid)
        time.sleep(args.settle)
        settled = rss_kib(pid)
        print(f"churn: {done} TLS connect/PING/close cycles ({failed} failed), {args.workers} workers, "
              f"{took:.1f} s ({done / took:.0f}/s)")  # fmt: skip
        print(f"  RSS before {before / 1024:.1f} MiB, right after {after / 1024:.1f} MiB, "
              f"{args.settle:.0f} s later {settled / 1024:.1f} MiB")  # fmt: skip
        n = args.pending
        if n:
            base = rss_kib(pid)
            socks = [socket.create_connection(("127.0.0.1", proxy.tls_port)) for _ in range(n)]
            deadline = time.monotonic() + 30
            pending = 0.0
            while time.monotonic() < deadline:
                pending = scrape(proxy.metrics_port).get(PENDING, 0.0)
                if pending >= n:
                    break
                time.sleep(0.2)
            rss = rss_kib(pid)
            print(f"pending: {n} silent TCP connections, {pending:.0f} counted pending; RSS {base / 1024:.1f} -> "
                  f"{rss / 1024:.1f} MiB = {(rss - base) / n:.1f} KiB per pending handshake")  # fmt: skip
            for sock in socks:
                sock.close()
            time.sleep(args.settle)
            m = scrape(proxy.metrics_port)
            print(f"  closed: {m.get(PENDING, -1):.0f} pending, RSS {rss_kib(pid) / 1024:.1f} MiB {args.settle:.0f} s later")
        if args.burst:
            base = rss_kib(pid)
            held: list[int] = []
            asyncio.run(burst(proxy.tls_port, ctx, args.burst, lambda: held.append(rss_kib(pid))))
            time.sleep(args.settle)
            print(f"burst: {args.burst} TLS connections held at once: RSS {base / 1024:.1f} -> {held[0] / 1024:.1f} MiB "
                  f"({(held[0] - base) / args.burst:.1f} KiB each), {rss_kib(pid) / 1024:.1f} MiB "
                  f"{args.settle:.0f} s after closing; malloc_trim calls so far: "
                  f"{scrape(proxy.metrics_port).get('redisguard_malloc_trims_total', 0):.0f}")  # fmt: skip
    finally:
        proxy.stop()
        redis.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
