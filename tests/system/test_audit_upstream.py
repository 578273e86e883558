"""``redisguard audit-upstream`` against real redis-servers: a hardened one, an open one, and an upstream
user that may not look at most of the checklist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

from redisguard.cli.posture import check_version
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, start_redis

# What a careful operator gives redisguard's service user: everything clients need, none of the
# dangerous commands, and the read-only admin commands the audit looks at.
GUARD_RULES = ["on", ">guard-pw", "~*", "&*", "+@all", "-@dangerous", "+config|get", "+acl|getuser", "+acl|dryrun", "+info"]


def audit(tmp_path: Path, port: int, user: str, password: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """(exit code, {check id: (status, detail)}, text output) for audit-upstream as ``user``."""
    (tmp_path / "users.acl").write_text("user default off\n")
    (tmp_path / "pw").write_text(password + "\n")
    cfg = tmp_path / "rg.toml"
    cfg.write_text(f'[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\n[upstream]\naddress = "127.0.0.1:{port}"\n'
                   f'username = "{user}"\npassword_file = "pw"\n[acl]\nusers_file = "users.acl"\n')  # fmt: skip
    run = [sys.executable, "-m", "redisguard", "audit-upstream", "-c", str(cfg)]
    res = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60)
    doc = json.loads(res.stdout)
    assert doc["ok"] == (res.returncode == 0) and doc["user"] == user
    text = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert text.returncode == res.returncode and "Traceback" not in text.stderr
    assert password not in res.stdout + text.stdout
    return res.returncode, {c["id"]: (c["status"], c["detail"]) for c in doc["checks"]}, text.stdout


def test_hardened_redis_passes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    renames = [f"--rename-command {c} {c.lower()}-b7f3" for c in ("FLUSHALL", "FLUSHDB", "KEYS", "DEBUG", "SHUTDOWN", "MODULE")]
    r = start_redis(extra=["--user default off", f"--dir {data}", *renames])
    try:
        admin = redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
        admin.execute_command("ACL", "SETUSER", "guard", *GUARD_RULES)
        admin.close()
        code, checks, text = audit(tmp_path, r.port, "guard", "guard-pw")
    finally:
        r.stop()
    assert code == 0, text
    assert checks.pop("version")[0] in ("pass", "warn")  # Debian 12's Redis 7.0 is past its upstream support
    assert {k: s for k, (s, _) in checks.items()} == {
        "bind": "pass", "protected-mode": "pass", "default-user": "pass", "upstream-user": "pass",
        "dangerous-commands": "warn",  # CONFIG keeps its name: the audit itself needs CONFIG GET
        "persistence-dir": "pass",
    }  # fmt: skip
    assert checks["dangerous-commands"][1] == "CONFIG are available under their own names"
    assert checks["persistence-dir"][1] == f"{data} (mode 0750) is writable by its owner only"
    assert "summary: 0 fail" in text


def test_open_redis_fails_item_by_item(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    # "-10.255.255.1": an optional bind address (absent here, so nothing is really exposed) beyond loopback
    r = start_redis(extra=["--bind 127.0.0.1 -10.255.255.1", "--protected-mode no", "--enable-debug-command yes",
                           f"--dir {data}"])  # fmt: skip
    try:
        code, checks, text = audit(tmp_path, r.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
        assert code == 1
        status = {k: s for k, (s, _) in checks.items()}
        assert status == {"version": status["version"], "bind": "fail", "protected-mode": "warn", "default-user": "fail",
                          "upstream-user": "warn", "dangerous-commands": "fail", "persistence-dir": "fail"}  # fmt: skip
        assert "-10.255.255.1 is beyond loopback" in checks["bind"][1]
        assert "'default' user is on with nopass" in checks["default-user"][1]
        # (the test service user has -flushall: tests disable FLUSHALL, see helpers.start_redis)
        assert checks["upstream-user"][1].startswith("the upstream user 'svc' may run FLUSHDB, CONFIG, KEYS, DEBUG, "
                                                     "SHUTDOWN, MODULE, ACL:")  # fmt: skip
        assert "enable-debug-command is yes" in checks["dangerous-commands"][1]
        assert f"{data} (mode 0777) is writable by every user" in checks["persistence-dir"][1]
        assert "fix: in redis.conf: bind 127.0.0.1 -::1" in text and "fix: ACL SETUSER default off" in text
        # a password, but a well-known one (never printed)
        admin = redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
        admin.execute_command("ACL", "SETUSER", "default", "resetpass", ">foobared")
        admin.close()
        code, checks, text = audit(tmp_path, r.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
        assert code == 1 and checks["default-user"] == ("fail", "the 'default' user is on with a well-known weak password")
        assert "foobared" not in text
    finally:
        r.stop()


def test_upstream_user_that_may_not_look(tmp_path: Path) -> None:
    """CONFIG GET, INFO, ACL GETUSER and ACL DRYRUN all refused: each item says unknown, nothing crashes."""
    r = start_redis(extra=["--user default off"])
    try:
        admin = redis.Redis(port=r.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
        admin.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+@read", "+@write", "+@connection")
        admin.close()
        code, checks, _ = audit(tmp_path, r.port, "app", "app-pw")
    finally:
        r.stop()
    assert code == 0
    assert {k for k, (s, _) in checks.items() if s == "unknown"} == {"version", "bind", "protected-mode", "upstream-user",
                                                                      "persistence-dir"}  # fmt: skip
    assert checks["dangerous-commands"][0] == "warn"  # COMMAND INFO is a @connection command: it may look at that
    assert checks["bind"][1] == "the upstream user 'app' may not run CONFIG GET (NOPERM)"
    assert checks["default-user"][0] == "warn"  # NOAUTH without a login, but ACL GETUSER is refused


def test_unreachable_upstream_is_one_line(tmp_path: Path) -> None:
    from tests.helpers import free_port

    (tmp_path / "users.acl").write_text("user default off\n")
    cfg = tmp_path / "rg.toml"
    port = free_port()
    cfg.write_text(f'[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\n[upstream]\naddress = "127.0.0.1:{port}"\n'
                   '[acl]\nusers_file = "users.acl"\n')  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "redisguard", "audit-upstream", "-c", str(cfg)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and res.stderr.startswith(f"redisguard: cannot audit the upstream Redis at 127.0.0.1:{port}")
    assert len(res.stderr.splitlines()) == 1


def test_version_thresholds() -> None:
    def info(v: str) -> bytes:
        return f"# Server\r\nredis_version:{v}\r\n".encode()

    assert [check_version(info(v)).status for v in ("6.2.14", "7.0.15", "7.2.4", "8.0.0")] == ["fail", "warn", "pass", "pass"]
