"""The deployment examples agree with the code, the image and each other: ports, paths, probe URLs, the
user. Each example's redisguard config is parsed by the real config loader."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from redisguard.cli.main import SYSTEM_CONFIG
from redisguard.config.model import Config
from redisguard.config.parse import parse_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "config" / "examples"
DOCKERFILE = (REPO / "Dockerfile").read_text()
IMAGE_CONFIG = REPO / "config" / "container" / "redisguard.toml"
UID = 10001


def toml(text: str) -> Config:
    import tomllib

    return parse_config(tomllib.loads(text), Path("/"))


def dockerfile_mounts() -> set[str]:
    """The mount points the Dockerfile's header documents."""
    return set(re.findall(r"^#\s+(/etc/redisguard/\S+)", DOCKERFILE, re.M))


def metrics_paths() -> set[str]:
    return set(re.findall(r'path == b"(/\w+)"', (REPO / "redisguard" / "observe" / "metrics.py").read_text()))


def test_dockerfile_and_image_config() -> None:
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", DOCKERFILE, re.M)
    assert DOCKERFILE.count("FROM ${BASE}") == 2  # multi-stage
    assert f"USER {UID}:{UID}" in DOCKERFILE and f"--uid {UID}" in DOCKERFILE
    assert "-c /wheels/constraints.txt" in DOCKERFILE and "--no-index" in DOCKERFILE
    assert "STOPSIGNAL SIGTERM" in DOCKERFILE
    cfg = toml(IMAGE_CONFIG.read_text())
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", DOCKERFILE)
    assert health and (int(health.group(1)), health.group(2)) == (cfg.metrics.port, "/readyz")
    assert health.group(2) in metrics_paths() == {"/metrics", "/healthz", "/readyz"}
    assert cfg.metrics.host == "0.0.0.0"  # probes and Prometheus reach it from outside the container
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.*)$", DOCKERFILE, re.M)[0].split()}
    assert exposed == {cfg.listeners[0].port, cfg.metrics.port}
    assert f"REDISGUARD_CONFIG={SYSTEM_CONFIG}" in DOCKERFILE
    assert dockerfile_mounts() == {SYSTEM_CONFIG, str(cfg.acl.users_file), "/etc/redisguard/certs/"}
    assert cfg.listeners[0].tls is not None
    assert {str(cfg.listeners[0].tls.cert_file.parent) + "/"} == {"/etc/redisguard/certs/"}
    # no users, no passwords in the image: the users file is a mount point, not a COPY
    assert "users.acl" not in "".join(re.findall(r"^COPY .*$", DOCKERFILE, re.M))
    constraints = (REPO / "constraints.txt").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S)
    assert deps
    for dep in re.findall(r'"([A-Za-z0-9_-]+)', deps.group(1)):
        assert re.search(rf"^{dep.replace('_', '-')}==\S+$", constraints, re.M | re.I), f"{dep} is not pinned"


