"""``[server] workers = 2``: a supervisor and two worker processes in front of a real Redis, real TLS.

Which worker served a connection is read from the process table and the audit log (every worker's
lines carry ``"worker": i``), never assumed: the kernel spreads connections (SO_REUSEPORT for TCP,
one shared socket for unix), so the tests connect until both workers have served.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from redisguard.config.load import load_config
from redisguard.config.model import ConfigError
from redisguard.observe import metrics_merge
from redisguard.observe.metrics import Metrics, parse_samples
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, read_until, start_proxy

WORKERS = "[server]\nworkers = 2\n"


def unix_listener(path: Path) -> str:
    return f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{path}"\n'


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the supervisor's workers)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return sorted(out)


def upstream_ports(pid: int, redis_port: int) -> set[int]:
    """Local ports of the TCP connections to Redis that process ``pid`` holds (via /proc)."""
    inode_port = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == redis_port:
                inode_port[int(f[9])] = int(f[1].rsplit(":", 1)[1], 16)
    ports = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inode_port:
            ports.add(inode_port[int(link[8:-1])])
    return ports


def http(p: ProxyProc, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(p: ProxyProc) -> dict[str, float]:
    return parse_samples(http(p, "/metrics")[1])


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def log_lines(p: ProxyProc) -> list[str]:
    return p.log.read_text().splitlines()


def served_by(p: ProxyProc, event: str, since: int = 0, **fields: object) -> set[int]:
    """The workers whose audit log has ``event`` with these fields (from line ``since`` on)."""
    out = set()
    for line in log_lines(p)[since:]:
        if line.startswith("{"):
            e = json.loads(line)
            if e["event"] == event and "worker" in e and all(e.get(k) == v for k, v in fields.items()):
                out.add(int(e["worker"]))
    return out


def login(p: ProxyProc, user: str, password: str, unix: str = "") -> bool:
    """AUTH and PING on a new plaintext (or unix-socket) connection: did both succeed?"""
    sock = socket.socket(socket.AF_UNIX) if unix else socket.socket()
    with sock:
        sock.settimeout(5)
        sock.connect(unix or ("127.0.0.1", p.plain_port))
        sock.sendall(b"AUTH %s %s\r\nPING\r\n" % (user.encode(), password.encode()))
        reply = read_until(sock, lambda d: d.count(b"\r\n") >= 2)
    return reply == b"+OK\r\n+PONG\r\n"


def on_both_workers(p: ProxyProc, attempt: Callable[[], bool], event: str, **fields: object) -> None:
    """Repeat ``attempt`` (each must succeed) until both workers logged ``event`` for it."""
    since = len(log_lines(p))
    for _ in range(200):
        assert attempt()
        if served_by(p, event, since, **fields) == {0, 1}:
            return
    raise AssertionError(f"{event} {fields}: only workers {served_by(p, event, since, **fields)} served")


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rgw", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc, sockdir: Path
        ) -> Iterator[tuple[ProxyProc, Path]]:  # fmt: skip
    d = tmp_path_factory.mktemp("workers")
    users = d / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(d, certs, users, redis_server.port, disabled="[]", extra=WORKERS + unix_listener(sockdir / "rg.sock"))
    wait_for(lambda: http(p, "/readyz")[0] == 200)
    yield p, users
    p.stop()


def test_many_tls_clients_land_on_both_workers_and_metrics_add_up(two: tuple[ProxyProc, Path], certs: Path,
                                                                  redis_server: RedisProc) -> None:  # fmt: skip
    p, _ = two
    pids = children(p.proc.pid)
    assert len(pids) == 2
    status, body = http(p, "/readyz")
    assert status == 200 and "2 workers" in body
    before = metrics(p)
    clients = [redis.Redis(host="127.0.0.1", port=p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                           username="alice", password="alice-pw", socket_timeout=10) for _ in range(24)]  # fmt: skip
    try:
        for i, c in enumerate(clients):
            assert c.set(f"cache:w{i}", i)
            assert c.get(f"cache:w{i}") == str(i).encode()
        with pytest.raises(redis.exceptions.NoPermissionError):
            clients[0].get("secret:x")
        # Upstream connections come from both worker processes, and they are the ones Redis lists.
        ports = {pid: upstream_ports(pid, redis_server.port) for pid in pids}
        assert all(len(v) >= 1 for v in ports.values()), ports
        direct = redis.Redis(port=redis_server.port, username="svc", password="svc-test-password")
        listed = {int(c["addr"].rsplit(":", 1)[1]) for c in direct.client_list()}
        assert set().union(*ports.values()) <= listed
        assert sum(len(v) for v in ports.values()) >= len(clients)
        m = metrics(p)
        key = 'redisguard_commands_total{command="%s",result="%s",user="alice"}'
        assert m[key % ("set", "allowed")] - before.get(key % ("set", "allowed"), 0) == len(clients)
        assert m[key % ("get", "allowed")] - before.get(key % ("get", "allowed"), 0) == len(clients)
        assert m[key % ("get", "denied")] - before.get(key % ("get", "denied"), 0) == 1
        assert m['redisguard_connections_active{listener="tls"}'] == len(clients)
        assert m['redisguard_workers{state="ready"}'] == 2 and m["redisguard_upstream_up"] == 1
        assert [v for k, v in m.items() if k.startswith("redisguard_build_info{")] == [1]
    finally:
        for c in clients:
            c.close()
    # The unix listener, bound once by the supervisor, is accepted on by both workers.
    sock = str(Path(p.config.read_text().split('path = "')[1].split('"')[0]))
    on_both_workers(p, lambda: login(p, "alice", "alice-pw", unix=sock), "connection_accepted", listener="sock")


def tls_connect(p: ProxyProc, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
    """A TLS connection offering ``session`` (made with ``ctx``), one round trip (a TLS 1.3 ticket comes
    after the handshake): whether it resumed, and the newest session."""
    with socket.create_connection(("127.0.0.1", p.tls_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:  # fmt: skip
        s.sendall(b"PING\r\n")
        assert read_until(s, b"-NOAUTH Authentication required.\r\n").startswith(b"-NOAUTH")
        return bool(s.session_reused), s.session


def test_a_tls_session_resumes_on_either_worker_and_across_a_reload(two: tuple[ProxyProc, Path], certs: Path) -> None:
    """One session-ticket key for the instance (the workers inherit the supervisor's TLS context), kept
    by a reload that changes no certificate: a client resumes whichever worker accepts it."""
    p, _ = two
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    since = len(log_lines(p))
    resumed, session = tls_connect(p, ctx, None)
    assert not resumed
    for _ in range(200):
        resumed, session = tls_connect(p, ctx, session)
        assert resumed
        if served_by(p, "connection_accepted", since, listener="tls") == {0, 1}:
            break
    assert served_by(p, "connection_accepted", since, listener="tls") == {0, 1}
    since = len(log_lines(p))
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_by(p, "config_reloaded", since) == {0, 1})
    for _ in range(10):
        resumed, session = tls_connect(p, ctx, session)
        assert resumed


def test_sighup_and_acl_admin_reach_every_worker(two: tuple[ProxyProc, Path]) -> None:
    p, users = two
    users.write_text(USERS_ACL + "user carol on >carol-pw ~* +@all\n")
    since = len(log_lines(p))
    p.proc.send_signal(signal.SIGHUP)  # to the supervisor: every worker reloads
    wait_for(lambda: served_by(p, "config_reloaded", since) == {0, 1})
    on_both_workers(p, lambda: login(p, "carol", "carol-pw"), "auth_success", user="carol")

    # ACL SETUSER on one worker: the user exists on both; DELUSER: gone from both.
    admin = redis.Redis(port=p.plain_port, username="admin", password="admin-pw")
    assert admin.execute_command("ACL", "SETUSER", "dave", "on", ">dave-pw", "~dave:*", "+@all") == b"OK"
    on_both_workers(p, lambda: login(p, "dave", "dave-pw"), "auth_success", user="dave")
    assert admin.execute_command("ACL", "DELUSER", "dave") == 1
    on_both_workers(p, lambda: not login(p, "dave", "dave-pw"), "auth_failure", user="unknown", reason="unknown_user")

    # ACL LOAD on one worker loads the users in every worker before it answers: carol is gone from
    # both (the file no longer has her) the moment +OK arrives.
    users.write_text(USERS_ACL)
    since = len(log_lines(p))
    assert admin.execute_command("ACL", "LOAD") == b"OK"
    assert served_by(p, "users_changed", since) == {0, 1}
    on_both_workers(p, lambda: not login(p, "carol", "carol-pw"), "auth_failure", user="unknown", listener="local")
    admin.close()


def admin_on(p: ProxyProc, worker: int, username: str = "admin", password: str = "admin-pw") -> redis.Redis:
    """A connection (of the admin, else ``username``) served by ``worker`` (connect until one lands there)."""
    for _ in range(100):
        c = redis.Redis(port=p.plain_port, username=username, password=password, single_connection_client=True)
        conn = c.connection  # (single_connection_client: connected at once)
        assert conn is not None and conn._sock is not None
        port = conn._sock.getsockname()[1]
        if served_by(p, "auth_success", peer=f"127.0.0.1:{port}") == {worker}:
            return c
        c.close()
    raise AssertionError(f"no connection landed on worker {worker}")


def test_concurrent_setuser_on_two_workers_converges(two: tuple[ProxyProc, Path]) -> None:
    p, _ = two
    a, b = admin_on(p, 0), admin_on(p, 1)
    # Read your writes: the echo of an earlier change of one's own never undoes a later one.
    for i in range(40):
        a.execute_command("ACL", "SETUSER", "erin", "resetpass", f"#{i:064x}")
        assert f"{i:064x}".encode() in str(a.execute_command("ACL", "GETUSER", "erin")).encode()
    pa, pb = a.pipeline(transaction=False), b.pipeline(transaction=False)
    for i in range(30):
        pa.execute_command("ACL", "SETUSER", "erin", "reset", "on", f">a{i}", "~a:*", "+get")
        pb.execute_command("ACL", "SETUSER", "erin", "reset", "on", f">b{i}", "~b:*", "+set")
    pa.execute_command("ACL", "SETUSER", "erin", "reset", "on", ">last", "~x:*", "+@read")
    pb.execute_command("ACL", "SETUSER", "frank", "on", ">frank-pw", "+ping")
    pa.execute(), pb.execute()

    def getuser(c: redis.Redis, name: str) -> object:
        return c.execute_command("ACL", "GETUSER", name)

    wait_for(lambda: getuser(a, "erin") == getuser(b, "erin") and getuser(a, "frank") == getuser(b, "frank") is not None)
    time.sleep(0.3)  # nothing still in flight changes it again
    assert getuser(a, "erin") == getuser(b, "erin")
    a.close()
    b.close()


def test_a_killed_worker_is_restarted_and_counts_are_kept(two: tuple[ProxyProc, Path]) -> None:
    p, _ = two
    before = metrics(p)
    allowed = before['redisguard_commands_total{command="set",result="allowed",user="alice"}']
    victim, survivor = children(p.proc.pid)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(p.proc.pid)) == 2 and victim not in children(p.proc.pid))
    wait_for(lambda: http(p, "/readyz")[0] == 200)
    assert survivor in children(p.proc.pid)
    m = metrics(p)
    assert m["redisguard_worker_restarts_total"] == before.get("redisguard_worker_restarts_total", 0) + 1
    assert m['redisguard_commands_total{command="set",result="allowed",user="alice"}'] == allowed  # kept
    assert '"worker_exited"' in p.log.read_text() and "signal SIGKILL" in p.log.read_text()
    assert login(p, "alice", "alice-pw")


def test_sigterm_drains_and_stops_everything(tmp_path: Path, certs: Path, redis_server: RedisProc, sockdir: Path) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    sock = sockdir / "stop.sock"
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra=WORKERS + unix_listener(sock))
    try:
        wait_for(lambda: http(p, "/readyz")[0] == 200)
        pids = children(p.proc.pid)
        assert len(pids) == 2 and sock.exists()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
        assert not sock.exists()
        assert served_by(p, "redisguard_stopped") == {0, 1}
    finally:
        p.stop()


def test_workers_die_with_the_supervisor(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra=WORKERS)
    try:
        wait_for(lambda: len(children(p.proc.pid)) == 2)
        pids = children(p.proc.pid)
        p.proc.kill()  # SIGKILL: no chance to stop them itself
        p.proc.wait(5)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids))
    finally:
        p.stop()


def test_workers_setting_is_validated(tmp_path: Path) -> None:
    base = '[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:{port}"\n[acl]\nusers_file = "u.acl"\n[server]\n'
    cfg = tmp_path / "c.toml"

    def load(workers: str, port: int = 7000) -> int:
        cfg.write_text(base.format(port=port) + f"workers = {workers}\n")
        return load_config(cfg).server.workers

    assert load("2") == 2 and load('"auto"') == min(os.cpu_count() or 1, 64)
    cfg.write_text(base.format(port=7000))
    assert load_config(cfg).server.workers == 1
    for bad, msg in (("0", "must be 1 to 64"), ("65", "must be 1 to 64"), ('"many"', 'or "auto"'),
                     ("true", 'or "auto"'), ("1.5", "expected int or str")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"server.workers: .*{msg}"):
            load(bad)
    with pytest.raises(ConfigError, match=r"listener\[0\].address: port 0 .* 2 workers"):
        load("2", port=0)
    (tmp_path / "u.acl").write_text(USERS_ACL)
    for workers, code in (("4", 0), ("0", 1)):  # check-config: the same one line, exit 1
        cfg.write_text(base.format(port=7000) + f"workers = {workers}\n")
        out = subprocess.run([sys.executable, "-m", "redisguard", "check-config", "--skip-bind", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == code, out.stderr
        if code:
            assert out.stderr == f"error: {cfg}: server.workers: must be 1 to 64 (or \"auto\": one per CPU), got 0\n"


def test_merge_rules() -> None:
    a, b = Metrics(), Metrics()
    for m, up, n in ((a, 1, 3), (b, 0, 4)):
        m.commands.labels("u", "get", "allowed").inc(n)
        m.upstream_up.set(up)
        m.connections_active.labels("tls").inc(n)
        m.event_loop_lag.observe(0.002 * n)
    fams = [metrics_merge.parse(m.render().decode()) for m in (a, b)]
    merged = parse_samples(metrics_merge.render(metrics_merge.merge(fams)).decode())
    assert merged['redisguard_commands_total{command="get",result="allowed",user="u"}'] == 7
    assert merged['redisguard_connections_active{listener="tls"}'] == 7
    assert merged["redisguard_upstream_up"] == 0  # down if any worker sees it down
    assert merged["redisguard_event_loop_lag_seconds_count"] == 2
    assert merged["redisguard_config_last_reload_successful"] == 1
    retired: metrics_merge.Families = {}
    metrics_merge.retire(retired, fams[1])  # b exited: its counters stay, its gauges go
    merged = parse_samples(metrics_merge.render(metrics_merge.merge(fams[:1], retired)).decode())
    assert merged['redisguard_commands_total{command="get",result="allowed",user="u"}'] == 7
    assert merged['redisguard_connections_active{listener="tls"}'] == 3
