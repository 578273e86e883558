"""check-config reaches the upstream Redis as the service user (connect, AUTH, COMMAND INFO, in mirror
identity the ACL rights it needs), one line per failure naming the fix; ``--offline`` skips it; ``serve``
logs the same lines as warnings and starts anyway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, RedisProc, free_port


def check(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", "check-config", "-c", str(cfg), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def config(tmp_path: Path, port: int, user: str = UPSTREAM_USER, password: str = UPSTREAM_PASSWORD,
           identity: str = "service") -> Path:  # fmt: skip
    (tmp_path / "users.acl").write_text("user default off\nuser app on >app-pw ~app:* +@read +@write\n")
    (tmp_path / "pw").write_text(password + "\n")
    (tmp_path / "pw").chmod(0o600)
    p = tmp_path / "rg.toml"
    p.write_text(f"""
[[listener]]
type = "tcp"
address = "127.0.0.1:{free_port()}"
[metrics]
address = "127.0.0.1:{free_port()}"
[acl]
users_file = "users.acl"
[upstream]
address = "127.0.0.1:{port}"
username = "{user}"
password_file = "pw"
identity = "{identity}"
connect_timeout = 2
""")
    return p


def errors(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error: upstream")]


def test_stopped_redis(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    res = check(config(tmp_path, port))
    assert res.returncode == 1, res.stderr
    assert errors(res) == [f"error: upstream 127.0.0.1:{port}: connection refused — is Redis running? ([upstream] address)"]
    assert "redisguard audit-upstream" in res.stderr and "OK" not in res.stdout
    # --offline: the same config is fine without touching Redis
    res = check(config(tmp_path, port), "--offline")
    assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res.stderr
    assert not errors(res)


def test_wrong_password(tmp_path: Path, own_redis: RedisProc) -> None:
    res = check(config(tmp_path, own_redis.port, password="not-the-password"))
    assert res.returncode == 1
    assert errors(res) == [f"error: upstream: the service user {UPSTREAM_USER!r} was refused (WRONGPASS): check "
                           "[upstream] username/password_file (or password_env) against the Redis ACL user"]  # fmt: skip


def test_good_setup(tmp_path: Path, own_redis: RedisProc) -> None:
    res = check(config(tmp_path, own_redis.port))
    assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res.stderr
    assert "note: upstream identity: service (configured)" in res.stderr


def test_service_user_without_command_info(tmp_path: Path, own_redis: RedisProc) -> None:
    r = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    r.acl_setuser("narrow", enabled=True, passwords=["+narrow-pw"], keys=["*"], commands=["+get", "+set"])
    try:
        res = check(config(tmp_path, own_redis.port, user="narrow", password="narrow-pw"))
        assert res.returncode == 1
        (line,) = errors(res)
        assert line.startswith("error: upstream: the service user 'narrow' may not run COMMAND INFO, ACL CAT and "
                               "INFO server (NOPERM")  # fmt: skip
        assert line.endswith(": ACL SETUSER narrow +command|info +acl|cat +info, or set [upstream] fetch_command_table "
                             "= false")  # fmt: skip
    finally:
        r.acl_deluser("narrow")


def test_mirror_without_acl_rights(tmp_path: Path, own_redis: RedisProc) -> None:
    r = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    r.execute_command("ACL", "SETUSER", "nomirror", "on", ">nm-pw", "~*", "&*", "+@all", "-acl|setuser", "-flushall")
    try:
        res = check(config(tmp_path, own_redis.port, user="nomirror", password="nm-pw", identity="mirror"))
        assert res.returncode == 1
        assert errors(res) == [
            "error: upstream: [upstream] identity = \"mirror\" needs the service user 'nomirror' to manage Redis ACL "
            "users, but it may not run ACL SETUSER: ACL SETUSER nomirror +acl|setuser +acl|deluser +acl|users (and in "
            "Redis's ACL file), or use identity = \"service\""]  # fmt: skip
        res = check(config(tmp_path, own_redis.port, identity="mirror"))  # the full service user: fine
        assert res.returncode == 0, res.stderr
    finally:
        r.acl_deluser("nomirror")


def test_serve_warns_and_starts(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, port)
    proc = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out = ""
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline and "redisguard_started" not in out:
            out += proc.stdout.readline()
        assert proc.poll() is None, out  # started: Redis may come later
        (event,) = [json.loads(x) for x in out.splitlines() if "upstream_check_failed" in x]
        assert event["level"] == "warning"
        assert event["error"] == f"upstream 127.0.0.1:{port}: connection refused — is Redis running? ([upstream] address)"
        assert "redisguard audit-upstream" in event["detail"]
    finally:
        proc.terminate()
        proc.wait(30)
