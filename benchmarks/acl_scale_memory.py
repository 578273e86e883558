"""Memory across reloads of a large users file: `python benchmarks/acl_scale_memory.py [USERS] [RELOADS] [changed]`.

Writes USERS (default 10,000) users of 20 key patterns and 2 selectors each (~5 MB), starts a
redis-server and redisguard, prints the start-up time (process start to the TLS port accepting) and
redisguard's RSS, then RELOADS (default 10) reloads, SIGHUP and ACL LOAD in turn, each followed by the
RSS once the reload is in force. Bounded memory: the RSS after the last reload is within 10% of the
RSS after the first (the old users are freed, not kept). Meanwhile another client PINGs without pause:
the longest PING during each reload, and during an ACL LIST right after each ACL LOAD, is how long
the reload (or the reply) held the event loop for everyone else. The file is reloaded unchanged (a
reload then reads no line again: an unchanged line is the same user), or with ``changed`` with every
user's password changed before each reload (every user read again, the old ones freed)."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from benchmarks.targets import Processes, redisguard_cmd, redisguard_config, start_redis  # noqa: E402
from redisguard.cli.certs import init_dev_certs  # noqa: E402
from redisguard.cli.procs import free_port, wait_port  # noqa: E402

ADMIN, ADMIN_PASSWORD = "admin", "admin-bench-password"  # benchmark-only, in the temp dir's users file


def users_text(n: int, version: int = 0) -> str:
    """``version``: another password for every user (a reload in which every user changed)."""
    lines = ["user default off", f"user {ADMIN} on >{ADMIN_PASSWORD} ~* &* +@all"]
    for i in range(n):
        h = hashlib.sha256(b"pw%d-%d" % (i, version)).hexdigest()
        keys = " ".join(f"~t{i}:k{j:02}:*" for j in range(20))
        sel = " ".join(f"%R~r{i}:{j:02}:*" for j in range(8))
        lines.append(f"user u{i} on #{h} {keys} +@read +@write -@dangerous ({sel} +@read) (%W~w{i}:* +set +del)")
    return "\n".join(lines) + "\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Prober(threading.Thread):
    """PINGs without pause on its own connection; ``take()`` gives the longest PING since the last take."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.c = redis.Redis(port=port, ssl=True, ssl_cert_reqs="none", username=ADMIN, password=ADMIN_PASSWORD,
                             socket_timeout=120)
        self.worst = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            self.c.ping()
            self.worst = max(self.worst, time.perf_counter() - t)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


def reloads_done(log: Path) -> int:
    return log.read_text(errors="replace").count('"users_changed"')


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    every = len(sys.argv) > 3 and sys.argv[3] == "changed"  # each reload: every user's password changed
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ps = Processes(work)
        try:
            certs = work / "certs"
            init_dev_certs(certs)
            plain, _ = start_redis(ps, certs)
            users = work / "users.acl"
            users.write_text(users_text(n))
            print(f"users file: {n} users, {users.stat().st_size / 1e6:.1f} MB")
            port = free_port()
            cfg = redisguard_config(work, certs, plain.port, port, users)
            cfg.write_text(cfg.read_text().replace('level = "warning"', 'level = "info"'))
            t = time.perf_counter()
            p = ps.start("redisguard", redisguard_cmd("serve", "-c", str(cfg)))
            wait_port(port, p, timeout=120)
            print(f"start-up: {time.perf_counter() - t:.2f} s, RSS {rss_mib(p.pid):.0f} MiB")
            log = work / "redisguard.log"
            c = redis.Redis(port=port, ssl=True, ssl_cert_reqs="none", username=ADMIN, password=ADMIN_PASSWORD,
                            socket_timeout=120)
            after = []
            prober = Prober(port)
            prober.start()
            for r in range(rounds):
                before = reloads_done(log)
                prober.take()
                how = "SIGHUP" if r % 2 == 0 else "ACL LOAD"
                if every:
                    users.write_text(users_text(n, r + 1))
                if r % 2 == 0:
                    os.kill(p.pid, signal.SIGHUP)
                else:
                    c.execute_command("ACL", "LOAD")
                deadline = time.monotonic() + 120
                while reloads_done(log) <= before and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(3.0)  # the old users are freed in a worker thread after the swap
                after.append(rss_mib(p.pid))
                line = f"reload {r + 1:2} ({how:8}): RSS {after[-1]:.0f} MiB, PING max {prober.take() * 1000:.0f} ms"
                if how == "ACL LOAD":
                    t = time.perf_counter()
                    c.execute_command("ACL", "LIST")
                    line += f"; ACL LIST after it {time.perf_counter() - t:.2f} s, PING max {prober.take() * 1000:.0f} ms"
                print(line)
            prober.stop.set()
            prober.join()
            c.close()
            growth = after[-1] / after[0] - 1
            print(f"after {rounds} reloads: {growth:+.1%} against the first ({'bounded' if growth <= 0.10 else 'GROWING'})")
        finally:
            ps.stop_all()


if __name__ == "__main__":
    main()
