"""Config validation, the CLI, certificates: what an operator runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from redisguard.cli.certs import init_dev_certs
from redisguard.commands.table import CommandTable
from redisguard.config.load import load_config
from redisguard.config.model import ConfigError
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", *args], capture_output=True, text=True, input=stdin,
                          timeout=60)  # fmt: skip


def write(tmp_path: Path, text: str, users: str = "user default off\n") -> Path:
    (tmp_path / "users.acl").write_text(users)
    p = tmp_path / "rg.toml"
    p.write_text(text)
    return p


BASE = """
[[listener]]
type = "tcp"
address = "127.0.0.1:0"
[acl]
users_file = "users.acl"
"""


def test_shipped_config_is_valid() -> None:
    cfg = load_config(REPO / "config" / "redisguard.toml")
    assert [lst.type for lst in cfg.listeners] == ["tls", "tcp"]
    assert "flushall" in cfg.acl.disabled_commands
    assert cfg.metrics.port != 9121  # redis_exporter's port


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            '[[listener]]\ntype = "tcp"\naddress = "0.0.0.0:6381"\n',
            r"listener\[1\].address: a plaintext listener on 0.0.0.0",
        ),
        ('[[listener]]\ntype = "tls"\naddress = "127.0.0.1:1"\n', r"listener\[1\].cert_file: a tls listener needs"),
        (
            '[[listener]]\ntype = "quic"\naddress = "127.0.0.1:1"\n',
            r"listener\[1\].type: must be one of tls, tcp, unix",
        ),
        ('[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:99999"\n', r"listener\[1\].address: port out of range"),
        ('[[listener]]\ntype = "tcp"\naddress = "127.0.0.1:1"\nallowed_sources = ["10.0.0.0/33"]\n', "not a CIDR"),
        ('[upstream]\npassword = "hunter2"\n', r"upstream.password: do not put secrets in the config"),
        ('[upstream]\npassword_env = "NO_SUCH_VAR_RG"\n', r"upstream.password_env: environment variable"),
        ("[upstream]\nconect_timeout = 1\n", r"upstream.conect_timeout: unknown option"),
        ('[limits]\nauth_timeout = "10"\n', r"limits.auth_timeout: expected float"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, snippet: str, message: str) -> None:
    p = write(tmp_path, BASE + snippet)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_protected_command_settings(tmp_path: Path) -> None:
    assert "[acl]\n" in BASE
    with pytest.raises(ConfigError, match=r"acl.enable_debug_command: must be one of no, yes, local, upstream; got 'maybe'"):
        load_config(write(tmp_path, BASE.replace("[acl]\n", '[acl]\nenable_debug_command = "maybe"\n')))
    cfg = load_config(write(tmp_path, BASE.replace("[acl]\n", '[acl]\nenable_module_command = "local"\n')))
    assert (cfg.acl.enable_debug_command, cfg.acl.enable_module_command) == ("upstream", "local")


def test_plaintext_remote_needs_explicit_opt_in(tmp_path: Path) -> None:
    p = write(tmp_path, BASE + '[[listener]]\ntype = "tcp"\naddress = "0.0.0.0:6382"\nallow_insecure_remote = true\n')
    assert load_config(p).listeners[1].allow_insecure_remote


def test_upstream_password_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, BASE + '[upstream]\nusername = "svc"\npassword_file = "pw"\n'))
    assert cfg.upstream.password == "s3cret"
    assert "s3cret" not in repr(cfg)
    monkeypatch.setenv("RG_PW", "fromenv")
    assert load_config(write(tmp_path, BASE + '[upstream]\npassword_env = "RG_PW"\n')).upstream.password == "fromenv"


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "-c", str(REPO / "config" / "redisguard.toml"))
    # the shipped config points at certs/ which a fresh clone has only after `certs init`
    assert ok.returncode in (0, 1), ok.stderr
    good = write(tmp_path, BASE)
    res = run_cli("check-config", "-c", str(good), "--offline")  # (its Redis: tests/system/test_check_config_upstream.py)
    assert res.returncode == 0 and "OK" in res.stdout
    bad = write(tmp_path, BASE, users="user alice on +nosuchcommand\n")
    res = run_cli("check-config", "-c", str(bad))
    assert res.returncode == 1
    assert "users.acl:1: Error in applying operation '+nosuchcommand': Unknown command or category name in ACL." in res.stderr
    res = run_cli("check-config", "-c", str(write(tmp_path, BASE + "[bogus]\n")))
    assert res.returncode == 1 and "bogus: unknown option" in res.stderr and "Traceback" not in res.stderr


def test_check_config_warns_about_scripts_and_open_default(tmp_path: Path) -> None:
    p = write(tmp_path, BASE, users="user alice on >x ~cache:* +@all\nuser bob on >y ~* &* +@all\n")
    res = run_cli("check-config", "-c", str(p), "--offline")
    assert res.returncode == 0
    assert "the 'default' user is on with nopass" in res.stderr  # no default line → Redis's open default
    assert "no 'user default' line" in res.stderr and "add `user default off`" in res.stderr
    assert "note: upstream identity: auto (auto: decided at start-up by asking Redis (not asked: --offline" in res.stderr
    # no Redis to ask: an error, and service identity, the service user counted as having every right
    port = free_port()
    p.write_text(p.read_text() + f'[upstream]\naddress = "127.0.0.1:{port}"\n')
    res = run_cli("check-config", "-c", str(p))
    assert res.returncode == 1
    assert f"error: upstream 127.0.0.1:{port}: connection refused — is Redis running?" in res.stderr
    note = f"note: upstream identity: service (auto; Redis at 127.0.0.1:{port} could not be asked (Connect call failed"
    assert note in res.stderr
    (line,) = [w for w in res.stderr.splitlines() if "are refused for" in w]
    assert "refused for 'alice': in service identity they would run with the rights of the service user" in line
    assert "'bob'" not in line and 'identity = "mirror"' in line


def test_serve_reports_bad_certificate_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    p = write(tmp_path, BASE.replace('type = "tcp"', 'type = "tls"\ncert_file = "bad.pem"\nkey_file = "bad.pem"')
              + "[upstream]\nfetch_command_table = false\n[metrics]\nenabled = false\n")  # fmt: skip
    res = run_cli("serve", "-c", str(p))
    assert res.returncode == 2
    assert "cannot load" in res.stderr and "Traceback" not in res.stderr


def test_certs_init(tmp_path: Path) -> None:
    res = run_cli("certs", "init", "--dir", str(tmp_path / "c"), "--san", "redis.internal", "--san", "10.1.2.3")
    assert res.returncode == 0, res.stderr
    for key in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "c" / key).st_mode) == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "redis.internal"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    again = run_cli("certs", "init", "--dir", str(tmp_path / "c"))
    assert "already exist" in again.stdout
    assert init_dev_certs(tmp_path / "c") == []


def test_acl_check_and_hash_cli(tmp_path: Path) -> None:
    users = tmp_path / "users.acl"
    users.write_text("user alice on >pw ~cache:* +@read +@write -@dangerous\n")
    res = run_cli("acl", "check", "--users", str(users), "--user", "alice", "--", "SET", "cache:1", "x")
    assert res.returncode == 0 and res.stdout.startswith("allowed")
    res = run_cli("acl", "check", "--users", str(users), "--user", "alice", "--", "SET", "other", "x")
    assert res.returncode == 1
    assert res.stdout.strip() == "denied (key): NOPERM this user has no permissions to access one of the keys used as arguments"
    res = run_cli("acl", "check", "--users", str(users), "--user", "alice", "--", "FLUSHALL")
    assert res.returncode == 1 and "'flushall' command" in res.stdout
    # with the proxy's config, its verdict: a disabled command is unknown, DEBUG protected
    res = run_cli("acl", "check", "-c", "config/redisguard.toml", "--users", str(users), "--user", "alice", "--", "FLUSHALL")
    assert res.returncode == 1 and res.stdout.startswith("denied (disabled): ERR unknown command 'FLUSHALL'")
    res = run_cli("acl", "check", "-c", "config/redisguard.toml", "--user", "alice", "--", "GET", "cache:1")
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("acl", "check", "--users", str(users), "--user", "alice", "--", "DEBUG", "SLEEP", "0")
    assert res.returncode == 1 and res.stdout.startswith("denied (protected): ERR DEBUG command not allowed.")
    res = run_cli("acl", "hash", stdin="pw\n")
    assert res.stdout.strip() == "#" + __import__("hashlib").sha256(b"pw").hexdigest()


def test_users_file_errors_carry_file_and_line(tmp_path: Path, table: CommandTable) -> None:
    from redisguard.acl import UsersFileError, parse_users

    with pytest.raises(UsersFileError, match=r"u.acl:3: Syntax error"):
        parse_users("user a on\n# comment\nuser b bogus\n", table, "u.acl")
    with pytest.raises(UsersFileError, match=r"^u.acl:2: duplicate user 'a' \(first defined on line 1\)\.$"):
        parse_users("user a on\nuser a off\n", table, "u.acl")
    with pytest.raises(UsersFileError, match="u.acl:1 should start with user keyword"):
        parse_users("usr a on\n", table, "u.acl")
    users = parse_users("user a on nopass ~* +@all\n\n", table, "u.acl")
    assert users["default"].describe() == "on nopass ~* &* +@all"  # Redis's default when the file has none
