"""The command table: names, arity, flags, ACL categories, key specs and subcommands.

Built from the upstream's ``COMMAND INFO`` reply at start-up, so new commands and modules need no
code; ``data/commands-7.0.json`` is a snapshot of Redis 7.0.15's reply for offline tools and as the
fallback when Redis is unreachable. Which arguments are keys and channels: :mod:`.getkeys`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from redisguard.commands.getkeys import _GETKEYS, _GETKEYS_NONE, CHANNEL_COMMANDS, _no_keys
from redisguard.commands.getkeys import get_channels as get_channels
from redisguard.commands.getkeys import get_keys as get_keys
from redisguard.commands.spec import READ as READ
from redisguard.commands.spec import WRITE as WRITE
from redisguard.commands.spec import Command as Command
from redisguard.commands.spec import KeySpec as KeySpec
from redisguard.protocol.resp import cstr


def _pairs(items: Sequence[Any] | dict[Any, Any]) -> dict[str, Any]:
    if isinstance(items, dict):  # a RESP3 map
        return {_s(k): v for k, v in items.items()}
    return {_s(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _key_spec(raw: Sequence[Any]) -> KeySpec:
    d = _pairs(raw)
    bs = _pairs(d["begin_search"])
    fk = _pairs(d["find_keys"])
    bspec = _pairs(bs.get("spec") or [])
    fspec = _pairs(fk.get("spec") or [])
    kw = bspec.get("keyword", b"")
    return KeySpec(
        flags=frozenset(_s(f).lower() for f in d.get("flags", [])),
        bs_type=_s(bs["type"]),
        bs_index=int(bspec.get("index", 0)),
        bs_keyword=kw.encode() if isinstance(kw, str) else kw,
        bs_startfrom=int(bspec.get("startfrom", 0)),
        fk_type=_s(fk["type"]),
        lastkey=int(fspec.get("lastkey", 0)),
        keystep=int(fspec.get("keystep", 1)),
        limit=int(fspec.get("limit", 0)),
        keynumidx=int(fspec.get("keynumidx", 0)),
        firstkey=int(fspec.get("firstkey", 0)),
    )


class ACLIndex:
    """What ACL rules need from a table, computed once with it and read-only after (thread-safe).

    Names are sets (a selector keeps its command bits as a set of names, see ``acl.user``) and bit
    masks: bit ``i`` is ``names[i]``, in :meth:`CommandTable.all_commands` order (each container
    right before its subcommands), so counting a category in a selector is ``(mask & m).bit_count()``.
    """

    def __init__(self, table: CommandTable) -> None:
        cmds = table.all_commands()
        self.names: tuple[str, ...] = tuple(c.name for c in cmds)
        self.bit: dict[str, int] = {c.name: 1 << i for i, c in enumerate(cmds)}
        self.index: dict[str, int] = {c.name: i for i, c in enumerate(cmds)}
        self.all_names: frozenset[str] = frozenset(self.names)
        self.all_mask: int = (1 << len(cmds)) - 1
        # A command and everything +cmd / -cmd changes with it: the command and its subcommands.
        self.family: dict[str, frozenset[str]] = {
            c.name: frozenset([c.name, *(s.name for s in c.subcommands.values())]) for c in cmds
        }
        self.family_mask: dict[str, int] = {n: self.mask(f) for n, f in self.family.items()}
        # The top-level command each bit belongs to (itself for a top-level command).
        self.top: tuple[str, ...] = tuple((c.parent or c).name for c in cmds)
        # Per category: the commands and subcommands in it (what ACL counts), and what +@cat / -@cat
        # changes (each member's family: a container in the category carries all its subcommands).
        self.members: dict[str, frozenset[str]] = {}
        self.closure: dict[str, frozenset[str]] = {}
        for cat in table.categories:
            members = [c.name for c in cmds if cat in c.categories]
            self.members[cat] = frozenset(members)
            self.closure[cat] = frozenset(n for m in members for n in self.family[m])
        self.members_mask: dict[str, int] = {c: self.mask(m) for c, m in self.members.items()}
        self.members_count: dict[str, int] = {c: len(m) for c, m in self.members.items()}
        self.closure_mask: dict[str, int] = {c: self.mask(m) for c, m in self.closure.items()}

    def mask(self, names: Iterable[str]) -> int:
        """The bit mask of some command names (all in the table)."""
        bit = self.bit
        m = 0
        for n in names:
            m |= bit[n]
        return m

    def mask_of(self, names: set[str] | frozenset[str]) -> int:
        """:meth:`mask` that walks whichever is shorter: the names or the ones missing from them."""
        if len(names) * 2 <= len(self.names):
            return self.mask(names)
        return self.all_mask ^ self.mask(self.all_names - names)


class CommandTable:
    """Lookup and key extraction for one Redis version's commands."""

    def __init__(self, command_info: Sequence[Any], categories: Sequence[str], redis_version: str):
        self.redis_version = redis_version
        self.commands: dict[str, Command] = {}
        self.categories = tuple(c.lower() for c in categories)
        for raw in command_info:
            if raw is None:
                continue
            cmd = self._build(raw, None)
            self.commands[cmd.name] = cmd
        self.acl = ACLIndex(self)

    def _build(self, raw: Sequence[Any], parent: Command | None) -> Command:
        name = _s(raw[0]).lower()
        cmd = Command(
            name=name,
            arity=int(raw[1]),
            flags=frozenset(_s(f).lower() for f in raw[2]),
            categories=frozenset(_s(c).lower().lstrip("@") for c in raw[6]),
            key_specs=tuple(_key_spec(ks) for ks in (raw[8] if len(raw) > 8 else [])),
            parent=parent,
        )
        for sub in raw[9] if len(raw) > 9 else []:
            sc = self._build(sub, cmd)
            cmd.subcommands[sc.name.split("|", 1)[1]] = sc
        cmd.getkeys = _GETKEYS.get(name) or (_no_keys if name in _GETKEYS_NONE else None)
        cmd.has_keys = cmd.getkeys is not None or any("not_key" not in ks.flags for ks in cmd.key_specs)
        cmd.spec_keys = any("not_key" not in ks.flags for ks in cmd.key_specs) and not any(
            "variable_flags" in ks.flags for ks in cmd.key_specs)  # fmt: skip
        cmd.channels = CHANNEL_COMMANDS.get(name)
        return cmd

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommandTable:
        return cls(data["command_info"], data["categories"], data.get("redis_version", "unknown"))

    @classmethod
    def snapshot(cls) -> CommandTable:
        """Redis 7.0.15's table, shipped with redisguard."""
        text = (Path(__file__).parent / "data" / "commands-7.0.json").read_text()
        return cls.from_json(json.loads(text))

    def all_commands(self) -> list[Command]:
        """Every command and subcommand, containers before their subcommands."""
        out: list[Command] = []
        for cmd in self.commands.values():
            out.append(cmd)
            out.extend(cmd.subcommands.values())
        return out

    def lookup(self, argv: Sequence[bytes]) -> Command | None:
        """Redis's lookupCommand: a container with argc >= 2 resolves to its subcommand. Names compare
        case-insensitively in ASCII only, as Redis's dict does (no Unicode folding: "\u212aEYS" is not KEYS)."""
        cmd = self.commands.get(argv[0].lower().decode("latin-1"))
        if cmd is None or not cmd.subcommands or len(argv) < 2:
            return cmd
        return cmd.subcommands.get(argv[1].lower().decode("latin-1"))

    def get(self, name: str) -> Command | None:
        """By ACL name: "get" or "config|set"."""
        base, _, sub = name.lower().partition("|")
        cmd = self.commands.get(base)
        if cmd is None or not sub:
            return cmd
        return cmd.subcommands.get(sub)

    def unknown_error(self, argv: Sequence[bytes]) -> bytes:
        """The error Redis gives for an unknown command or subcommand (commandCheckExistence)."""
        container = self.commands.get(argv[0].lower().decode("latin-1"))
        if container is not None and container.subcommands and len(argv) >= 2:
            msg = b"unknown subcommand '%s'. Try %s HELP." % (cstr(argv[1], 128), container.name.upper().encode())
            return b"-ERR " + msg.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"
        return unknown_command_error(argv)

    @staticmethod
    def arity_error(cmd: Command, argc: int) -> bytes | None:
        if (cmd.arity > 0 and cmd.arity != argc) or argc < -cmd.arity:
            return b"-ERR wrong number of arguments for '%s' command\r\n" % cmd.name.encode()
        return None


def unknown_command_error(argv: Sequence[bytes]) -> bytes:
    """commandCheckExistence's text for a command Redis does not know, byte for byte (bytes, not
    characters, are truncated; a NUL ends an argument; CR and LF become spaces)."""
    args = b""
    for a in argv[1:]:
        if len(args) >= 128:
            break
        args += b"'%s' " % cstr(a, 128 - len(args))
    msg = b"unknown command '%s', with args beginning with: %s" % (cstr(argv[0], 128), args)
    return b"-ERR " + msg.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"
