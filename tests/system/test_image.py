"""The container image, run as it ships (uid 10001, its entrypoint, its config): built and run by
``.ci/image`` (``pytest -m image``), which sets REDISGUARD_IMAGE. ``buildah run --isolation chroot``
shares the host's network, so the container reaches a loopback redis-server and the test reaches it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from redisguard.cli.certs import init_dev_certs
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, RedisProc, free_port, wait_port

pytestmark = pytest.mark.image
IMAGE = os.environ.get("REDISGUARD_IMAGE", "localhost/redisguard:ci")
UID = 10001
USERS = "user default off\nuser app on >app-image-pw ~app:* +@read +@write +@connection -@dangerous\n"


@pytest.fixture
def container() -> Iterator[str]:
    name = f"redisguard-ci-{os.getpid()}"
    subprocess.run(["buildah", "rm", name], capture_output=True)  # a leftover of an interrupted run
    subprocess.run(["buildah", "from", "-q", "--name", name, IMAGE], check=True, capture_output=True)
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def run_in(container: str, mounts: dict[Path, str], *argv: str) -> list[str]:
    """The buildah command line that runs ``argv`` in ``container`` as uid 10001 with read-only mounts."""
    vols = [arg for host, inside in mounts.items() for arg in ("-v", f"{host}:{inside}:ro")]
    return ["buildah", "run", "--isolation", "chroot", "--user", f"{UID}:{UID}", *vols, container, "--", *argv]


def image_config() -> dict[str, Any]:
    out = subprocess.run(["buildah", "inspect", "--type", "image", IMAGE], capture_output=True, text=True, check=True)
    config: dict[str, Any] = json.loads(out.stdout)["Docker"]["config"]
    return config


def test_image_metadata_and_no_baked_secrets(container: str) -> None:
    cfg = image_config()
    assert cfg["User"] == f"{UID}:{UID}" and cfg["StopSignal"] == "SIGTERM"
    assert cfg["Entrypoint"] == ["redisguard"] and cfg["Cmd"] == ["serve"]
    assert set(cfg["ExposedPorts"]) == {"6380/tcp", "9187/tcp"}
    assert "http://127.0.0.1:9187/readyz" in " ".join(cfg["Healthcheck"]["Test"])
    files = subprocess.run(run_in(container, {}, "sh", "-c", "id -u; ls -A /etc/redisguard /etc/redisguard/certs"),
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert files == [str(UID), "/etc/redisguard:", "certs", "redisguard.toml", "/etc/redisguard/certs:"]


def test_shipped_config_with_mounted_users_and_certs(container: str, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_dev_certs(certs)  # keys 0600, owned by root: not readable by the image's user yet
    (tmp_path / "users.acl").write_text(USERS)
    mounts = {certs: "/etc/redisguard/certs", tmp_path / "users.acl": "/etc/redisguard/users.acl"}
    check = run_in(container, mounts, "redisguard", "check-config", "--skip-bind")  # the default: $REDISGUARD_CONFIG
    res = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    noise = ("subprocess exited", "Error: exit status", "note: ")  # (note: the upstream identity line)
    errors = [line for line in res.stderr.splitlines() if not line.startswith(noise)]
    assert errors == [  # (buildah adds the lines about the exit status)
        "error: listener 'tls': key_file: /etc/redisguard/certs/server.key: permission denied (owner uid 0, group 0, "
        f"mode 0600; redisguard runs as uid {UID}: make it readable by that uid (chown {UID} or a shared group with mode 0640))"
    ]  # fmt: skip
    os.chown(certs / "server.key", UID, UID)
    res = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout) == (0, "/etc/redisguard/redisguard.toml: OK\n"), res.stderr


def test_serve_in_the_image(container: str, tmp_path: Path, redis_server: RedisProc) -> None:
    etc = tmp_path / "etc"
    certs = etc / "certs"
    init_dev_certs(certs)
    tls_port, metrics_port = free_port(), free_port()
    (etc / "users.acl").write_text(USERS)
    (etc / "upstream.pw").write_text(UPSTREAM_PASSWORD + "\n")
    (etc / "redisguard.toml").write_text(f"""
[[listener]]
name = "tls"
type = "tls"
address = "127.0.0.1:{tls_port}"
cert_file = "certs/server.pem"
key_file = "certs/server.key"
[upstream]
address = "127.0.0.1:{redis_server.port}"
username = "{UPSTREAM_USER}"
password_file = "upstream.pw"
health_check_interval = 1.0
[acl]
users_file = "users.acl"
disabled_commands = ["FLUSHALL"]
[metrics]
address = "127.0.0.1:{metrics_port}"
[log]
format = "json"
""")
    for p in [etc, *etc.rglob("*")]:
        os.chown(p, UID, UID)
    mounts = {etc: "/etc/redisguard"}
    res = subprocess.run(run_in(container, mounts, "redisguard", "check-config"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        # the image's entrypoint and command as they ship: `redisguard serve`, config from $REDISGUARD_CONFIG
        proc = subprocess.Popen(run_in(container, mounts, "redisguard", "serve"), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # fmt: skip
    try:
        try:
            wait_port(tls_port, proc, timeout=60)
            wait_port(metrics_port, proc, timeout=10)
        except RuntimeError as e:
            raise AssertionError(f"{e}\n{log.read_text()}") from None
        c = redis.Redis(host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"), username="app",
                        password="app-image-pw", socket_timeout=10)  # fmt: skip
        assert c.set("app:image", "ok") and c.get("app:image") == b"ok"
        with pytest.raises(redis.ResponseError, match="unknown command 'FLUSHALL'"):
            c.flushall()
        c.close()
        ready = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
        assert ready.status == 200 and ready.read().startswith(b"ready")
        # the image's own HEALTHCHECK command, pointed at this run's metrics port
        probe = [a.replace(":9187/", f":{metrics_port}/") for a in image_config()["Healthcheck"]["Test"][1:]]
        assert subprocess.run(run_in(container, {}, *probe), capture_output=True, timeout=60).returncode == 0
        started = [json.loads(line) for line in log.read_text().splitlines() if '"redisguard_started"' in line]
        assert started and started[0]["users"] == 2
    finally:
        # the image's STOPSIGNAL, to redisguard itself (buildah would answer a SIGTERM with a SIGKILL)
        for pid in descendants(proc.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].startswith(b"/opt/redisguard/bin/python"):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group started above
            proc.wait(10)
    assert '"redisguard_stopped"' in log.read_text(), log.read_text()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (chroot isolation shares the host's PID namespace)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out

