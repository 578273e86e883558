"""What the command table holds for one command: its key specs, flags and categories (COMMAND INFO).

Plain data, below both the table that builds it (:mod:`.table`) and key extraction (:mod:`.getkeys`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Key-spec access flags that make a key need read / write permission (acl.c ACLSelectorCheckKey).
READ = 1
WRITE = 2


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
    spec_keys: bool = False  # key specs find the keys (some are keys, none has variable flags): get_keys
    getkeys: Callable[[Sequence[bytes]], list[tuple[int, int]]] | None = None
    channels: tuple[int, int, bool] | None = None

    @property
    def no_auth(self) -> bool:
        return "no_auth" in self.flags
