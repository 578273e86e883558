"""The command table: names, arity, flags, ACL categories, key specs and subcommands.

Built from the upstream's ``COMMAND INFO`` reply at start-up, so new commands and modules need no
code; ``data/commands-7.0.json`` is a snapshot of Redis 7.0.15's reply for offline tools and as the
fallback when Redis is unreachable. Key extraction follows Redis 7.0's ``getKeysFromCommandWithSpecs``
(db.c): key specs first, and Redis's hand-written getkeys functions where specs are not enough
(variable flags, invalid or incomplete specs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .request import string2ll

# Key-spec access flags that make a key need read / write permission (acl.c ACLSelectorCheckKey).
READ = 1
WRITE = 2

# Channel arguments per command (db.c commands_with_channels): (first, count or -1 for all, pattern).
CHANNEL_COMMANDS: dict[str, tuple[int, int, bool]] = {
    "subscribe": (1, -1, False),
    "ssubscribe": (1, -1, False),
    "psubscribe": (1, -1, True),
    "publish": (1, 1, False),
    "spublish": (1, 1, False),
}


@dataclass(frozen=True, slots=True)
class KeySpec:
    flags: frozenset[str]
    bs_type: str  # "index" | "keyword" | "unknown"
    bs_index: int = 0
    bs_keyword: bytes = b""
    bs_startfrom: int = 0
    fk_type: str = "unknown"  # "range" | "keynum" | "unknown"
    lastkey: int = 0
    keystep: int = 1
    limit: int = 0
    keynumidx: int = 0
    firstkey: int = 0

    @property
    def access(self) -> int:
        f = self.flags
        need = READ if "access" in f else 0
        if "insert" in f or "delete" in f or "update" in f:
            need |= WRITE
        return need


@dataclass(eq=False, slots=True)
class Command:
    name: str  # lowercase; "config|set" for a subcommand
    arity: int
    flags: frozenset[str]
    categories: frozenset[str]  # without the leading '@'
    key_specs: tuple[KeySpec, ...]
    subcommands: dict[str, Command] = field(default_factory=dict)
    parent: Command | None = None
    has_keys: bool = False
    getkeys: Callable[[Sequence[bytes]], list[tuple[int, int]]] | None = None
    channels: tuple[int, int, bool] | None = None

    @property
    def no_auth(self) -> bool:
        return "no_auth" in self.flags


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


# --------------------------------------------------------------------------------------------------
# Redis's hand-written getkeys functions (db.c), used where key specs do not tell the whole story.
# Each returns [(argv index, READ|WRITE needed)].

_RO = READ
_RW = READ | WRITE


def _sort_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    keys = [(1, _RO)]
    store: tuple[int, int] | None = None
    skips = {b"limit": 2, b"get": 1, b"by": 1}
    i = 2
    while i < len(argv):
        arg = argv[i].lower()
        if arg in skips:
            i += skips[arg]
        elif arg == b"store" and i + 1 < len(argv):
            store = (i + 1, WRITE)
        i += 1
    return keys + [store] if store else keys


def _sort_ro_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    return [(1, _RO)]


def _migrate_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    first, num = 3, 1
    if len(argv) > 6:
        i = 6
        while i < len(argv):
            arg = argv[i].lower()
            if arg == b"auth":
                i += 1
            elif arg == b"auth2":
                i += 2
            elif arg == b"keys":
                if argv[3]:
                    return []
                first, num = i + 1, len(argv) - i - 1
                break
            i += 1
    return [(first + j, _RW) for j in range(num)]


def _set_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    for arg in argv[3:]:
        if arg.lower() == b"get":
            return [(1, _RW)]
    return [(1, WRITE)]


def _bitfield_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    readonly = True
    i, argc = 2, len(argv)
    while i < argc:
        rem = argc - i - 1
        arg = argv[i].lower()
        if arg == b"get" and rem >= 2:
            i += 2
        elif arg in (b"set", b"incrby") and rem >= 3:
            readonly = False
            break
        elif arg == b"overflow" and rem >= 1:
            i += 1
        else:
            readonly = False
            break
        i += 1
    return [(1, _RO if readonly else _RW)]


def _no_keys(argv: Sequence[bytes]) -> list[tuple[int, int]]:
    # genericGetKeys & co. return no keys for the malformed input that made the spec invalid;
    # the command then fails with a syntax error in Redis.
    return []


_GETKEYS: dict[str, Callable[[Sequence[bytes]], list[tuple[int, int]]]] = {
    "sort": _sort_keys,
    "sort_ro": _sort_ro_keys,
    "migrate": _migrate_keys,
    "set": _set_keys,
    "bitfield": _bitfield_keys,
}
# Commands with a getkeys_proc whose specs are complete: only reached with invalid input.
_GETKEYS_NONE = [
    "zunion",
    "zinter",
    "zdiff",
    "zunionstore",
    "zinterstore",
    "zdiffstore",
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
    "georadius",
    "georadiusbymember",
    "xread",
    "xreadgroup",
    "lmpop",
    "blmpop",
    "zmpop",
    "bzmpop",
    "sintercard",
    "zintercard",
    "memory|usage",
]


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
            msg = b"unknown subcommand '%s'. Try %s HELP." % (_cstr(argv[1], 128), container.name.upper().encode())
            return b"-ERR " + msg.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"
        return unknown_command_error(argv)

    @staticmethod
    def arity_error(cmd: Command, argc: int) -> bytes | None:
        if (cmd.arity > 0 and cmd.arity != argc) or argc < -cmd.arity:
            return b"-ERR wrong number of arguments for '%s' command\r\n" % cmd.name.encode()
        return None


def _cstr(arg: bytes, limit: int) -> bytes:
    """printf's ``%.*s``: at most ``limit`` bytes, ending at a NUL."""
    nul = arg.find(b"\0", 0, limit)
    return arg[: nul if nul >= 0 else limit]


