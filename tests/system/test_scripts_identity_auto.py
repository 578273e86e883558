"""Scripts by default (identity = "auto", asked of Redis), against real redis-servers: mirror where the
service user may manage ACL users (scripts run as the caller's mirror, less what redisguard disables),
service where it cannot; with Redis down at start, every right until Redis answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    acl_user,
    free_port,
    proxy_config,
    redis_server_binary,
    start_proxy,
    start_redis,
    upstream_user,
    wait_port,
)
from tests.system.conftest import CMD_REFUSED, LIB, REFUSED, USERS, _proxy, check_config, cli, client

KEY_REFUSED = "no permissions to access|can't access at least one of the keys"


def serve(cfg: Path, log: Path) -> ProxyProc:
    """``redisguard serve`` with a config written by proxy_config (its tls, plaintext and metrics ports)."""
    ports = [int(m) for m in re.findall(r'address = "127\.0\.0\.1:(\d+)"', cfg.read_text())]
    proc = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))  # fmt: skip
    p = ProxyProc(proc, ports[0], ports[1], ports[3], cfg, log)
    wait_port(p.plain_port, proc)
    return p


def events(p: ProxyProc, name: str) -> list[dict[str, str]]:
    out = []
    for line in p.log.read_text().splitlines():
        if line.startswith("{") and (e := json.loads(line)).get("event") == name:
            out.append(e)
    return out


def test_auto_with_redis_down_reads_the_rights_once_redis_answers(tmp_path: Path, certs: Path) -> None:
    """rt1 j_auto_down: identity = "auto" with Redis down at start is service with unknown rights (every
    right: every script refused). Each worker asks again until Redis answers, then the real rights hold;
    that it would now be mirror is logged (a restart switches)."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    port = free_port()
    p = start_proxy(tmp_path, certs, users, port, upstream_extra='identity = "auto"', extra="[server]\nworkers = 2\n")
    r = None
    try:
        time.sleep(1.5)  # a few retries against no Redis
        r = start_redis(port)
        deadline = time.monotonic() + 60
        while len(events(p, "service_rights_read")) < 2:
            assert time.monotonic() < deadline, p.log.read_text()[-3000:]
            time.sleep(0.2)
        assert all(e["rights"] == "~* &* +@all -flushall" for e in events(p, "service_rights_read"))
        assert len(events(p, "service_rights_unknown")) >= 2 and len(events(p, "upstream_identity_restart_required")) == 2
        redis.Redis(port=port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD).set("sec:1", "secret")
        for _ in range(6):  # connections spread over both workers
            assert client(p, "wide").eval("return redis.call('GET', 'sec:1')", 0) == "secret"
            with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
                client(p, "nodanger").eval("return redis.call('KEYS', '*')", 0)
    finally:
        p.stop()
        if r is not None:
            r.stop()


