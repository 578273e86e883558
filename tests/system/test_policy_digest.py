"""Policy drift between sidecars: redisguard_policy_info{digest} follows the policy in force (reloads,
ACL SETUSER), ignores how the users file is written, and check-config --peer compares with peers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from redisguard.cli.peers import config_digest
from redisguard.config.load import load_config
from tests.helpers import RedisProc, free_port, start_proxy

USERS = "user default off\nuser admin on >admin-pw ~* &* +@all\nuser rest on >rest-pw ~rest:* +@read +set\n"
# the same users, written otherwise: comments, blank lines, users and rules in another order
SAME = "# the REST service\nuser rest >rest-pw on ~rest:* +@read +set\n\nuser admin on >admin-pw &* ~* +@all\nuser default off\n"


def digests(metrics_port: int) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return re.findall(r'^redisguard_policy_info\{digest="(sha256:[0-9a-f]{16})"\} 1\.0$', text, re.M)


def check(config: Path, *peers: int) -> subprocess.CompletedProcess[str]:
    args = [a for port in peers for a in ("--peer", f"127.0.0.1:{port}")]
    return subprocess.run([sys.executable, "-m", "redisguard", "check-config", "-c", str(config), "--skip-bind", *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))  # fmt: skip


def reloads(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    found = re.search(r'^redisguard_config_reload_total\{result="success"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def wait_digest(port: int, old: str) -> list[str]:
    deadline = time.monotonic() + 10
    while ((now := digests(port)) == [old] or len(now) != 1) and time.monotonic() < deadline:  # (workers: a moment apart)
        time.sleep(0.05)
    return now


def test_the_digest_follows_the_policy_in_force(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port)
    try:
        (first,) = digests(p.metrics_port)
        assert first == config_digest(load_config(p.config))  # what check-config computes offline
        users.write_text(SAME)
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while reloads(p.metrics_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloads(p.metrics_port) == 1  # SAME was loaded ...
        assert digests(p.metrics_port) == [first]  # ... and how the file is written does not count
        users.write_text(USERS.replace("+set", "+set +del"))
        p.proc.send_signal(signal.SIGHUP)
        (reloaded,) = wait_digest(p.metrics_port, first)  # one series: the old digest's is gone
        assert reloaded != first
        admin = redis.Redis(port=p.plain_port, username="admin", password="admin-pw")
        assert admin.execute_command("ACL", "SETUSER", "rest", "+hset")
        (changed,) = wait_digest(p.metrics_port, reloaded)
        assert changed not in (first, reloaded)
        admin.close()
    finally:
        p.stop()


def test_check_config_compares_with_peers(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    (a_dir := tmp_path / "a").mkdir()
    (b_dir := tmp_path / "b").mkdir()
    (a_dir / "users.acl").write_text(USERS)
    (b_dir / "users.acl").write_text(USERS.replace("~rest:*", "~*"))  # rest may write every key here
    a = start_proxy(a_dir, certs, a_dir / "users.acl", redis_server.port)
    b = start_proxy(b_dir, certs, b_dir / "users.acl", redis_server.port)
    try:
        (da,), (db,) = digests(a.metrics_port), digests(b.metrics_port)
        (tmp_path / "users.acl").write_text(SAME)  # this host's config: A's policy, written otherwise
        (tmp_path / "upstream.pw").write_text((a_dir / "upstream.pw").read_text())
        mine = tmp_path / "rg.toml"
        mine.write_text(a.config.read_text().replace(str(a_dir / "users.acl"), str(tmp_path / "users.acl")))
        assert mine.read_text() != a.config.read_text()
        ok = check(mine, a.metrics_port)
        assert ok.returncode == 0 and ok.stdout.endswith(": OK\n"), ok.stderr
        assert f"note: peer 127.0.0.1:{a.metrics_port}: same policy ({da})\n" in ok.stderr
        gone = free_port()
        bad = check(mine, a.metrics_port, b.metrics_port, gone)
        assert bad.returncode == 1 and "OK" not in bad.stdout
        lines = [line for line in bad.stderr.splitlines() if "peer 127.0.0.1:" in line]
        assert lines == [
            f"note: peer 127.0.0.1:{a.metrics_port}: same policy ({da})",
            f"error: peer 127.0.0.1:{b.metrics_port}: different policy: it enforces {db}, this config {da} (compare the "
            "users files, [acl] disabled_commands and mode; an ACL SETUSER made through one sidecar changes only that one)",
            f"error: peer 127.0.0.1:{gone}: unreachable or unreadable: [Errno 111] Connection refused",
        ], bad.stderr  # fmt: skip
    finally:
        a.stop()
        b.stop()


def test_workers_publish_one_digest(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    """With workers the supervisor merges their series: one digest, the config's, and after an ACL
    SETUSER (which every worker applies before it is answered) one digest again, the new one."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    p = start_proxy(tmp_path, certs, users, redis_server.port, extra="[server]\nworkers = 2\n")
    try:
        (first,) = digests(p.metrics_port)
        assert first == config_digest(load_config(p.config))
        admin = redis.Redis(port=p.plain_port, username="admin", password="admin-pw")
        assert admin.execute_command("ACL", "SETUSER", "rest", "+hset")
        admin.close()
        (changed,) = wait_digest(p.metrics_port, first)
        assert changed != first
    finally:
        p.stop()