def unknown_command_error(argv: Sequence[bytes]) -> bytes:
    """commandCheckExistence's text for a command Redis does not know, byte for byte (bytes, not
    characters, are truncated; a NUL ends an argument; CR and LF become spaces)."""
    args = b""
    for a in argv[1:]:
        if len(args) >= 128:
            break
        args += b"'%s' " % _cstr(a, 128 - len(args))
    msg = b"unknown command '%s', with args beginning with: %s" % (_cstr(argv[0], 128), args)
    return b"-ERR " + msg.replace(b"\r", b" ").replace(b"\n", b" ") + b"\r\n"


def get_keys(cmd: Command, argv: Sequence[bytes]) -> list[tuple[int, int]]:
    """[(argv index, READ|WRITE needed)] for the keys ``argv`` touches, as Redis 7.0 finds them."""
    specs = cmd.key_specs
    has_keyspec = any("not_key" not in ks.flags for ks in specs)
    has_varflags = any("variable_flags" in ks.flags for ks in specs)
    if has_keyspec and not has_varflags:
        keys = _keys_from_specs(specs, argv, cmd.arity)
        if keys is not None:
            return keys
    if cmd.getkeys is not None:
        return cmd.getkeys(argv)
    return []


def _keys_from_specs(specs: Sequence[KeySpec], argv: Sequence[bytes], arity: int) -> list[tuple[int, int]] | None:
    """db.c getKeysUsingKeySpecs; None where Redis would fall back to the getkeys function."""
    argc = len(argv)
    out: list[tuple[int, int]] = []
    for spec in specs:
        if "not_key" in spec.flags:
            continue
        if spec.bs_type == "index":
            first = spec.bs_index
        elif spec.bs_type == "keyword":
            start = spec.bs_startfrom if spec.bs_startfrom > 0 else argc + spec.bs_startfrom
            end = argc - 1 if spec.bs_startfrom > 0 else 1
            first = 0
            i = start
            while i != end:
                if i >= argc or i < 1:
                    break
                if argv[i].lower() == spec.bs_keyword.lower():
                    first = i + 1
                    break
                i = i + 1 if start <= end else i - 1
            if not first:
                continue
        else:
            return None
        if spec.fk_type == "range":
            step = spec.keystep
            if spec.lastkey >= 0:
                last = first + spec.lastkey
            elif not spec.limit:
                last = argc + spec.lastkey
            else:
                last = first + ((argc - first) // spec.limit + spec.lastkey)
        elif spec.fk_type == "keynum":
            step = spec.keystep
            if spec.keynumidx >= argc or first + spec.keynumidx >= argc:
                return None
            numkeys = string2ll(argv[first + spec.keynumidx])
            if numkeys is None or numkeys < 0:
                return None
            first += spec.firstkey
            last = first + numkeys - 1
        else:
            return None
        if last >= argc or last < first or first >= argc:
            return None
        need = spec.access
        for i in range(first, last + 1, step):
            out.append((i, need))
        if "incomplete" in spec.flags:
            return None
    return out


def get_channels(cmd: Command, argv: Sequence[bytes]) -> list[tuple[int, bool]]:
    """[(argv index, is_pattern)] for PUBLISH/SPUBLISH/(S|P)SUBSCRIBE."""
    if cmd.channels is None:
        return []
    start, count, pattern = cmd.channels
    stop = len(argv) if count == -1 else min(len(argv), start + count)
    return [(i, pattern) for i in range(start, stop)]