def test_compose() -> None:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())
    redis, guard = doc["services"]["redis"], doc["services"]["redisguard"]
    image_cfg = toml(IMAGE_CONFIG.read_text())
    assert guard["build"] == {"context": "../..", "dockerfile": "Dockerfile"}
    assert guard["user"] == f"{UID}:{UID}" and guard["network_mode"] == "service:redis"
    mounts = {v.split(":")[1] for v in guard["volumes"]}
    assert mounts == {p.rstrip("/") for p in dockerfile_mounts()}
    published = {int(p.rsplit(":", 1)[1]) for p in redis["ports"]}
    assert published == {image_cfg.listeners[0].port, image_cfg.metrics.port}
    assert "127.0.0.1:9187:9187" in redis["ports"]  # metrics: this host only
    cmd = redis["command"]
    assert cmd[cmd.index("--bind") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(image_cfg.upstream.port)
    assert image_cfg.upstream.host == "127.0.0.1"  # shared network namespace: the image's default upstream
    assert set(doc["secrets"]) == {*redis["secrets"], *guard["secrets"]}


def test_kubernetes_sidecar() -> None:
    config_map, pod = yaml.safe_load_all((EXAMPLES / "kubernetes-sidecar.yaml").read_text())
    cfg = toml(config_map["data"]["redisguard.toml"])
    spec = pod["spec"]
    redis, guard = (next(c for c in spec["containers"] if c["name"] == n) for n in ("redis", "redisguard"))
    # Redis: a unix socket only, in an emptyDir mounted by Redis and redisguard alone
    args = redis["args"]
    assert args[args.index("--port") + 1] == "0"
    socket = args[args.index("--unixsocket") + 1]
    assert cfg.upstream.path is not None and str(cfg.upstream.path) == socket
    socket_volume = next(v for v in spec["volumes"] if "emptyDir" in v)
    users_of_socket = [c["name"] for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == socket_volume["name"]]
    assert sorted(users_of_socket) == ["redis", "redisguard"]
    for c in (redis, guard):
        (m,) = [m for m in c["volumeMounts"] if m["name"] == socket_volume["name"]]
        assert m["mountPath"] == str(Path(socket).parent)
    # redisguard: the image's user, its config where args point, files where the config says
    assert guard["securityContext"]["runAsUser"] == UID == spec["securityContext"]["fsGroup"]
    assert args[args.index("--unixsocketperm") + 1] == "770"
    mounted = {m["mountPath"]: m["name"] for m in guard["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_path = Path(guard["args"][guard["args"].index("--config") + 1])
    assert volumes[mounted[str(config_path.parent)]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]
    assert cfg.listeners[0].tls is not None
    tls = volumes[mounted[str(cfg.listeners[0].tls.cert_file.parent)]]["secret"]
    assert {i["path"] for i in tls["items"]} == {cfg.listeners[0].tls.cert_file.name, cfg.listeners[0].tls.key_file.name}
    assert "secret" in volumes[mounted[str(cfg.acl.users_file.parent)]]
    # ports, probes, scrape annotations
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    assert ports == {"redis-tls": cfg.listeners[0].port, "metrics": cfg.metrics.port} and cfg.metrics.host == "0.0.0.0"
    probes = {guard[k]["httpGet"]["path"]: guard[k]["httpGet"]["port"] for k in ("livenessProbe", "readinessProbe")}
    assert probes == {"/healthz": "metrics", "/readyz": "metrics"} and set(probes) <= metrics_paths()
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == cfg.metrics.port
    assert notes["prometheus.io/path"] in metrics_paths()


def unit_file(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings: name -> every value it is given (in order)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit() -> None:
    unit = unit_file(EXAMPLES / "systemd" / "redisguard.service")
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "RestrictNamespaces": "yes",
                       "KillSignal": "SIGTERM", "ExecReload": "/bin/kill -HUP $MAINPID"}.items():  # fmt: skip
        assert unit[key] == [value], key
    env = dict(v.split("=", 1) for v in unit["Environment"])
    assert env["REDISGUARD_CONFIG"] == SYSTEM_CONFIG
    assert shlex.split(unit["ExecStart"][0])[1:] == ["serve"]
    assert shlex.split(unit["ExecStartPre"][0])[1:3] == ["check-config", "--skip-bind"]
    text = (EXAMPLES / "systemd" / "redisguard.toml").read_text()
    password = 'password_file = "/run/credentials/redisguard.service/upstream-password"\n'
    assert password in text
    cfg = toml(text.replace(password, ""))  # (the loader reads the password file: not on this machine)
    # every file the config reads from /run/credentials is loaded by the unit, and only those
    creds = {f"/run/credentials/redisguard.service/{c.split(':')[0]}" for c in unit["LoadCredential"]}
    assert cfg.listeners[0].tls is not None
    read = {str(p) for p in (cfg.listeners[0].tls.key_file, cfg.acl.users_file) if str(p).startswith("/run/credentials/")}
    assert creds == read | {"/run/credentials/redisguard.service/upstream-password"}
    unix = next(lst for lst in cfg.listeners if lst.type == "unix")
    assert unix.path is not None and str(unix.path.parent) == "/run/" + unit["RuntimeDirectory"][0]
    assert cfg.metrics.host == "127.0.0.1"  # on the host, metrics stay local

