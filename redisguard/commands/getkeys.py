"""Which arguments of a request are keys and channels, as Redis 7.0 finds them (db.c).

``get_keys`` follows ``getKeysFromCommandWithSpecs``: key specs first, and Redis's hand-written
getkeys functions where specs are not enough (variable flags, invalid or incomplete specs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redisguard.commands.spec import READ, WRITE, Command, KeySpec
from redisguard.protocol.request import string2ll

# Channel arguments per command (db.c commands_with_channels): (first, count or -1 for all, pattern).
CHANNEL_COMMANDS: dict[str, tuple[int, int, bool]] = {
    "subscribe": (1, -1, False),
    "ssubscribe": (1, -1, False),
    "psubscribe": (1, -1, True),
    "publish": (1, 1, False),
    "spublish": (1, 1, False),
}


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



def keys_by_argc(cmd: Command) -> bool:
    """True if the keys of ``cmd`` sit at positions set by the argument count alone (key specs with
    index begin-search and range find-keys, no variable flags): then ``get_keys`` answers the same
    for every request of one length, whenever the specs find the keys (see ``Plan.allowed``)."""
    return cmd.spec_keys and all(  # (spec_keys: get_keys asks the specs first)
        ks.bs_type == "index" and ks.fk_type == "range" and "incomplete" not in ks.flags
        for ks in cmd.key_specs if "not_key" not in ks.flags
    )  # fmt: skip


def keys_from_specs(cmd: Command, argv: Sequence[bytes]) -> list[tuple[int, int]] | None:
    """The keys the specs find (None: Redis would fall back to the command's getkeys function)."""
    return _keys_from_specs(cmd.key_specs, argv, cmd.arity)


def get_keys(cmd: Command, argv: Sequence[bytes]) -> list[tuple[int, int]]:
    """[(argv index, READ|WRITE needed)] for the keys ``argv`` touches, as Redis 7.0 finds them."""
    if cmd.spec_keys:  # (some spec is a key spec, none has variable flags: computed with the table)
        keys = _keys_from_specs(cmd.key_specs, argv, cmd.arity)
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
