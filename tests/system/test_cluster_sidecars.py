"""Redis Cluster with one redisguard sidecar per node (issue 16), against a real 3 primaries + 3 replicas
cluster on loopback: redis-py RedisCluster and redis-cli -c over TLS through the sidecars, MOVED and ASK
relayed unchanged, a slot migration, READONLY on a replica, a restricted user denied on every node, a
failover with the client carrying on, and check-config / audit-upstream on the announce settings.

Each test prints what it saw (``pytest -s``): slots covered, redirections followed, denials."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from redis.crc import key_slot

from tests.cluster_nodes import (
    CLUSTER_USERS,
    PASSWORDS,
    ClusterNode,
    exchange,
    operator_cli,
    start_cluster,
    stop_cluster,
    wait_healthy,
)  # fmt: skip
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, proxy_config

SLOTS = 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[list[ClusterNode]]:
    d = tmp_path_factory.mktemp("cluster")
    users = d / "users.acl"  # the same users file on every sidecar
    users.write_text(CLUSTER_USERS)
    nodes = start_cluster(d, certs, users)
    for n in nodes:  # the same users on every node too, so Redis itself can be asked for its verdicts
        c = n.direct()
        for line in CLUSTER_USERS.splitlines()[1:]:
            c.execute_command("ACL", "SETUSER", *line.split(" ")[1:])
    yield nodes
    stop_cluster(nodes)


def primaries(nodes: list[ClusterNode]) -> list[ClusterNode]:
    return [n for n in nodes if n.role() == "master"]


def owners(nodes: list[ClusterNode]) -> dict[int, ClusterNode]:
    """Slot → the primary serving it now (CLUSTER SLOTS as Redis reports it: the ports are sidecars')."""
    out = {}
    for start, end, primary, *_ in nodes[0].direct().execute_command("CLUSTER", "SLOTS"):
        node = next(n for n in nodes if n.proxy.tls_port == primary[1])
        out.update(dict.fromkeys(range(start, end + 1), node))
    return out


def owner(nodes: list[ClusterNode], key: str) -> ClusterNode:
    return owners(nodes)[key_slot(key.encode())]


def key_on(slot_owner: ClusterNode, nodes: list[ClusterNode], prefix: str, other: bool = False) -> str:
    """A key whose slot ``slot_owner`` serves (``other``: one it does not)."""
    slots = owners(nodes)
    return next(k for i in range(100000) if (slots[key_slot((k := f"{prefix}{i}").encode())] is slot_owner) != other)


def one_key_per_slot() -> list[str]:
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < SLOTS:
        keys.setdefault(key_slot(b"k%d" % i), f"k{i}")
        i += 1
    return [keys[s] for s in range(SLOTS)]


def cluster_client(node: ClusterNode, certs: Path, user: str = "app", **kw: Any) -> redis.RedisCluster:
    return redis.RedisCluster(host="127.0.0.1", port=node.proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                              username=user, password=PASSWORDS[user], socket_timeout=10, **kw)  # fmt: skip


def both(node: ClusterNode, certs: Path, user: str, commands: list[list[str | bytes]]) -> tuple[bytes, bytes]:
    """The same requests as ``user`` through the node's sidecar and straight to the node (same users)."""
    login: list[str | bytes] = ["AUTH", user, PASSWORDS[user]]
    via = exchange(node.proxy.tls_port, [login, *commands], ca=certs / "ca.pem")
    direct = exchange(node.redis.port, [login, *commands])
    return via, direct


CLUSTER_COMMANDS: list[list[str | bytes]] = [
    ["CLUSTER", "SLOTS"], ["CLUSTER", "SHARDS"], ["CLUSTER", "NODES"], ["CLUSTER", "INFO"], ["CLUSTER", "MYID"],
    ["CLUSTER", "KEYSLOT", "cache:1"], ["CLUSTER", "COUNTKEYSINSLOT", "1"], ["CLUSTER", "GETKEYSINSLOT", "1", "1"],
    ["CLUSTER", "LINKS"], ["CLUSTER", "SETSLOT", "1", "STABLE"], ["CLUSTER", "FAILOVER"], ["CLUSTER", "RESET"],
    ["CLUSTER", "MEET", "127.0.0.1", "1"], ["CLUSTER", "ADDSLOTS", "1"], ["CLUSTER", "REPLICATE", "x"],
    ["CLUSTER", "COUNT-FAILURE-REPORTS", "x"], ["ASKING"], ["READONLY"], ["READWRITE"],
    ["RESTORE-ASKING", "cache:1", "0", "x"], ["MIGRATE", "127.0.0.1", "1", "cache:1", "0", "1"],
    ["GET", "cache:1"], ["GET", "other:1"], ["SET", "other:1", "x"],
]  # fmt: skip


def test_policy_matches_redis_on_a_cluster_node(cluster: list[ClusterNode], certs: Path) -> None:
    """CLUSTER subcommands, ASKING, READONLY/READWRITE: the categories come from the node's COMMAND INFO;
    redisguard's ACL DRYRUN (and its refusals) equal the node's own for every user."""
    node = cluster[0]
    admin = redis.Redis(port=node.proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"), username="admin",
                        password="admin-pw")  # fmt: skip
    direct = node.direct()
    verdicts = {"allowed": 0, "denied": 0}
    for user in PASSWORDS:
        for cmd in CLUSTER_COMMANDS:
            want = direct.execute_command("ACL", "DRYRUN", user, *cmd)
            assert admin.execute_command("ACL", "DRYRUN", user, *cmd) == want, (user, cmd)
            verdicts["allowed" if want == b"OK" else "denied"] += 1
            if want != b"OK" and cmd[:2] != ["CLUSTER", "RESET"]:  # the refusal itself, byte for byte
                via, straight = both(node, certs, user, [cmd])
                assert via == straight and b"-NOPERM" in via, (user, cmd, via, straight)
    print(f"\nACL DRYRUN through a sidecar = the node's own for {len(PASSWORDS)} users x {len(CLUSTER_COMMANDS)} "
          f"commands: {verdicts}")  # fmt: skip
    assert verdicts["allowed"] and verdicts["denied"]


def test_redirections_and_cluster_errors_pass_through_unchanged(cluster: list[ClusterNode], certs: Path) -> None:
    """-MOVED, -CROSSSLOT, a MOVED inside MULTI (EXECABORT), a NOPERM before the redirection, READONLY on a
    replica: byte for byte what the node sends a direct client."""
    first = primaries(cluster)[0]
    away = key_on(first, cluster, "cache:", other=True)
    here_a = key_on(first, cluster, "cache:a")
    here_b = next(k for i in range(100000) if key_slot((k := f"cache:b{i}").encode()) != key_slot(here_a.encode()))
    cases: list[list[list[str | bytes]]] = [
        [["GET", away]],
        [["MSET", here_a, "1", here_b, "2"]],
        [["MULTI"], ["SET", here_a, "1"], ["SET", away, "2"], ["EXEC"]],
        [["GET", "other:" + away]],
        [["CLUSTER", "KEYSLOT", away], ["CLUSTER", "COUNTKEYSINSLOT", str(key_slot(here_a.encode()))], ["ASKING"],
         ["READWRITE"]],
    ]  # fmt: skip
    for commands in cases:
        via, straight = both(first, certs, "cache", commands)
        assert via == straight, (commands, via, straight)
    moved = both(first, certs, "cache", [["GET", away]])[0].split(b"\r\n")[1]
    assert moved.startswith(b"-MOVED ") and moved.endswith(b":%d" % owner(cluster, away).proxy.tls_port)
    # READONLY on a replica: MOVED to its primary's sidecar before, the replica's copy after
    replica = next(n for n in cluster if n.role() == "slave")
    primary = next(n for n in cluster if n.id == replica_of(replica))
    key = key_on(primary, cluster, "cache:ro")
    primary.direct().set(key, "from-primary")
    assert primary.direct().execute_command("WAIT", "1", "5000") == 1
    via, straight = both(replica, certs, "cache", [["GET", key], ["READONLY"], ["GET", key]])
    assert via == straight and via.endswith(b"+OK\r\n$12\r\nfrom-primary\r\n") and b"-MOVED" in via, via
    print(f"\nrelayed unchanged through sidecars: {moved.decode()}, CROSSSLOT, MOVED in MULTI → EXECABORT, NOPERM "
          f"before MOVED; READONLY read on replica {replica.proxy.tls_port}")  # fmt: skip


def replica_of(replica: ClusterNode) -> str:
    """The id of the primary ``replica`` replicates."""
    nodes: bytes = replica.direct().execute_command("CLUSTER", "NODES")
    line = next(x for x in nodes.decode().splitlines() if "myself" in x)
    return line.split(" ")[3]


def test_redis_cluster_client_writes_every_slot(cluster: list[ClusterNode], certs: Path) -> None:
    keys = one_key_per_slot()
    rc = cluster_client(cluster[0], certs)
    try:
        pipe = rc.pipeline()
        for k in keys:
            pipe.set(k, k)
        assert all(pipe.execute())
        pipe = rc.pipeline()
        for k in keys:
            pipe.get(k)
        assert pipe.execute() == [k.encode() for k in keys]
    finally:
        rc.close()
    per_node = {n.proxy.tls_port: n.direct().dbsize() for n in primaries(cluster)}
    assert sum(per_node.values()) >= SLOTS and all(per_node.values())
    print(f"\nRedisCluster through sidecar {cluster[0].proxy.tls_port}: {len(keys)} keys, one per slot "
          f"({len(set(map(lambda k: key_slot(k.encode()), keys)))} slots), keys per primary {per_node}")


def test_redis_cli_follows_moved_through_sidecars(cluster: list[ClusterNode], certs: Path) -> None:
    entry = primaries(cluster)[0]
    key = key_on(entry, cluster, "cli:", other=True)
    target = owner(cluster, key)
    cli = ["redis-cli", "-c", "--tls", "--cacert", str(certs / "ca.pem"), "-h", "127.0.0.1", "-p", str(entry.proxy.tls_port),
           "--user", "app", "--pass", "app-pw", "--no-auth-warning"]  # fmt: skip
    out = subprocess.run([*cli, "SET", key, "via-cli"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out
    assert target.direct().get(key) == b"via-cli"
    got = subprocess.run([*cli, "GET", key], capture_output=True, text=True, timeout=30)
    assert got.stdout.strip().endswith("via-cli"), got
    print(f"\nredis-cli -c --tls via sidecar {entry.proxy.tls_port}: SET {key} followed MOVED to sidecar "
          f"{target.proxy.tls_port} ({out.stdout.strip().splitlines()[0]})")


def test_slot_migration_ask_during_moved_after(cluster: list[ClusterNode], certs: Path) -> None:
    """A slot moved by hand through the sidecars (CLUSTER SETSLOT, MIGRATE as admin): ASK while it moves
    (ASKING allowed), MOVED after; then redis-cli --cluster reshard on the cluster's own TLS ports; the
    RedisCluster client follows all of it."""
    k1, k2 = "{mig}1", "{mig}2"
    slot = key_slot(k1.encode())
    src = owners(cluster)[slot]
    dst = next(n for n in primaries(cluster) if n is not src)
    rc = cluster_client(cluster[0], certs)
    admin_login: list[str | bytes] = ["AUTH", "admin", "admin-pw"]
    ca = certs / "ca.pem"

    def migrate(*keys: str | bytes) -> bytes:  # MIGRATE run through the source's sidecar by an admin
        to = ["MIGRATE", "127.0.0.1", str(dst.tls_port), "", "0", "5000", "AUTH2", UPSTREAM_USER, UPSTREAM_PASSWORD]
        return exchange(src.proxy.tls_port, [admin_login, [*to, "KEYS", *keys]], ca)

    try:
        rc.set(k1, "one")
        rc.set(k2, "two")
        exchange(dst.proxy.tls_port, [admin_login, ["CLUSTER", "SETSLOT", str(slot), "IMPORTING", src.id]], ca)
        exchange(src.proxy.tls_port, [admin_login, ["CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst.id]], ca)
        assert migrate(k1) == b"+OK\r\n+OK\r\n"
        ask = b"-ASK %d 127.0.0.1:%d\r\n" % (slot, dst.proxy.tls_port)
        via, straight = both(src, certs, "app", [["GET", k1], ["GET", k2]])
        assert via == straight == b"+OK\r\n" + ask + b"$3\r\ntwo\r\n", via
        moved_back = b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, src.proxy.tls_port)
        via, straight = both(dst, certs, "app", [["GET", k1], ["ASKING"], ["GET", k1]])
        assert via == straight == b"+OK\r\n" + moved_back + b"+OK\r\n$3\r\none\r\n", via
        assert rc.get(k1) == b"one" and rc.get(k2) == b"two"  # redis-py follows the ASK (ASKING + GET)
        rest = src.direct().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)  # k2 and the earlier test's key
        assert k2.encode() in rest and migrate(*rest) == b"+OK\r\n+OK\r\n"
        for n in primaries(cluster):
            exchange(n.proxy.tls_port, [admin_login, ["CLUSTER", "SETSLOT", str(slot), "NODE", dst.id]], ca)
        moved = b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, dst.proxy.tls_port)
        via, straight = both(src, certs, "app", [["GET", k2]])
        assert via == straight == b"+OK\r\n" + moved, via
        assert rc.get(k1) == b"one" and rc.get(k2) == b"two"  # MOVED: the client refreshes its slot map
        # an operator's reshard on Redis's own TLS ports (not through redisguard); clients see MOVED after
        third = next(n for n in primaries(cluster) if n not in (src, dst))
        out = subprocess.run([*operator_cli(certs), "--cluster", "reshard", f"127.0.0.1:{src.tls_port}",
                              "--cluster-from", src.id, "--cluster-to", third.id, "--cluster-slots", "64", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        wait_healthy(cluster)
        keys = one_key_per_slot()
        assert rc.mget_nonatomic(keys) == [k.encode() for k in keys]
    finally:
        rc.close()
    print(f"\nslot {slot}: ASK {ask.decode().strip()} during, ASKING + GET at the target, MOVED after "
          f"({moved.decode().strip()}); reshard of 64 slots; RedisCluster read all {len(keys)} keys back")


def test_restricted_user_denied_on_every_node(cluster: list[ClusterNode], certs: Path) -> None:
    denials = 0
    for n in cluster:
        mine = key_on(owners(cluster)[0] if n.role() == "slave" else n, cluster, "other:")
        via, straight = both(n, certs, "cache", [["GET", mine], ["SET", mine, "x"], ["CLUSTER", "SETSLOT", "0", "STABLE"]])
        assert via == straight and via.count(b"-NOPERM") == 3, (n.proxy.tls_port, via)
        denials += 3
    via, straight = both(cluster[0], certs, "nocluster", [["CLUSTER", "SLOTS"]])
    assert via == straight == b"+OK\r\n-NOPERM this user has no permissions to run the 'cluster|slots' command\r\n"
    with pytest.raises(redis.exceptions.RedisClusterException, match="cannot be connected"):  # (redis-py's words)
        cluster_client(cluster[0], certs, user="nocluster")
    rc = cluster_client(cluster[1], certs, user="cache")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            rc.get("other:1")
        assert rc.set("cache:ok", "1") and rc.get("cache:ok") == b"1"
    finally:
        rc.close()
    print(f"\nuser 'cache' (~cache:*) denied {denials} times across {len(cluster)} sidecars, NOPERM = the node's own; "
          "'nocluster' (no cluster|slots) cannot start a RedisCluster client")


def test_failover_with_client_continuing(cluster: list[ClusterNode], certs: Path) -> None:
    keys = one_key_per_slot()
    rc = cluster_client(cluster[0], certs)
    try:
        replica = next(n for n in cluster if n.role() == "slave")
        old = next(n for n in cluster if n.id == replica_of(replica))
        out = exchange(replica.proxy.tls_port, [["AUTH", "admin", "admin-pw"], ["CLUSTER", "FAILOVER"]], certs / "ca.pem")
        assert out == b"+OK\r\n+OK\r\n", out
        deadline = time.monotonic() + 30
        while replica.role() != "master" or old.role() != "slave":
            assert time.monotonic() < deadline, "failover did not complete"
            time.sleep(0.1)
        wait_healthy(cluster)
        pipe = rc.pipeline()
        for k in keys:
            pipe.set(k, k + "-after")
        assert all(pipe.execute())
        assert rc.mget_nonatomic(keys) == [(k + "-after").encode() for k in keys]
    finally:
        rc.close()
    print(f"\nCLUSTER FAILOVER through sidecar {replica.proxy.tls_port}: it is primary, {old.proxy.tls_port} its "
          f"replica; the same RedisCluster client rewrote and read all {len(keys)} keys")


def _shards(data: bytes) -> list[dict[bytes, Any]]:
    """CLUSTER SHARDS after a HELLO reply, each shard and node as a dict (RESP2 pairs or RESP3 maps),
    replication offsets (which move on their own) left out."""
    reader = hiredis.Reader()
    reader.feed(data)
    reader.gets()  # HELLO's

    def as_dict(v: Any) -> dict[bytes, Any]:
        return v if isinstance(v, dict) else dict(zip(v[::2], v[1::2], strict=True))

    shards = [as_dict(s) for s in reader.gets()]
    for s in shards:
        s[b"nodes"] = [{k: v for k, v in as_dict(n).items() if k != b"replication-offset"} for n in s[b"nodes"]]
    return shards


@pytest.mark.parametrize("resp", [2, 3])
def test_cluster_shards_names_only_sidecars(cluster: list[ClusterNode], certs: Path, resp: int) -> None:
    """With tls-cluster, Redis's CLUSTER SHARDS gives each node's own TLS port as tls-port beside the
    sidecar's port: through the sidecar, tls-port is the sidecar's too; everything else is Redis's, in
    Redis's shapes (RESP2 arrays of pairs, RESP3 maps)."""
    node = primaries(cluster)[0]
    asked: list[list[str | bytes]] = [["HELLO", str(resp), "AUTH", "app", "app-pw"], ["CLUSTER", "SHARDS"]]
    via = exchange(node.proxy.tls_port, asked, ca=certs / "ca.pem")
    direct = exchange(node.redis.port, asked)
    want = _shards(direct)
    for s in want:
        for n in s[b"nodes"]:
            assert n[b"tls-port"] == next(c.tls_port for c in cluster if c.id.encode() == n[b"id"])  # Redis's own
            n[b"tls-port"] = n[b"port"]
    assert _shards(via) == want
    sidecars = {c.proxy.tls_port for c in cluster}
    assert {n[b"tls-port"] for s in want for n in s[b"nodes"]} == sidecars
    assert (b"%" in via) == (resp == 3)  # maps only in RESP3, as Redis sends them
    behind = {port for c in cluster for port in (c.tls_port, c.redis.port)}
    assert not any(v in behind for s in _shards(via) for n in s[b"nodes"] for v in n.values())


# Last: the announce port it sets back reaches the other nodes by gossip, a while later (CLUSTER SHARDS on
# another node would still name the changed one).
def test_check_config_and_audit_upstream_on_announce(cluster: list[ClusterNode], certs: Path, tmp_path: Path) -> None:
    node = cluster[-1]
    run = [sys.executable, "-m", "redisguard"]
    audit = subprocess.run([*run, "audit-upstream", "--json", "-c", str(node.proxy.config)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    checks = {c["id"]: c for c in json.loads(audit.stdout)["checks"]}
    assert checks["cluster-announce"]["status"] == "pass" and checks["cluster-links"]["status"] == "pass", checks
    # a sidecar config whose TLS port the node does not announce
    from tests.helpers import free_port

    ports = free_port(), free_port(), free_port()
    users = tmp_path / "users.acl"
    users.write_text(CLUSTER_USERS)
    cfg = proxy_config(tmp_path, certs, users, node.redis.port, *ports)
    res = subprocess.run([*run, "check-config", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res
    fix = f"cluster-announce-ip 127.0.0.1, cluster-announce-port {ports[0]}, cluster-announce-bus-port {node.bus_port}"
    assert f"announces 127.0.0.1:{node.proxy.tls_port}" in res.stderr and fix in res.stderr, res.stderr
    audit = subprocess.run([*run, "audit-upstream", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 1 and "FAIL     cluster-announce" in audit.stdout, audit.stdout
    print("\ncheck-config on a sidecar config the node does not announce:\n" + res.stderr.strip())
    # the fix the message gives, applied at run time: check-config is satisfied
    node.direct().config_set("cluster-announce-port", ports[0])
    try:
        res = subprocess.run([*run, "check-config", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    finally:
        node.direct().config_set("cluster-announce-port", node.proxy.tls_port)
    wait_healthy(cluster)
