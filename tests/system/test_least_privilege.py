"""Least privilege made practical: audit mode, the traffic profile, `acl suggest`, `acl diff`, `acl test`.

The loop a user runs: audit mode with a permissive user → profile → suggestion → enforce → the same
workload passes untouched, one command more is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from redisguard.commands.table import CommandTable
from redisguard.observe.metrics import parse_samples
from redisguard.observe.profile import MAX_PATTERNS, MAX_USES, TrafficProfile, key_pattern
from tests.helpers import ProxyProc, RedisProc, start_proxy

PASSWORD = "app-pw"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", *args], capture_output=True, text=True, timeout=60)


def _client(p: ProxyProc) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username="app", password=PASSWORD, socket_timeout=10)


def workload(r: redis.Redis, n: int = 40) -> list[str]:
    """A mixed application: sessions, a cache it only reads, counters, a job queue, events."""
    errors = []
    for i in range(n):
        p = r.pipeline(transaction=False)
        p.set(f"session:{i}", "v", ex=60)
        p.get(f"session:{i}")
        p.get(f"cache:page:{i}")
        p.incr("counter")
        p.hset(f"user:{i}", mapping={"name": "x"})
        p.hgetall(f"user:{i}")
        p.lpush("queue:jobs", i)
        p.publish("events", "hi")
        errors += [str(x) for x in p.execute(raise_on_error=False) if isinstance(x, redis.ResponseError)]
    return errors


def _metrics(p: ProxyProc) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    return parse_samples(text)


def _denied(p: ProxyProc, mode: str) -> float:
    return sum(v for k, v in _metrics(p).items()
               if k.startswith("redisguard_denied_commands_total{") and f'mode="{mode}"' in k)  # fmt: skip


def test_audit_suggest_enforce_loop(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(f"user default off\nuser app on >{PASSWORD} ~* &* +@all\n")
    profile = tmp_path / "profile.json"
    (tmp_path / "audit").mkdir()
    (tmp_path / "enforce").mkdir()
    audit = start_proxy(tmp_path / "audit", certs, users, redis_server.port, disabled='[]\nmode = "audit"',
                        extra=f'[profile]\nfile = "{profile}"\ninterval = 0.2')  # fmt: skip
    try:
        r = _client(audit)
        assert workload(r) == []
        r.close()
    finally:
        audit.stop()  # the profile is written at shutdown too
    data = json.loads(profile.read_text())
    app = data["users"]["app"]
    assert set(app["keys"]) == {"session:*", "cache:*", "counter", "user:*", "queue:*"}
    assert app["keys"]["cache:*"] == "read" and app["keys"]["session:*"] == "readwrite"
    assert app["channels"] == ["events"]
    assert "v" not in profile.read_text().split('"keys"')[1].split("}")[0]  # key names only, never values

    out = _cli("acl", "suggest", "--profile", str(profile), "--users", str(users))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("user app "))
    assert app["uses"]["get"] == ["cache:*", "session:*"] and app["uses"]["incrby"] == ["counter"]
    assert "%R~cache:*" in line and "~session:*" in line and "&events" in line and "+get" in line
    assert "+@all" not in line and "~*" not in line.split()
    assert "#" + __import__("hashlib").sha256(PASSWORD.encode()).hexdigest() in line  # the password is kept
    tight = tmp_path / "tight.acl"
    tight.write_text(out.stdout)
    diff = _cli("acl", "suggest", "--profile", str(profile), "--users", str(users), "--diff")
    assert diff.stdout.startswith("---") and "+user app" in diff.stdout

    # The new policy allows everything observed (acl diff --against), the old one is not touched.
    check = _cli("acl", "diff", str(users), str(tight), "--against", str(profile))
    assert check.returncode == 0 and "allows everything observed" in check.stdout, check.stdout

    enforce = start_proxy(tmp_path / "enforce", certs, tight, redis_server.port)
    try:
        r = _client(enforce)
        assert workload(r) == []
        assert _denied(enforce, "enforce") == 0
        try:
            r.delete("session:1")  # one command the application never used
        except redis.ResponseError as e:
            assert str(e).startswith("this user has no permissions to run the 'del' command")
        else:
            raise AssertionError("DEL was allowed")
        assert _denied(enforce, "enforce") == 1
        r.close()
    finally:
        enforce.stop()


def test_audit_mode_forwards_and_counts_what_would_be_denied(tmp_path: Path, certs: Path, redis_server: RedisProc
                                                               ) -> None:  # fmt: skip
    users = tmp_path / "users.acl"
    users.write_text(f"user default off\nuser app on >{PASSWORD} ~session:* +get +set\n"
                     "user ops on >ops-pw ~* +@all\n")  # fmt: skip
    p = start_proxy(tmp_path, certs, users, redis_server.port, disabled='[]\naudit_users = ["ap?"]')
    try:
        r = _client(p)
        r.set("other:audit", "1")  # denied by the key rule: forwarded in audit mode
        assert r.get("other:audit") == b"1"
        assert _denied(p, "audit") == 2 and _denied(p, "enforce") == 0
        log = p.log.read_text()
        assert '"would_deny"' in log or "would_deny" in log
        ops = redis.Redis(port=p.plain_port, username="ops", password="wrong", socket_timeout=10)
        with pytest.raises(redis.AuthenticationError):
            ops.ping()  # audit mode never bypasses authentication
        r.close()
        ops.close()
    finally:
        p.stop()


def test_acl_test_runner(tmp_path: Path) -> None:
    users = tmp_path / "users.acl"
    users.write_text("user default off\nuser app on nopass ~app:* &news +@read +set +publish\n")
    cases = tmp_path / "policy.toml"
    cases.write_text('users_file = "users.acl"\n'
                     '[[case]]\nuser = "app"\ncommand = "GET app:1"\nexpect = "allowed"\n'
                     '[[case]]\nuser = "app"\ncommand = "GET other"\nexpect = "denied-key"\n'
                     '[[case]]\nuser = "app"\ncommand = "FLUSHALL"\nexpect = "denied-command"\n'
                     '[[case]]\nuser = "app"\ncommand = "PUBLISH chat hi"\nexpect = "denied-channel"\n'
                     '[[case]]\nuser = "app"\ncommand = "NOSUCH x"\nexpect = "unknown"\n')  # fmt: skip
    out = _cli("acl", "test", str(cases))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 passed, 0 failed" in out.stdout
    cases.write_text(cases.read_text() + '[[case]]\nuser = "app"\ncommand = "SET other 1"\nexpect = "allowed"\n')
    out = _cli("acl", "test", str(cases))
    assert out.returncode == 1
    assert "FAIL app: SET other 1  (expected allowed, got denied-key" in out.stdout


def test_acl_diff_names_what_the_new_policy_breaks(tmp_path: Path, table: CommandTable) -> None:
    prof = TrafficProfile()
    cmd = table.get("get")
    assert cmd is not None
    prof.record("app", cmd, [b"get", b"session:1"], [(1, 1)], [])
    path = tmp_path / "profile.json"
    path.write_text(prof.dumps())
    old = tmp_path / "old.acl"
    old.write_text("user default off\nuser app on nopass ~session:* +get\n")
    new = tmp_path / "new.acl"
    new.write_text("user default off\nuser app on nopass ~cache:* +get\n")
    out = _cli("acl", "diff", str(old), str(new), "--against", str(path))
    assert out.returncode == 1
    assert "would deny: user app: get session:*" in out.stdout


def test_profile_memory_is_bounded(table: CommandTable) -> None:
    prof = TrafficProfile()
    get = table.get("get")
    assert get is not None
    rng = random.Random(7)
    start = time.perf_counter()
    for i in range(1_000_000):
        key = b"%d:%d" % (rng.randrange(1 << 30), i) if i % 2 else b"k%d" % i
        prof.record("app", get, [b"get", key], [(1, 1)], [])
    up = prof.users["app"]
    assert len(up.keys) <= MAX_PATTERNS + 1 and up.keys_truncated and b"*" in up.keys
    assert time.perf_counter() - start < 60
    for n, cmd in enumerate(c for c in table.commands.values() if c.has_keys):  # (command, pattern) pairs
        for k in range(40):
            prof.record("pairs", cmd, [cmd.name.encode(), b"p%d:x" % (k * 7 + n)], [(1, 1)], [])
    assert prof.users["pairs"].n_uses <= MAX_USES
    assert key_pattern(b"session:ab") == b"session:*" and key_pattern(b"a*b") == b"a\\*b"


def test_reload_guard_refuses_a_policy_that_breaks_observed_traffic(tmp_path: Path, certs: Path,
                                                                    redis_server: RedisProc) -> None:  # fmt: skip
    import signal

    users = tmp_path / "users.acl"
    users.write_text(f"user default off\nuser app on >{PASSWORD} ~session:* +get +set\n")
    p = start_proxy(tmp_path, certs, users, redis_server.port, disabled="[]\nreload_guard = true",
                    extra=f'[profile]\nfile = "{tmp_path / "profile.json"}"\ninterval = 60')  # fmt: skip
    try:
        r = _client(p)
        r.set("session:1", "v")
        assert r.get("session:1") == b"v"
        users.write_text(f"user default off\nuser app on >{PASSWORD} ~session:* +get\n")  # SET taken away
        p.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config_reload_failed" not in p.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload_guard: the new users file would deny 1 observed command(s), e.g. user app: set session:*" \
            in p.log.read_text()  # fmt: skip
        assert r.set("session:2", "v")  # the old users stay in force
        users.write_text(f"user default off\nuser app on >{PASSWORD} ~session:* +get +set +del\n")
        p.proc.send_signal(signal.SIGHUP)
        while "config_reloaded" not in p.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "config_reloaded" in p.log.read_text()
        r.close()
    finally:
        p.stop()
