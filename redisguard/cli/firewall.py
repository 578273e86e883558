"""``redisguard firewall``: host firewall rules that match the config.

Each TCP listener with ``allowed_sources`` gets its port opened to those networks only (the proxy
checks them too: the firewall drops the rest before a socket or a TLS handshake is spent on them), one
with ``proxy_protocol`` to its ``proxy_sources`` (the packets come from the load balancers);
the upstream Redis port, when Redis is on this host's loopback, is closed to everything that does not
arrive on ``lo``. The rules live in a table (nftables) or chain (iptables) of their own that only
drops, so they add to the host's other rules instead of replacing them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from redisguard.config.model import Config
from redisguard.config.parse import _is_loopback

TABLE = "redisguard"


@dataclass(frozen=True)
class PortRule:
    """Drop TCP to ``port`` unless from ``sources`` (v4 and v6 networks), or (``loopback_only``) not on lo."""

    comment: str
    port: int
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    loopback_only: bool = False


def plan(config: Config) -> tuple[list[PortRule], list[str]]:
    """The rules, and comments for what needs none (or cannot be done from this host)."""
    rules: list[PortRule] = []
    notes: list[str] = []
    for lst in config.listeners:
        what = f"listener {lst.name!r} ({lst.type} {lst.where})"
        if lst.type == "unix":
            notes.append(f"{what}: a unix socket, no network rule (socket_mode {lst.socket_mode:o} controls access)")
        elif _is_loopback(lst.host):
            notes.append(f"{what}: bound to loopback, unreachable from other hosts")
        elif lst.proxy_protocol:  # the kernel sees the load balancers; allowed_sources is checked on the PROXY header
            nets = tuple(n for n in lst.proxy_sources if not isinstance(n, str))
            rules.append(PortRule(f"{what}: only from proxy_sources (the load balancers; allowed_sources applies to "
                                  "the clients their PROXY headers name)", lst.port, nets))  # fmt: skip
        elif lst.allowed_sources:
            rules.append(PortRule(f"{what}: only from allowed_sources", lst.port, lst.allowed_sources))
        else:
            notes.append(f"{what}: open to any source (set allowed_sources to restrict it)")
    up = config.upstream
    if up.path:
        notes.append(f"upstream Redis {up.where}: a unix socket, no network rule")
    elif _is_loopback(up.host):
        rules.append(PortRule(f"upstream Redis {up.where}: loopback only", up.port, loopback_only=True))
    else:
        notes.append(f"upstream Redis {up.where} is on another host: on that host, allow its port from this host only")
    m = config.metrics
    if m.enabled and not _is_loopback(m.host):
        notes.append(f"metrics {m.host}:{m.port}: reachable from the network (allow it from your Prometheus only)")
    return rules, notes


def rules(config: Config, fmt: str) -> str:
    port_rules, notes = plan(config)
    head = [f"# redisguard firewall rules for {config.source or 'this config'} (redisguard firewall --format {fmt})",
            *(f"# {n}" for n in notes)]  # fmt: skip
    body = _nftables(port_rules) if fmt == "nftables" else _iptables(port_rules)
    return "\n".join(head + body) + "\n"


def _split(sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> dict[int, list[str]]:
    return {v: [str(s) for s in sources if s.version == v] for v in (4, 6)}


def _nftables(port_rules: list[PortRule]) -> list[str]:
    out = ["# load with: nft -f FILE (replaces only the inet redisguard table)",
           f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{", "  chain input {",
           "    type filter hook input priority filter - 1; policy accept;"]  # fmt: skip
    for r in port_rules:
        out.append(f"    # {r.comment}")
        if r.loopback_only:
            out.append(f'    iifname != "lo" tcp dport {r.port} drop')
            continue
        for version, nets in _split(r.sources).items():
            if nets:
                out.append(f"    ip{'' if version == 4 else '6'} saddr {{ {', '.join(nets)} }} tcp dport {r.port} accept")
        out.append(f"    tcp dport {r.port} drop")
    return [*out, "  }", "}"]


def _iptables(port_rules: list[PortRule]) -> list[str]:
    out = ["# run as a shell script (idempotent: the REDISGUARD chain is emptied and refilled)", "set -e"]
    for tool, version in (("iptables", 4), ("ip6tables", 6)):
        out += [f"{tool} -N REDISGUARD 2>/dev/null || {tool} -F REDISGUARD",
                f"{tool} -C INPUT -j REDISGUARD 2>/dev/null || {tool} -I INPUT -j REDISGUARD"]  # fmt: skip
        for r in port_rules:
            out.append(f"# {r.comment}")
            if r.loopback_only:
                out.append(f"{tool} -A REDISGUARD -p tcp --dport {r.port} ! -i lo -j DROP")
                continue
            for net in _split(r.sources)[version]:
                out.append(f"{tool} -A REDISGUARD -p tcp --dport {r.port} -s {net} -j RETURN")
            out.append(f"{tool} -A REDISGUARD -p tcp --dport {r.port} -j DROP")
    return out
