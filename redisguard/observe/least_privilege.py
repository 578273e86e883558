"""Least privilege from real traffic: `acl suggest`, `acl diff --against`, `acl test`.

* :func:`suggest_rules` — the tightest rules (in Redis's ACL language) that allow everything a user's
  profile recorded: each command (``+get``, ``+config|get``), each key pattern with the access seen
  (``%R~``, ``%W~``, ``~``), each channel (``&``), ``resetchannels`` when none.
* :func:`breakage` — which recorded (user, command, key pattern, channel) the rules of another users
  file would deny. A key pattern ``p*`` is checked with a representative key (``p`` followed by
  ``x``); a literal key as itself.
* :func:`run_tests` — expectations (user, command line, verdict) against a users file, as a runner.

All of it asks :func:`~redisguard.policy.decide.decide`, the proxy's own decision.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from redisguard.acl import User
from redisguard.acl.user import split_args
from redisguard.commands.getkeys import get_channels, get_keys
from redisguard.commands.table import READ, WRITE, Command, CommandTable
from redisguard.observe.profile import TrafficProfile, UserProfile, rule_safe
from redisguard.policy.decide import Policy, decide

# Verdict names of `acl test` files, from decide()'s reasons.
VERDICTS = {"": "allowed", "command": "denied-command", "key": "denied-key", "channel": "denied-channel",
            "unknown_command": "unknown", "disabled": "unknown", "arity": "arity", "noauth": "noauth",
            "protected": "protected"}  # fmt: skip


def suggest_rules(up: UserProfile) -> list[str]:
    rules = []
    for name in sorted(up.commands):
        if name not in ("auth", "hello"):  # no_auth commands: every user may run them
            rules.append("+" + name)
    # Redis refuses a pattern after ~* (or &*); what * allows already, no other pattern needs to say
    everywhere = up.keys.get(b"*", 0)
    for pattern, bits in sorted(up.keys.items()):
        if pattern == b"*" or bits & ~everywhere:
            prefix = {READ: "%R~", WRITE: "%W~"}.get(bits, "~")
            rules.append(prefix + _rule_text(pattern))
    rules.append("resetchannels")
    rules.extend("&" + _rule_text(c) for c in ([b"*"] if b"*" in up.channels else sorted(up.channels)))
    return rules


def suggest_file(profile: TrafficProfile, current: dict[str, User] | None) -> str:
    """A users file: each profiled user with the suggested rules; passwords and on/off are kept from the
    current users file when given (users only in the current file keep their line unchanged)."""
    lines = []
    names = sorted(set(profile.users) | set(current or {}))
    for name in names:
        user = (current or {}).get(name)
        up = profile.users.get(name)
        if up is None:
            assert user is not None
            lines.append(f"user {name} {user.describe()}")
            continue
        creds = _credentials(user) if user is not None else ["on"]
        lines.append(" ".join(["user", name, *creds, *suggest_rules(up)]))
    return "".join(line + "\n" for line in lines)


def _credentials(user: User) -> list[str]:
    out = ["on" if user.enabled else "off"]
    if user.nopass:
        out.append("nopass")
    return out + ["#" + h for h in user.passwords]


def unified_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), old_name, new_name))


@dataclass(frozen=True)
class Break:
    user: str
    what: str  # e.g. "get session:*", "subscribe &news"
    error: str


def breakage(profile: TrafficProfile, users: dict[str, User], table: CommandTable) -> list[Break]:
    """What the recorded traffic would be refused under ``users`` (a user missing or off counts too)."""
    policy = Policy(table, users)
    out: list[Break] = []
    for name, up in sorted(profile.users.items()):
        user = users.get(name)
        if user is None or not user.enabled:
            out.append(Break(name, "login", "the user is missing or off"))
            continue
        for cmd_name in sorted(up.commands):
            cmd = table.get(cmd_name)
            if cmd is None:
                continue
            argv = [part.encode() for part in cmd_name.split("|")]
            probes = _probes(cmd, argv, up)
            for what, probe in probes:
                v = decide(policy, user, probe, False, dry=True)
                if v.error is not None and v.reason in ("command", "key", "channel"):
                    out.append(Break(name, what, v.error.decode("utf-8", "replace").strip().lstrip("-")))
    return out


def _probes(cmd: Command, argv: list[bytes], up: UserProfile) -> list[tuple[str, list[bytes]]]:
    """Requests that stand for what was recorded: the command with a representative key for each
    recorded key pattern of the access the command needs (or no key), or each recorded channel."""
    base = list(argv)
    while len(base) < abs(cmd.arity):
        base.append(b"x")
    keys = get_keys(cmd, base)
    chans = get_channels(cmd, base)
    label = cmd.name.replace("|", " ")
    if chans:
        return [(f"{label} &{_rule_text(c)}", _with(base, chans[0][0], _sample(c))) for c in sorted(up.channels)] or [
            (label, base)]  # fmt: skip
    if not keys:
        return [(label, base)]
    idx = keys[0][0]
    return [(f"{label} {_rule_text(p)}", _with(base, idx, _sample(p))) for p in sorted(up.uses.get(cmd.name, ()))] or [
        (label, base)]  # fmt: skip


def _with(argv: list[bytes], idx: int, value: bytes) -> list[bytes]:
    out = list(argv)
    out[idx] = value
    return out


def _sample(pattern: bytes) -> bytes:
    """A key the pattern matches (the heuristic's patterns end in * or are escaped literals)."""
    out = bytearray()
    i = 0
    while i < len(pattern):
        c = pattern[i : i + 1]
        if c == b"\\" and i + 1 < len(pattern):
            out += pattern[i + 1 : i + 2]
            i += 2
            continue
        out += b"x" if c in (b"*", b"?") else c
        i += 1
    return bytes(out)


def _rule_text(b: bytes) -> str:
    """A recorded pattern as rule text: refused unless it is one plain token (the recorder only makes
    such patterns; anything else came from an edited file and could inject rules)."""
    if not rule_safe(b):
        raise ValueError(f"profile pattern {b!r} cannot be written as a rule (edited profile file?)")
    return b.decode("ascii")


# -- acl test -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    user: str
    command: str
    expect: str


def load_cases(path: Path) -> tuple[Path | None, list[Case]]:
    """A TOML file: optional ``users_file = "..."`` and ``[[case]]`` tables with user, command, expect."""
    data = tomllib.loads(path.read_text())
    users_file = data.get("users_file")
    cases = []
    for i, c in enumerate(data.get("case", [])):
        try:
            case = Case(str(c["user"]), str(c["command"]), str(c["expect"]))
        except KeyError as e:
            raise ValueError(f"{path}: case[{i}]: missing {e.args[0]!r} (user, command, expect)") from None
        if case.expect not in set(VERDICTS.values()):
            raise ValueError(f"{path}: case[{i}].expect: one of {', '.join(sorted(set(VERDICTS.values())))}")
        cases.append(case)
    if not cases:
        raise ValueError(f"{path}: no [[case]] tables")
    return ((path.parent / users_file) if users_file else None), cases


def run_tests(cases: list[Case], users: dict[str, User], table: CommandTable) -> list[tuple[Case, str, str]]:
    """Each case with the verdict it got and the error text (empty when allowed)."""
    policy = Policy(table, users)
    out = []
    for case in cases:
        user = users.get(case.user)
        if user is None:
            out.append((case, "no such user", ""))
            continue
        argv = [a.encode("utf-8", "surrogateescape") for a in split_args(case.command)]
        if not argv:
            out.append((case, "empty command", ""))
            continue
        v = decide(policy, user, argv, False)
        out.append((case, VERDICTS.get(v.reason, v.reason), (v.error or b"").decode("utf-8", "replace").strip()))
    return out
