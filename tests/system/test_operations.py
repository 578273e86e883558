"""What an operator meets first: start-up errors that name the fix (check-config and serve alike), the
CLI's --version/--help/default config, the upstream health check, and SIGHUP with TOML changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from redisguard.cli.certs import init_dev_certs
from redisguard.cli.preflight import preflight
from redisguard.config.load import load_config
from redisguard.config.model import ConfigError
from redisguard.observe.metrics import parse_samples
from redisguard.runtime.reconfigure import changed_settings
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, USERS_ACL, ProxyProc, RedisProc, free_port, start_proxy, start_redis

NOBODY = 65534


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip


def tls_config(d: Path, cert: str, key: str, extra: str = "", metrics: str = "127.0.0.1:0") -> Path:
    (d / "users.acl").write_text("user default off\n")
    p = d / "rg.toml"
    p.write_text(f"""
[[listener]]
name = "tls"
type = "tls"
address = "127.0.0.1:0"
cert_file = "{cert}"
key_file = "{key}"
{extra}
[upstream]
fetch_command_table = false
[acl]
users_file = "users.acl"
[metrics]
address = "{metrics}"
""")
    return p


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    init_dev_certs(tmp_path / "certs")
    init_dev_certs(tmp_path / "other")
    return tmp_path


def both(config: Path) -> list[str]:
    """check-config and serve on the same config: both fail, with the same one-line errors."""
    check = cli("check-config", "-c", str(config), "--offline")  # (serve only warns of an unreachable Redis)
    serve = cli("serve", "-c", str(config))
    assert check.returncode == 1 and serve.returncode == 2, (check, serve)
    for res in (check, serve):
        assert "Traceback" not in res.stderr and "Errno" not in res.stderr and "None" not in res.stderr, res.stderr
    errors = [line.removeprefix("error: ") for line in check.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line.removeprefix("redisguard: ") for line in serve.stderr.splitlines()]
    return errors


def test_key_not_matching_its_certificate(dev: Path) -> None:
    (err,) = both(tls_config(dev, "certs/server.pem", "other/server.key"))
    assert err.startswith("listener 'tls': cannot load ") and "KEY_VALUES_MISMATCH" in err
    assert "do the certificate and key match" in err


def test_missing_files_are_named(dev: Path) -> None:
    (err,) = both(tls_config(dev, "nope/server.pem", "certs/server.key"))
    assert err == (f"listener 'tls': cert_file: certificate not found: {dev}/nope/server.pem (directory {dev}/nope does "
                   "not exist); run: redisguard certs init, or fix the path")  # fmt: skip
    cfg = tls_config(dev, "certs/server.pem", "certs/server.key")
    (dev / "users.acl").unlink()
    (err,) = both(cfg)
    assert err == f"acl.users_file: users file not found: {dev}/users.acl"


def as_uid(uid: int, fn: Callable[[], list[str]]) -> list[str]:
    """``fn()`` in a forked child running as ``uid`` (its result comes back through a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps(fn())
        except BaseException as e:
            out = json.dumps([repr(e)])
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return list(json.loads(data))


def test_unreadable_key_names_path_owner_and_uid() -> None:
    """As root, check as another uid (the key is root's, 0600); as anyone else, a key of mode 0000."""
    dev = Path(tempfile.mkdtemp(prefix="rg-perm-"))  # (pytest's tmp_path is private to its owner)
    try:
        dev.chmod(0o755)
        init_dev_certs(dev / "certs")
        (dev / "certs").chmod(0o755)
        (dev / "certs" / "server.pem").chmod(0o644)
        key = dev / "certs" / "server.key"
        cfg = tls_config(dev, "certs/server.pem", "certs/server.key")

        def check() -> list[str]:  # what check-config and serve both print
            return preflight(load_config(cfg))

        if os.geteuid() == 0:
            assert check() == []  # root reads it (and every module the check needs is imported before the fork)
            uid, mode, (err,) = NOBODY, "0600", as_uid(NOBODY, check)
        else:
            key.chmod(0)
            uid, mode, (err,) = os.geteuid(), "0000", check()
        assert err == (f"listener 'tls': key_file: {key}: permission denied (owner uid {os.geteuid()}, group "
                       f"{os.getegid()}, mode {mode}; redisguard runs as uid {uid}: make it readable by that uid "
                       f"(chown {uid} or a shared group with mode 0640))")  # fmt: skip
    finally:
        shutil.rmtree(dev)


def test_busy_ports_unix_paths_and_duplicates(dev: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        unix = (f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{dev}/no/such/dir/rg.sock"\n'
                f'[[listener]]\nname = "a"\ntype = "tcp"\naddress = "127.0.0.1:{(dup := free_port())}"\n'
                f'[[listener]]\nname = "b"\ntype = "tcp"\naddress = "127.0.0.1:{dup}"\n')  # fmt: skip
        errors = both(tls_config(dev, "certs/server.pem", "certs/server.key", extra=unix, metrics=f"127.0.0.1:{port}"))
    assert errors == [
        f"listener 'sock': {dev}/no/such/dir/rg.sock: directory {dev}/no/such/dir does not exist (create it, e.g. "
        "RuntimeDirectory= in a systemd unit)",
        f"listener 'b': cannot listen on 127.0.0.1:{dup}: address already in use (another process, or another listener "
        "in this config, has this port)",
        f"metrics.address: cannot listen on 127.0.0.1:{port} (the metrics port for /metrics, /healthz, /readyz): address "
        "already in use (another process, or another listener in this config, has this port); change [metrics] address "
        "or stop the other process",
    ]  # fmt: skip
    (dev / "file.sock").write_text("not a socket")
    (err,) = both(tls_config(dev, "certs/server.pem", "certs/server.key",
                             extra=f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{dev}/file.sock"\n'))  # fmt: skip
    assert err == (f"listener 'sock': {dev}/file.sock: exists and is not a socket (redisguard would replace it): remove it "
                   "or choose another path")
    ok = cli("check-config", "--offline", "-c",
             str(tls_config(dev, "certs/server.pem", "certs/server.key", metrics=f"127.0.0.1:{dup}")))
    assert ok.returncode == 0 and ok.stdout.endswith(": OK\n"), ok.stderr


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ('cert_fiel = "x.pem"\n', r"listener\[0\].cert_fiel: unknown option in \[\[listener\]\] \(did you mean cert_file\?\)"),
        ("[upstream]\nhealth_check_intervall = 1\n", r"upstream.health_check_intervall: unknown option in \[upstream\] "
                                                     r"\(did you mean health_check_interval\?\)"),  # fmt: skip
        ("[limts]\n", r"limts: unknown option in the top level \(did you mean limits\?\)"),
        ("[log]\nzzz = 1\n", r"log.zzz: unknown option in \[log\] \(known: format, level, "),
    ],
)
def test_unknown_keys_are_reported_before_missing_ones(tmp_path: Path, snippet: str, message: str) -> None:
    """A typo is an unknown key (with a suggestion), not "needs cert_file"."""
    (tmp_path / "users.acl").write_text("user default off\n")
    head, tail = ('[[listener]]\ntype = "tls"\naddress = "127.0.0.1:0"\n', "") if "cert_fiel" in snippet else ("", snippet)
    p = tmp_path / "rg.toml"
    p.write_text(head + (snippet if head else '[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\n')
                 + '[acl]\nusers_file = "users.acl"\n' + tail)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_every_documented_option_is_a_known_key() -> None:
    """The shipped config shows every option (commented where default): each one is accepted."""
    from redisguard.config.options import KNOWN_KEYS

    section = ""
    text = (Path(__file__).resolve().parents[2] / "config" / "redisguard.toml").read_text()
    for line in text.splitlines():
        if m := re.match(r"#?\s*\[\[?(\w+)\]\]?\s*$", line):
            section = m.group(1)
        elif m := re.match(r"#?\s*([a-z_]+) = ", line):
            assert m.group(1) in KNOWN_KEYS[section], (section, line)


def test_version_help_and_default_config(tmp_path: Path) -> None:
    from redisguard import __version__, fast

    assert cli("--version").stdout == f"redisguard {__version__}, fast path: {fast.KERNEL}\n"
    top = cli("--help").stdout
    commands = ["serve", "check-config", "audit-upstream", "firewall", "certs init", "acl check", "acl hash", "demo"]
    for command in commands:
        assert command.split()[0] in top
        out = cli(*command.split(), "--help").stdout
        description = out.split("\n\n")[1]
        assert description[0].isupper() and description.rstrip().endswith("."), (command, out)
    missing = cli("check-config", env={"REDISGUARD_CONFIG": ""})
    assert missing.stderr == ("error: config file not found: /etc/redisguard/redisguard.toml (pass -c/--config PATH "
                              "or set REDISGUARD_CONFIG)\n")
    cfg = tmp_path / "env.toml"
    (tmp_path / "users.acl").write_text("user default off\n")
    cfg.write_text('[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:0"\n[acl]\nusers_file = "users.acl"\n'
                   '[metrics]\nenabled = false\n')  # fmt: skip
    res = cli("check-config", "--offline", env={"REDISGUARD_CONFIG": str(cfg)})
    assert res.returncode == 0 and res.stdout == f"{cfg}: OK\n", res.stderr


# -- the upstream health check -----------------------------------------------------------------


def metric(p: ProxyProc) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    return parse_samples(text)


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def events(p: ProxyProc, name: str) -> list[dict[str, object]]:
    return [e for line in p.log.read_text().splitlines() if line.startswith("{") and (e := json.loads(line))["event"] == name]


@pytest.fixture
def own_redis() -> Iterator[RedisProc]:
    r = start_redis()
    yield r
    r.stop()


def test_upstream_up_follows_redis_on_a_quiet_host(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, own_redis.port, upstream_extra="health_check_interval = 0.2")
    try:
        wait_for(lambda: metric(p)["redisguard_upstream_up"] == 1)
        own_redis.stop()  # no client is connected: only the health check can notice
        wait_for(lambda: metric(p)["redisguard_upstream_up"] == 0)
        assert metric(p)['redisguard_upstream_errors_total{reason="refused"}'] >= 1
        own_redis.start()
        wait_for(lambda: metric(p)["redisguard_upstream_up"] == 1)
        time.sleep(0.5)
        assert [e["reason"] for e in events(p, "upstream_down")] == ["refused"]  # once, not once per check
        assert len(events(p, "upstream_recovered")) == 1
    finally:
        p.stop()


def test_wrong_upstream_password_is_counted_and_logged_once(tmp_path: Path, certs: Path, own_redis: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, own_redis.port, upstream_extra="health_check_interval = 0.2")
    try:
        wait_for(lambda: metric(p)["redisguard_upstream_up"] == 1)
        admin = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
        admin.acl_setuser(UPSTREAM_USER, enabled=True, reset_passwords=True, passwords=["+rotated-in-redis-only"])
        admin.close()
        wait_for(lambda: metric(p)['redisguard_upstream_errors_total{reason="auth"}'] >= 3)
        assert metric(p)["redisguard_upstream_up"] == 0
        (event,) = events(p, "upstream_auth_failed")
        assert event["user"] == "svc" and str(event["error"]).startswith("UpstreamReplyError: WRONGPASS")
        assert "svc-test-password" not in p.log.read_text() and "rotated-in-redis-only" not in p.log.read_text()
    finally:
        p.stop()


# -- SIGHUP and the TOML ------------------------------------------------------------------------


def test_changed_settings_names_keys_not_values(tmp_path: Path) -> None:
    (tmp_path / "users.acl").write_text("user default off\n")
    (tmp_path / "pw").write_text("one")
    base = ('[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:7000"\n[upstream]\npassword_file = "pw"\n'
            '[acl]\nusers_file = "users.acl"\n[log]\nlevel = "info"\n')  # fmt: skip
    p = tmp_path / "rg.toml"
    p.write_text(base)
    old = load_config(p)
    p.write_text(base.replace("7000", "7001").replace('"info"', '"debug"') + "[limits]\nidle_timeout = 5.0\n")
    (tmp_path / "pw").write_text("two")
    assert changed_settings(old, load_config(p)) == [
        "listener[0].address", "upstream.password", "limits.idle_timeout", "log.level",
    ]  # fmt: skip
    assert changed_settings(old, old) == []


def test_sighup_applies_log_level_and_names_what_needs_a_restart(tmp_path: Path, certs: Path, redis_server: RedisProc) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(tmp_path, certs, users, redis_server.port)
    try:
        (started,) = events(p, "redisguard_started")
        assert started["users"] == 6  # a count, not every name
        text = p.config.read_text()
        assert 'level = "debug"' in text and '"FLUSHALL", "CONFIG"' in text
        p.config.write_text(text.replace('level = "debug"', 'level = "info"').replace('"FLUSHALL", "CONFIG"', '"FLUSHALL"')
                            .replace("auth_timeout = 3.0", "auth_timeout = 4.0"))  # fmt: skip
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events(p, "config_reloaded"))
        (warning,) = events(p, "config_restart_required")
        assert warning["settings"] == ["limits.auth_timeout"]
        assert warning["applied"] == ["acl.disabled_commands", "log.level"]
        out = subprocess.run(["redis-cli", "-p", str(p.plain_port), "--user", "admin", "--pass", "admin-pw",
                              "--no-auth-warning", "CONFIG", "GET", "maxmemory"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        assert out.stdout.split() == ["maxmemory", "0"]  # CONFIG is no longer disabled
        p.config.write_text("[[listener]]\n")  # invalid now: the reload fails and keeps everything
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: metric(p)["redisguard_config_last_reload_successful"] == 0)
        (failed,) = events(p, "config_reload_failed")
        assert "listener[0]" in str(failed["error"])
    finally:
        p.stop()
