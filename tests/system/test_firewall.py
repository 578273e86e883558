"""``redisguard firewall``: the rules follow the listeners' allowed_sources and keep Redis on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from redisguard.cli.firewall import rules
from redisguard.config.load import load_config

CONFIG = """
[[listener]]
name = "tls"
type = "tls"
address = "0.0.0.0:6380"
cert_file = "server.pem"
key_file = "server.key"
allowed_sources = ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32"]
[[listener]]
name = "open"
type = "tls"
address = "0.0.0.0:6390"
cert_file = "server.pem"
key_file = "server.key"
[[listener]]
name = "local"
type = "tcp"
address = "127.0.0.1:6381"
[[listener]]
name = "socket"
type = "unix"
path = "/run/redisguard/redis.sock"
[upstream]
address = "127.0.0.1:6379"
[acl]
users_file = "users.acl"
[metrics]
address = "0.0.0.0:9187"
"""

NOTES = """\
# listener 'open' (tls 0.0.0.0:6390): open to any source (set allowed_sources to restrict it)
# listener 'local' (tcp 127.0.0.1:6381): bound to loopback, unreachable from other hosts
# listener 'socket' (unix /run/redisguard/redis.sock): a unix socket, no network rule (socket_mode 660 controls access)
# metrics 0.0.0.0:9187: reachable from the network (allow it from your Prometheus only)
"""


def config(tmp_path: Path, text: str = CONFIG) -> Path:
    p = tmp_path / "rg.toml"
    p.write_text(text)
    return p


def test_nftables(tmp_path: Path) -> None:
    p = config(tmp_path)
    assert rules(load_config(p), "nftables") == f"""\
# redisguard firewall rules for {p} (redisguard firewall --format nftables)
{NOTES}# load with: nft -f FILE (replaces only the inet redisguard table)
table inet redisguard
delete table inet redisguard
table inet redisguard {{
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    # listener 'tls' (tls 0.0.0.0:6380): only from allowed_sources
    ip saddr {{ 10.0.0.0/8, 192.168.1.0/24 }} tcp dport 6380 accept
    ip6 saddr {{ 2001:db8::/32 }} tcp dport 6380 accept
    tcp dport 6380 drop
    # upstream Redis 127.0.0.1:6379: loopback only
    iifname != "lo" tcp dport 6379 drop
  }}
}}
"""


def test_iptables(tmp_path: Path) -> None:
    p = config(tmp_path)
    out = rules(load_config(p), "iptables")
    assert out.startswith(f"# redisguard firewall rules for {p} (redisguard firewall --format iptables)\n{NOTES}")
    body = out.split(NOTES)[1]
    v4 = """\
iptables -N REDISGUARD 2>/dev/null || iptables -F REDISGUARD
iptables -C INPUT -j REDISGUARD 2>/dev/null || iptables -I INPUT -j REDISGUARD
# listener 'tls' (tls 0.0.0.0:6380): only from allowed_sources
iptables -A REDISGUARD -p tcp --dport 6380 -s 10.0.0.0/8 -j RETURN
iptables -A REDISGUARD -p tcp --dport 6380 -s 192.168.1.0/24 -j RETURN
iptables -A REDISGUARD -p tcp --dport 6380 -j DROP
# upstream Redis 127.0.0.1:6379: loopback only
iptables -A REDISGUARD -p tcp --dport 6379 ! -i lo -j DROP
"""
    v6 = v4.replace("iptables", "ip6tables").replace(
        "ip6tables -A REDISGUARD -p tcp --dport 6380 -s 10.0.0.0/8 -j RETURN\n"
        "ip6tables -A REDISGUARD -p tcp --dport 6380 -s 192.168.1.0/24 -j RETURN\n",
        "ip6tables -A REDISGUARD -p tcp --dport 6380 -s 2001:db8::/32 -j RETURN\n",
    )
    assert body == "# run as a shell script (idempotent: the REDISGUARD chain is emptied and refilled)\nset -e\n" + v4 + v6
    # the output is a valid shell script
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_unix_or_remote_upstream_and_the_cli(tmp_path: Path) -> None:
    unix = CONFIG.replace('address = "127.0.0.1:6379"', 'path = "/run/redis/redis.sock"')
    out = rules(load_config(config(tmp_path, unix)), "nftables")
    assert "# upstream Redis unix:/run/redis/redis.sock: a unix socket, no network rule\n" in out and "6379" not in out
    remote = CONFIG.replace('address = "127.0.0.1:6379"', 'address = "10.9.8.7:6379"')
    out = rules(load_config(config(tmp_path, remote)), "iptables")
    assert "# upstream Redis 10.9.8.7:6379 is on another host: on that host, allow its port from this host only\n" in out
    assert "--dport 6379" not in out
    res = subprocess.run([sys.executable, "-m", "redisguard", "firewall", "--format", "iptables", "-c",
                          str(config(tmp_path))], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and res.stdout == rules(load_config(config(tmp_path)), "iptables")


def test_proxy_protocol_listener_opens_to_its_load_balancers(tmp_path: Path) -> None:
    (tmp_path / "users.acl").write_text("user default off\n")
    cfg = tmp_path / "rg.toml"
    cfg.write_text('[[listener]]\nname = "lb"\ntype = "tls"\naddress = "0.0.0.0:6380"\ncert_file = "s.pem"\nkey_file = "s.key"\n'
                   'proxy_protocol = true\nproxy_sources = ["10.1.0.0/24"]\nallowed_sources = ["203.0.113.0/24"]\n'
                   '[acl]\nusers_file = "users.acl"\n')  # fmt: skip
    out = rules(load_config(cfg), "nftables")
    assert "ip saddr { 10.1.0.0/24 } tcp dport 6380 accept" in out  # the kernel sees the balancers...
    assert "203.0.113.0/24" not in out  # ...and the proxy checks the clients' addresses from their headers
