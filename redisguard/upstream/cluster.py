"""Redis Cluster with one redisguard sidecar per node: is this node announcing its sidecar?

Theory of operation
-------------------
redisguard does no sharding of its own. Each Redis node sits behind its own redisguard and
*announces the sidecar's address* (``cluster-announce-ip``, ``cluster-announce-port`` = redisguard's
TLS port), so everything Redis tells clients about the cluster — CLUSTER SLOTS / SHARDS / NODES and
the ``-MOVED`` / ``-ASK`` redirections — already names redisguard listeners, and the proxy relays
those replies unchanged (but CLUSTER SHARDS's ``tls-port``, Redis's own with tls-cluster: the session
makes it the sidecar's ``port``, see session/clients.py). Policy needs nothing special either: CLUSTER
subcommands, ASKING, READONLY and READWRITE carry their ACL categories in COMMAND INFO like any command, and every command's keys
hash to one slot, so the per-key check is the same as on a single Redis.

What must be right is the node's configuration, and that is what this module checks (for
``check-config`` and ``audit-upstream``), asking the upstream over the proxy's own kind of connection
(plain TCP or a unix socket) so it sees what proxied clients see:

- ``cluster-announce``: the ``myself`` entry of CLUSTER NODES must be a TLS listener of this config.
  Otherwise clients are redirected past redisguard (to Redis itself, or nowhere).
- ``cluster-links``: the cluster bus, replication and MIGRATE go node to node, not through redisguard.
  With ``tls-cluster no`` they are plaintext, and a replica connects to its primary's *announced*
  address — the sidecar — which cannot carry replication. With ``tls-cluster yes`` (and
  ``tls-replication yes``) Redis announces ``cluster-announce-tls-port`` to TLS peers (replicas, other
  nodes, operators' redis-cli) and ``cluster-announce-port`` to plaintext clients (redisguard).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any

import hiredis

from redisguard.config.model import Config
from redisguard.upstream.client import upstream_replies

PASS, WARN, FAIL, UNKNOWN = "pass", "warn", "fail", "unknown"
WILDCARD = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES: ``<id> <ip:port@cport[,hostname]> <flags> <master> ...``."""

    id: str
    ip: str
    port: int
    bus_port: int
    hostname: str
    flags: frozenset[str]

    @property
    def address(self) -> str:
        """``ip:port``; a node that has met no other node does not know its IP yet (``?:port``)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip or '?'}:{self.port}"


@dataclass(frozen=True)
class Finding:
    id: str
    status: str
    detail: str
    fix: str = ""


def parse_nodes(text: str) -> list[Node]:
    """CLUSTER NODES as Redis 7 prints it (lines that do not parse are skipped)."""
    nodes = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 8:
            continue
        addr, _, hostname = parts[1].partition(",")
        hostport, _, cport = addr.partition("@")
        ip, _, port = hostport.rpartition(":")
        try:
            nodes.append(Node(parts[0], ip.strip("[]"), int(port), int(cport or 0), hostname,
                              frozenset(parts[2].split(","))))  # fmt: skip
        except ValueError:
            continue
    return nodes


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _info_field(info: str, name: str) -> str:
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(name + ":")), "")


def _config(reply: Any) -> str | None:
    return _text(reply[1]) if isinstance(reply, list) and len(reply) == 2 else None


def _same_host(listener_host: str, ip: str) -> bool:
    if listener_host in WILDCARD:
        return True  # listening everywhere: any address of this host can be the announced one
    try:
        return ipaddress.ip_address(listener_host) == ipaddress.ip_address(ip)
    except ValueError:
        return listener_host == ip  # a name in the config: only the same name matches


def announce_finding(config: Config, me: Node) -> Finding:
    """Does the node announce (to plaintext clients: redisguard's upstream link) a TLS listener of ours?"""
    tls = [lst for lst in config.listeners if lst.type == "tls"]
    if not tls:
        return Finding("cluster-announce", FAIL, f"the upstream is a Redis Cluster node announcing {me.address}, and this "
                       "config has no TLS listener for clients to be redirected to",
                       "add a [[listener]] type = \"tls\" and announce its port (cluster-announce-port)")  # fmt: skip
    for lst in tls:
        if lst.port == me.port and _same_host(lst.host, me.ip):
            return Finding("cluster-announce", PASS, f"Redis Cluster node {me.id[:8]} announces {me.address}: listener "
                           f"{lst.name!r} ({lst.where}), so CLUSTER SLOTS and MOVED/ASK lead clients to redisguard")  # fmt: skip
    lst = tls[0]
    ip = (me.ip or "<this host's address>") if lst.host in WILDCARD else lst.host
    settings = [f"cluster-announce-ip {ip}", f"cluster-announce-port {lst.port}"]
    if me.bus_port:
        settings.append(f"cluster-announce-bus-port {me.bus_port}")
    if lst.host in WILDCARD:
        where = f"{lst.name!r} (port {lst.port} on every interface)"
        ip_note = f" (cluster-announce-ip: the address clients reach this host at; {me.ip or 'not known yet'} now)"
    else:
        where, ip_note = f"{lst.name!r} ({lst.where})", ""
    return Finding(
        "cluster-announce", FAIL,
        f"Redis Cluster node {me.id[:8]} announces {me.address} — the address CLUSTER SLOTS/SHARDS/NODES and "
        f"MOVED/ASK give clients — which is not this redisguard's TLS listener {where}: clients would be "
        "redirected past redisguard",
        f"in redis.conf: {', '.join(settings)}{ip_note}; CONFIG SET cluster-announce-port {lst.port} applies it "
        "at once (then CONFIG REWRITE)",
    )  # fmt: skip


def links_finding(tls_cluster: str | None, tls_replication: str | None, me: Node) -> Finding:
    """The node-to-node links redisguard does not carry: bus, replication, MIGRATE."""
    if tls_cluster is None:
        return Finding("cluster-links", UNKNOWN, "cannot read tls-cluster (the upstream user may not run CONFIG GET)",
                       "check by hand: tls-cluster yes, tls-replication yes, cluster-announce-tls-port")  # fmt: skip
    fix = ("tls-port <port>, tls-cluster yes, tls-replication yes, cluster-announce-tls-port <that tls-port> "
           "(mutual TLS with a CA of the cluster's own: tls-ca-cert-file, tls-auth-clients yes), "
           "masteruser/masterauth for replicas; keep that port on a private network")  # fmt: skip
    if tls_cluster != "yes":
        return Finding("cluster-links", WARN, "tls-cluster is no: the cluster bus, replication and MIGRATE between "
                       "nodes are plaintext and do not pass redisguard, and replicas connect to their primary's "
                       f"announced address ({me.address}, a redisguard listener), which cannot carry replication",
                       fix)  # fmt: skip
    if tls_replication != "yes":
        return Finding("cluster-links", WARN, "tls-cluster is yes but tls-replication is no: replicas connect to "
                       "their primary's TLS port without TLS", "tls-replication yes")  # fmt: skip
    return Finding("cluster-links", PASS, "tls-cluster and tls-replication are yes: bus, replication and MIGRATE use "
                   "Redis's own TLS port (cluster-announce-tls-port), not redisguard")  # fmt: skip


QUERIES = (["INFO", "cluster"], ["CLUSTER", "NODES"], ["CONFIG", "GET", "tls-cluster"],
           ["CONFIG", "GET", "tls-replication"])  # fmt: skip


def findings(config: Config, replies: list[Any]) -> list[Finding]:
    """The cluster items from the replies to QUERIES; [] if the upstream is not a cluster node."""
    info, nodes, tls_cluster, tls_replication = replies
    if isinstance(info, hiredis.ReplyError) or _info_field(_text(info), "cluster_enabled") != "1":
        return []
    if isinstance(nodes, hiredis.ReplyError):
        return [Finding("cluster-announce", UNKNOWN, f"the upstream is a Redis Cluster node, but CLUSTER NODES was "
                        f"refused ({_text(str(nodes)).split(' ', 1)[0]})",
                        "grant the upstream user +cluster|nodes (clients need +cluster|slots/shards/nodes too)")]  # fmt: skip
    me = next((n for n in parse_nodes(_text(nodes)) if "myself" in n.flags), None)
    if me is None:
        return [Finding("cluster-announce", UNKNOWN, "the upstream is a Redis Cluster node, but CLUSTER NODES has no "
                        "'myself' entry")]  # fmt: skip
    return [announce_finding(config, me), links_finding(_config(tls_cluster), _config(tls_replication), me)]


async def inspect(config: Config) -> list[Finding]:
    """Ask the upstream (as the service user, over the proxy's own kind of connection)."""
    replies = await upstream_replies(config, [[a.encode() for a in q] for q in QUERIES], config.upstream.connect_timeout * 5)
    return findings(config, replies)


def config_check(config: Config) -> tuple[list[str], list[str]]:
    """For check-config: (errors, warnings) about a cluster upstream; nothing if Redis cannot be reached
    (check-config works on a host where Redis is not up yet) or is not a cluster node."""
    import asyncio

    try:
        found = asyncio.run(inspect(config))
    except (TimeoutError, OSError, ConnectionError, ssl.SSLError):
        return [], []
    errors = [f"upstream: {f.detail}; fix: {f.fix}" for f in found if f.status == FAIL]
    warnings = [f"upstream: {f.detail}; fix: {f.fix}" for f in found if f.status == WARN]
    return errors, warnings
