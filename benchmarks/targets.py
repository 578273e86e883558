"""The benchmark targets: processes started on free loopback ports, all in front of one plaintext
redis-server, and stopped by PID whatever happens (see :class:`Processes`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.acl_scale import users_text  # noqa: E402
from redisguard.cli.procs import free_port, wait_port  # noqa: E402

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password"  # benchmark-only credential, lives in the temp dir's users file
# The realistic policy of issue 12: key patterns to match on every request, categories, no admin.
BENCH_RULES = "~key:* ~counter:* ~mylist* ~myset* +@read +@write +@connection -@dangerous"
INSTALL_HINT = "apt-get install stunnel4 haproxy"


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    tls: bool = True
    auth: tuple[str, str] | None = None  # (user, password) for the targets that enforce ACLs
    kind: str = ""  # "redis", "stunnel", "haproxy", "relay", "redisguard"
    config: Path | None = None  # redisguard's

    def pids(self) -> list[int]:
        """The process and its descendants (redisguard's workers): whose memory a connection costs."""
        return [self.proc.pid, *descendants(self.proc.pid)]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])  # (the command name may hold spaces and parens)
            children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@dataclass
class Processes:
    """Every process the suite starts, each stopped by its PID (and its descendants') in ``stop_all``:
    SIGTERM, then SIGKILL for what is still there after a grace period. Logs go to the work dir."""

    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], port: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        self.procs.append(p)
        if port is not None:
            try:
                wait_port(port, p, timeout=30)
            except RuntimeError as e:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name}: {e}\n{tail}") from None
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        kids = descendants(p.pid) if p.poll() is None else []
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for k in kids:  # workers should have gone with their parent; make sure
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def tool(*names: str) -> str | None:
    return next((path for n in names if (path := shutil.which(n))), None)


def start_redis(ps: Processes, certs: Path) -> tuple[Target, Target]:
    """One redis-server with a plaintext port (the limit, and every proxy's upstream) and its own TLS
    port (Redis native TLS)."""
    port, tls_port = free_port(), free_port()
    p = ps.start("redis", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--maxclients", "20000", "--dir", str(ps.workdir), "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no",
    ], port)  # fmt: skip
    wait_port(tls_port, p)
    return (Target("Redis (plaintext, the limit)", port, p, tls=False, kind="redis"),
            Target("Redis native TLS", tls_port, p, kind="redis"))  # fmt: skip


def start_stunnel(ps: Processes, certs: Path, redis_port: int) -> Target | None:
    exe = tool("stunnel4", "stunnel")
    if exe is None:
        return None
    port = free_port()
    conf = ps.workdir / "stunnel.conf"
    conf.write_text(f"foreground = yes\npid =\n[redis]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{redis_port}\n"
                    f"cert = {certs / 'server.pem'}\nkey = {certs / 'server.key'}\n")  # fmt: skip
    return Target("stunnel", port, ps.start("stunnel", [exe, str(conf)], port), kind="stunnel")


def start_haproxy(ps: Processes, certs: Path, redis_port: int) -> Target | None:
    exe = tool("haproxy")
    if exe is None:
        return None
    port = free_port()
    pem = ps.workdir / "haproxy.pem"  # HAProxy wants the certificate and its key in one file
    pem.write_text((certs / "server.pem").read_text() + (certs / "server.key").read_text())
    conf = ps.workdir / "haproxy.cfg"
    conf.write_text(f"""global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend redis
  bind 127.0.0.1:{port} ssl crt {pem}
  default_backend redis
backend redis
  server r1 127.0.0.1:{redis_port}
""")
    return Target("HAProxy", port, ps.start("haproxy", [exe, "-f", str(conf)], port), kind="haproxy")


def start_relay(ps: Processes, certs: Path, redis_port: int) -> Target:
    port = free_port()
    argv = [sys.executable, str(REPO / "benchmarks" / "relay.py"), "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{redis_port}", "--cert", str(certs / "server.pem"),
            "--key", str(certs / "server.key")]  # fmt: skip
    return Target("bare Python relay (floor)", port, ps.start("relay", argv, port), kind="relay")


def write_users(path: Path, n: int) -> Path:
    """``n`` users: the bench user plus ``n - 1`` of benchmarks/acl_scale.py's realistic mix (the
    first is ``default off``)."""
    path.write_text(users_text(n - 1) + f"user {BENCH_USER} on >{BENCH_PASSWORD} {BENCH_RULES}\n")
    return path


def redisguard_config(d: Path, certs: Path, redis_port: int, port: int, users: Path, workers: int | None = None) -> Path:
    """A production-like config: one TLS listener, metrics on, log level warning, the default limits
    (auth_timeout raised so the idle-memory test's connections are not closed while counted)."""
    server = f"[server]\nworkers = {workers}\n" if workers is not None else ""
    cfg = d / f"redisguard-{port}.toml"
    cfg.write_text(f"""{server}
[[listener]]
name = "tls"
type = "tls"
address = "127.0.0.1:{port}"
cert_file = "{certs / "server.pem"}"
key_file = "{certs / "server.key"}"

[upstream]
address = "127.0.0.1:{redis_port}"

[acl]
users_file = "{users}"

[limits]
auth_timeout = 600.0

[metrics]
address = "127.0.0.1:{free_port()}"

[log]
format = "json"
level = "warning"
""")
    return cfg


def redisguard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "redisguard", *args]


def workers_supported(d: Path, certs: Path) -> str | None:
    """None if this redisguard accepts ``[server] workers = 2``, else why not (check-config's words)."""
    cfg = redisguard_config(d, certs, 6379, free_port(), write_users(d / "users-check.acl", 2), workers=2)
    r = subprocess.run(redisguard_cmd("check-config", "--skip-bind", "-c", str(cfg)), capture_output=True, text=True,
                       timeout=60, cwd=d)  # fmt: skip
    if r.returncode == 0:
        return None
    lines = [line for line in (r.stderr + r.stdout).splitlines() if "worker" in line or "server" in line]
    return (lines or (r.stderr + r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[0]


def start_redisguard(ps: Processes, certs: Path, redis_port: int, name: str, users: int = 10,
                     workers: int | None = None) -> Target:  # fmt: skip
    port = free_port()
    users_file = write_users(ps.workdir / f"users-{users}.acl", users)
    cfg = redisguard_config(ps.workdir, certs, redis_port, port, users_file, workers)
    p = ps.start(f"redisguard-{port}", redisguard_cmd("serve", "-c", str(cfg)), port)
    return Target(name, port, p, auth=(BENCH_USER, BENCH_PASSWORD), kind="redisguard", config=cfg)