def test_redis_down_then_a_service_user_that_may_run_a_disabled_command(tmp_path: Path, certs: Path) -> None:
    """Rights read late that start-up would have refused: said in serve's words, and still every right."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    port = free_port()
    p = start_proxy(tmp_path, certs, users, port)  # identity = "service", FLUSHALL disabled
    r = RedisProc(port, [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--user",
                               UPSTREAM_USER, "on", f">{UPSTREAM_PASSWORD}", "~*", "&*", "+@all"])  # fmt: skip
    try:
        r.start()
        deadline = time.monotonic() + 60
        while not events(p, "service_rights_unsafe"):
            assert time.monotonic() < deadline, p.log.read_text()[-3000:]
            time.sleep(0.2)
        (e,) = events(p, "service_rights_unsafe")
        assert e["error"].startswith(f"upstream: the service user '{UPSTREAM_USER}' may run FLUSHALL in Redis")
        assert not events(p, "service_rights_read") and not events(p, "upstream_identity_restart_required")
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            client(p, "wide").eval("return redis.call('FLUSHALL')", 0)
    finally:
        p.stop()
        if r.proc is not None:
            r.stop()


def test_default_is_mirror_where_the_service_user_manages_acl_users(
        tmp_path_factory: pytest.TempPathFactory, certs: Path, own_redis: RedisProc, upstream: redis.Redis) -> None:  # fmt: skip
    p = _proxy(tmp_path_factory, certs, own_redis.port, "auto", upstream_extra='identity = "auto"',
               extra="[server]\nworkers = 2\n")  # fmt: skip
    try:
        (e,) = events(p, "upstream_identity")  # once, in the process that forks the workers
        assert e["identity"] == "mirror" and "may manage Redis ACL users" in e["why"]
        # every worker is a mirror: connections spread over both
        for _ in range(6):
            assert upstream_user(upstream, client(p, "wide").execute_command("CLIENT", "INFO")) == "rg:wide"
        # the repros now run with the caller's rights: Redis refuses them from inside the script
        wide, nodanger, narrow = client(p, "wide"), client(p, "nodanger"), client(p, "narrow")
        assert "-flushall" in acl_user(upstream, "rg:wide")["commands"]  # disabled here: taken from the mirror
        with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
            wide.eval("return redis.call('FLUSHALL')", 0)
        for script in ("return redis.call('KEYS', '*')", "return redis.call('SWAPDB', 0, 1)"):
            with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
                nodanger.eval(script, 0)
        with pytest.raises(redis.ResponseError, match=KEY_REFUSED):
            narrow.execute_command("EVAL_RO", "return redis.call('GET', 'sec:1')", 0)
        wide.function_load(LIB, replace=True)
        with pytest.raises(redis.ResponseError, match=KEY_REFUSED):
            narrow.execute_command("FCALL_RO", "sec", 0)
        assert narrow.execute_command("FCALL_RO", "rd", 1, "u:1") == "mine"
        assert narrow.execute_command("EVAL_RO", "return redis.call('GET', 'u:1')", 0) == "mine"
        assert upstream.get("sec:1") == "secret"
        res = cli("check-config", "-c", str(p.config), "--skip-bind")
        assert "upstream identity: auto (auto: decided at start-up by asking Redis" in res.stderr
        # a reload that disables one more command takes it from every mirror too
        assert wide.eval("return #redis.call('KEYS', 'sec:*')", 0) == 1
        p.config.write_text(p.config.read_text().replace('disabled_commands = ["FLUSHALL", "CONFIG"]',
                                                         'disabled_commands = ["FLUSHALL", "CONFIG", "KEYS"]'))  # fmt: skip
        os.kill(p.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "-keys" not in acl_user(upstream, "rg:wide")["commands"]:
            assert time.monotonic() < deadline, acl_user(upstream, "rg:wide")
            time.sleep(0.1)
        with pytest.raises(redis.ResponseError, match=CMD_REFUSED):
            client(p, "wide").eval("return redis.call('KEYS', 'sec:*')", 0)
    finally:
        p.stop()


def test_default_is_service_where_the_service_user_cannot(tmp_path: Path, certs: Path, own_redis: RedisProc,
                                                          upstream: redis.Redis) -> None:  # fmt: skip
    # a service user without ACL rights but ACL GETUSER of itself (its rights are read from that)
    upstream.execute_command("ACL", "SETUSER", "plain", "reset", "on", f">{UPSTREAM_PASSWORD}", "~*", "&*", "+@all",
                             "-@admin", "-flushall", "+command|info", "+info", "+acl|getuser")  # fmt: skip
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    cfg = proxy_config(tmp_path, certs, users, own_redis.port, free_port(), free_port(), free_port(),
                       upstream_extra='identity = "auto"')  # fmt: skip
    cfg.write_text(cfg.read_text().replace(f'username = "{UPSTREAM_USER}"', 'username = "plain"'))
    p = serve(cfg, tmp_path / "log")
    try:
        (e,) = events(p, "upstream_identity")
        assert e["identity"] == "service" and "'plain' may not manage Redis ACL users" in e["why"]
        assert upstream_user(upstream, client(p, "wide").execute_command("CLIENT", "INFO")) == "plain"
        assert client(p, "wide").eval("return redis.call('GET', 'sec:1')", 0) == "secret"  # wider than 'plain'
        with pytest.raises(redis.exceptions.NoPermissionError, match=REFUSED):
            client(p, "nodanger").eval("return redis.call('KEYS', '*')", 0)
        res = cli("check-config", "-c", str(cfg), "--skip-bind")
        assert "upstream identity: auto" in res.stderr
        res = check_config(p)
        assert "upstream identity: service (auto: the service user 'plain' may not manage" in res.stderr, res.stdout + res.stderr
    finally:
        p.stop()
        upstream.execute_command("ACL", "DELUSER", "plain")
