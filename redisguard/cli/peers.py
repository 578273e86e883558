"""``check-config --peer HOST:PORT``: is this config's policy the one its peers enforce?

Sidecars of one Redis Cluster must enforce one policy: one with another users file lets a user do in its
nodes' slots what the others refuse. Each sidecar publishes the digest of the policy in force as
``redisguard_policy_info{digest}`` on its metrics endpoint; this reads the peers' and compares them with
the digest of what this config would load (:meth:`~redisguard.policy.decide.Policy.digest`). The metrics
endpoint is what Prometheus already reaches, needs no credentials and says what the peer *enforces*
(after its reloads and ACL SETUSERs), not what a file on its disk says.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

from redisguard.acl import ACLReplies, load_users
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.policy.decide import Policy

PEER_TIMEOUT = 5.0
MAX_SCRAPE = 64 * 1024 * 1024  # a peer's /metrics read at most this far
_INFO = re.compile(r'^redisguard_policy_info\{(?:[^}]*,)?digest="([^"]*)"[^}]*\} 1(?:\.0)?$', re.M)


def config_digest(config: Config) -> str:
    """The digest the proxy would publish right after loading this config (UsersFileError if it cannot)."""
    table = CommandTable.snapshot()
    users = load_users(config.acl.users_file, table)
    policy = Policy(table, users, frozenset(config.acl.disabled_commands), audit_all=config.acl.mode == "audit")
    return policy.digest(ACLReplies(users).acl_list())


def peer_digests(peer: str) -> set[str]:
    """The digests ``peer`` (HOST:PORT of its metrics endpoint) publishes (OSError, ValueError if none)."""
    url = peer if "://" in peer else f"http://{peer}/metrics"
    with urllib.request.urlopen(url, timeout=PEER_TIMEOUT) as r:
        text = r.read(MAX_SCRAPE).decode("utf-8", "replace")
    found = set(_INFO.findall(text))
    if not found:
        raise ValueError("no redisguard_policy_info in its metrics (not a redisguard, or one older than this)")
    return found


def compare(digest: str, peers: list[str]) -> tuple[list[str], list[str]]:
    """(errors, notes): one line per peer, its digests against ours."""
    errors, notes = [], []
    for peer in peers:
        try:
            theirs = peer_digests(peer)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            errors.append(f"peer {peer}: unreachable or unreadable: {reason}")
            continue
        if theirs == {digest}:
            notes.append(f"peer {peer}: same policy ({digest})")
        else:
            errors.append(f"peer {peer}: different policy: it enforces {', '.join(sorted(theirs))}, this config "
                          f"{digest} (compare the users files, [acl] disabled_commands and mode; an ACL SETUSER made "
                          "through one sidecar changes only that one)")  # fmt: skip
    return errors, notes
