"""A real Redis Cluster on loopback, one redisguard sidecar per node (the layout of config/examples/cluster).

Each node: its plain port on 127.0.0.1 for its sidecar only, Redis's own TLS port for the cluster's
internal traffic (tls-cluster, tls-replication: bus, replication, MIGRATE, operators' redis-cli), and
announce settings naming its sidecar's TLS listener (plaintext clients — redisguard's upstream link —
are told cluster-announce-port; TLS peers cluster-announce-tls-port)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import hiredis
import redis
from redis import Redis  # (annotations in ClusterNode: its field `redis` shadows the module there)

from redisguard.protocol.resp import encode_command
from redisguard.upstream.cluster import parse_nodes
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, free_port, start_proxy, start_redis

CLUSTER_USERS = """\
user default off
user admin on >admin-pw ~* &* +@all
user app on >app-pw ~* &* +@all -@dangerous
user cache on >cache-pw ~cache:* -@all +@read +@write +@connection +cluster|slots +cluster|shards +cluster|nodes
user nocluster on >nocluster-pw ~* -@all +@read +@write +@connection
"""
PASSWORDS = {"admin": "admin-pw", "app": "app-pw", "cache": "cache-pw", "nocluster": "nocluster-pw"}


@dataclass
class ClusterNode:
    redis: RedisProc
    proxy: ProxyProc
    tls_port: int  # Redis's own TLS port: bus peers, replicas, MIGRATE, operators
    bus_port: int
    id: str = ""

    def direct(self, user: str = UPSTREAM_USER, password: str = UPSTREAM_PASSWORD) -> Redis:
        """Straight to the node's plain port (as its sidecar connects), as ``user``."""
        return redis.Redis(port=self.redis.port, username=user, password=password, socket_timeout=10)

    def role(self) -> str:
        return str(self.direct().info("replication")["role"])


def tls_args(certs: Path) -> list[str]:
    """redis-server's TLS settings for the cluster's own links: the dev server certificate to serve,
    the client certificate (clientAuth) to present to peers, mutual TLS."""
    return [f"--tls-cert-file {certs / 'server.pem'}", f"--tls-key-file {certs / 'server.key'}",
            f"--tls-client-cert-file {certs / 'client.pem'}", f"--tls-client-key-file {certs / 'client.key'}",
            f"--tls-ca-cert-file {certs / 'ca.pem'}", "--tls-cluster yes", "--tls-replication yes"]  # fmt: skip


def start_node(d: Path, certs: Path, users: Path) -> ClusterNode:
    """A node and its sidecar; both again on other ports if one was taken before it was bound (a free
    port can become another socket's meanwhile: the cluster's own bus connections use ephemeral ports)."""
    d.mkdir()
    for attempt in range(3):
        try:
            return _start_node(d, certs, users)
        except RuntimeError as e:
            if "address already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_node(d: Path, certs: Path, users: Path) -> ClusterNode:
    tls_port, bus_port, sidecar = free_port(), free_port(), (free_port(), free_port(), free_port())
    r = start_redis(extra=[
        "--cluster-enabled yes", f"--cluster-config-file {d / 'nodes.conf'}", f"--dir {d}", "--cluster-node-timeout 2000",
        f"--cluster-port {bus_port}", f"--tls-port {tls_port}", *tls_args(certs),
        f"--masteruser {UPSTREAM_USER}", f"--masterauth {UPSTREAM_PASSWORD}",
        "--cluster-announce-ip 127.0.0.1", f"--cluster-announce-port {sidecar[0]}",
        f"--cluster-announce-tls-port {tls_port}", f"--cluster-announce-bus-port {bus_port}",
    ])  # fmt: skip
    try:
        return ClusterNode(r, start_proxy(d, certs, users, r.port, ports=sidecar), tls_port, bus_port)
    except RuntimeError:
        r.stop()
        (d / "nodes.conf").unlink(missing_ok=True)
        raise


def operator_cli(certs: Path) -> list[str]:
    """redis-cli as an operator on the cluster's own TLS ports (not through redisguard)."""
    return ["redis-cli", "--tls", "--cacert", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"),
            "--key", str(certs / "client.key"), "--user", UPSTREAM_USER, "--pass", UPSTREAM_PASSWORD,
            "--no-auth-warning"]  # fmt: skip


def start_cluster(d: Path, certs: Path, users: Path, primaries: int = 3, replicas: int = 1) -> list[ClusterNode]:
    """Start the nodes and their sidecars, create the cluster with redis-cli --cluster create, wait
    until every node agrees and every replica is in sync."""
    count = primaries * (1 + replicas)
    with ThreadPoolExecutor(count) as pool:
        nodes = list(pool.map(lambda i: start_node(d / f"node{i}", certs, users), range(count)))
    try:
        out = subprocess.run([*operator_cli(certs), "--cluster", "create", *(f"127.0.0.1:{n.tls_port}" for n in nodes),
                              "--cluster-replicas", str(replicas), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0 and "[OK] All 16384 slots covered." in out.stdout, out.stdout + out.stderr
        wait_healthy(nodes)
        for n in nodes:
            n.id = n.direct().execute_command("CLUSTER", "MYID").decode()
        return nodes
    except BaseException:
        stop_cluster(nodes)
        raise


def wait_healthy(nodes: list[ClusterNode], timeout: float = 45.0) -> None:
    """Every node says cluster_state:ok and sees the same primaries; every replica's link is up."""
    deadline = time.monotonic() + timeout
    while True:
        views, links = set(), []
        for n in nodes:
            c = n.direct()
            ok = c.execute_command("CLUSTER", "INFO").decode().count("cluster_state:ok")
            views.add((ok, tuple(sorted((x.id, x.address) for x in parse_nodes(c.execute_command("CLUSTER", "NODES").decode())
                                        if "master" in x.flags))))  # fmt: skip
            info = c.info("replication")
            links.append(info["role"] == "master" or info.get("master_link_status") == "up")
        if len(views) == 1 and next(iter(views))[0] == 1 and all(links):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not healthy after {timeout}s: {views} {links}")
        time.sleep(0.2)


def stop_cluster(nodes: list[ClusterNode]) -> None:
    for n in nodes:
        n.proxy.stop()
        n.redis.stop()


def exchange(port: int, commands: list[list[str | bytes]], ca: Path | None = None) -> bytes:
    """The raw reply bytes to ``commands`` sent in one write (TLS through a sidecar when ``ca`` is given)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="localhost") if ca else raw
    with sock:
        sock.sendall(b"".join(encode_command([a if isinstance(a, bytes) else a.encode() for a in c]) for c in commands))
        reader, data, got = hiredis.Reader(), b"", 0
        while got < len(commands):
            chunk = sock.recv(1 << 16)
            assert chunk, f"connection closed after {got} replies: {data!r}"
            data += chunk
            reader.feed(chunk)
            while reader.gets() is not False:
                got += 1
        return data
