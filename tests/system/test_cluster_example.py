"""A cluster set up for sidecars: config/examples/cluster/cluster.sh as an operator runs it (start, a
RedisCluster round trip through its sidecars, stop) sets what the cluster checks ask for, and
audit-upstream on a cluster node as Redis starts it says what to set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.helpers import proxy_config


def test_audit_upstream_on_a_node_with_default_announce_and_plaintext_links(tmp_path: Path, certs: Path) -> None:
    """A cluster node as Redis starts it (no announce settings, no tls-cluster): both items say what to set."""
    from tests.helpers import free_port, start_redis

    # (an explicit bus port: the default, port + 10000, does not exist for a free port above 55535)
    r = start_redis(extra=["--cluster-enabled yes", f"--cluster-config-file {tmp_path / 'nodes.conf'}", f"--dir {tmp_path}",
                           f"--cluster-port {free_port()}"])  # fmt: skip
    try:
        cfg = proxy_config(tmp_path, certs, tmp_path / "users.acl", r.port, 6380, 6381, 9187)
        res = subprocess.run([sys.executable, "-m", "redisguard", "audit-upstream", "--json", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        r.stop()
    checks = {c["id"]: c for c in json.loads(res.stdout)["checks"]}
    announce, links = checks["cluster-announce"], checks["cluster-links"]
    assert res.returncode == 1
    assert announce["status"] == "fail" and f"announces ?:{r.port}" in announce["detail"]  # (no IP before it meets a node)
    assert "cluster-announce-ip 127.0.0.1, cluster-announce-port 6380, cluster-announce-bus-port" in announce["fix"]
    assert links["status"] == "warn" and "cannot carry replication" in links["detail"]
    assert "tls-cluster yes, tls-replication yes, cluster-announce-tls-port" in links["fix"]


def test_cluster_example_sets_what_the_check_asks_for() -> None:
    """config/examples/cluster/cluster.sh: valid bash, and every setting the cluster check names is in it."""
    script = Path(__file__).resolve().parents[2] / "config" / "examples" / "cluster" / "cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for setting in ("--cluster-announce-ip", '--cluster-announce-port "$sidecar"', '--cluster-announce-bus-port "$bus"',
                    '--cluster-announce-tls-port "$tls"', '--tls-port "$tls"', "--tls-cluster yes", "--tls-replication yes",
                    '--masteruser repl', 'address = "127.0.0.1:$sidecar"', 'address = "127.0.0.1:$port"'):  # fmt: skip
        assert setting in text, setting


def _free_run(count: int, offsets: tuple[int, ...]) -> int:
    """A base port such that base+o+i (i < count) is free for every offset o."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 45000)
        try:
            for o in offsets:
                for i in range(count):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", base + o + i))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port run")


def test_cluster_example_starts_serves_and_stops(tmp_path: Path) -> None:
    """config/examples/cluster/cluster.sh as an operator runs it: start (6 nodes, 6 sidecars, the cluster
    created), a RedisCluster round trip through the sidecars as `app`, stop — each within a timeout (an
    unquoted `+config|get` once piped redis-server into `get` and the start loop never ended)."""
    script = Path(__file__).resolve().parents[2] / "config" / "examples" / "cluster" / "cluster.sh"
    base = _free_run(6, (0, 100, 10000))
    sidecars, metrics = _free_run(6, (0,)), _free_run(6, (0,))
    env = {**__import__("os").environ, "BASE": str(base), "SIDECARS": str(sidecars), "METRICS": str(metrics),
           "REDISGUARD": str(Path(sys.executable).parent / "redisguard")}  # fmt: skip
    run = tmp_path / "cluster"
    try:
        start = subprocess.run(["bash", str(script), "start", str(run)], env=env, capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        assert f"-p {sidecars} --user app" in start.stdout
        rc = redis.RedisCluster(host="127.0.0.1", port=sidecars, ssl=True, ssl_ca_certs=str(run / "certs" / "ca.pem"),
                                username="app", password="app-password")  # fmt: skip
        try:
            for i in range(50):
                rc.set(f"example:{i}", i)
            assert [rc.get(f"example:{i}") for i in range(50)] == [str(i).encode() for i in range(50)]
            assert {n.port for n in rc.get_nodes()} <= set(range(sidecars, sidecars + 6))  # only sidecars announced
            with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the .flushall. command"):
                rc.execute_command("FLUSHALL", target_nodes=redis.RedisCluster.PRIMARIES)
        finally:
            rc.close()
    finally:
        stop = subprocess.run(["bash", str(script), "stop", str(run)], env=env, capture_output=True, text=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
    assert not list(run.glob("*.pid"))
