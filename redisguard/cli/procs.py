"""Local processes for the demo (and the tests and benchmarks that start redisguard the same way):
free loopback ports, waiting for a listener, the demo's config, a /metrics scrape."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from redisguard.observe.metrics import parse_samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


DEMO_DISABLED = '["FLUSHALL", "FLUSHDB", "CONFIG", "KEYS", "SHUTDOWN", "DEBUG"]'


def write_config(
    d: Path, tls_port: int, plain_port: int, redis_port: int, metrics_port: int, users: Path, certs: Path, *,
    disabled: str = DEMO_DISABLED, upstream: str = "", limits: str = "", metrics: str = "", log: str = "",
    extra: str = "",
) -> Path:  # fmt: skip
    """A config with a TLS listener (client certificates optional, CN names the user) and a loopback
    plaintext one; the keyword arguments add lines to their sections (tests use them)."""
    cfg = d / "redisguard.toml"
    cfg.write_text(f"""
[[listener]]
name = "tls"
type = "tls"
address = "127.0.0.1:{tls_port}"
cert_file = "{certs / "server.pem"}"
key_file = "{certs / "server.key"}"
ca_file = "{certs / "ca.pem"}"
client_auth = "optional"
cert_user = "cn"

[[listener]]
name = "local"
type = "tcp"
address = "127.0.0.1:{plain_port}"

[upstream]
address = "127.0.0.1:{redis_port}"
{upstream}

[acl]
users_file = "{users}"
disabled_commands = {disabled}

[limits]
{limits}

[metrics]
address = "127.0.0.1:{metrics_port}"
{metrics}

[log]
format = "json"
{log}
{extra}
""")
    return cfg


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {k: v for k, v in parse_samples(text).items() if k.startswith("redisguard_")}
