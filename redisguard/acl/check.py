"""The decision: may this user run this argv? (acl.c ``ACLCheckAllUserCommandPerm``, 7.0)

Rules, stated once:
1. A selector passes if the command bit is set (or it has ``allcommands``, or the command is one of
   the ``no_auth`` commands AUTH/HELLO/QUIT/RESET), or the first argument is explicitly allowed;
2. and, unless it has ``allkeys``, every key the command touches (key specs / getkeys) matches a
   pattern granting the access the key needs (read for ACCESS, write for INSERT/DELETE/UPDATE);
3. and, unless it has ``allchannels``, every channel of PUBLISH/SPUBLISH/(S|P)SUBSCRIBE matches a
   channel pattern (PSUBSCRIBE patterns must equal an ACL pattern literally).
The user passes if any selector passes. Otherwise the error is the most severe across selectors
(command < key < channel), ties going to the highest argument index.

Unknown commands and wrong arity are answered before this, by the caller (Redis's check order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redisguard.commands.table import Command, get_channels, get_keys

from .user import Selector, User

OK = 0
DENIED_CMD = 1
DENIED_KEY = 2
DENIED_CHANNEL = 3

REASONS = {DENIED_CMD: "command", DENIED_KEY: "key", DENIED_CHANNEL: "channel"}


@dataclass(frozen=True, slots=True)
class Denied:
    reason: str  # "command" | "key" | "channel"
    error: bytes  # the exact RESP error line Redis sends
    index: int  # the argv index Redis would log (0 for the command itself)


def noperm_error(code: int, cmd: Command) -> bytes:
    if code == DENIED_CMD:
        return b"-NOPERM this user has no permissions to run the '%s' command\r\n" % cmd.name.encode()
    if code == DENIED_KEY:
        return b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
    return b"-NOPERM this user has no permissions to access one of the channels used as arguments\r\n"


def _selector_check(
    sel: Selector, cmd: Command, argv: Sequence[bytes], keys_cache: list[list[tuple[int, int]]]
) -> tuple[int, int]:
    if not sel.allcommands and not cmd.no_auth and cmd.name not in sel.allowed:
        allowed_args = sel.firstargs.get(cmd.name)
        if not allowed_args or len(argv) < 2:
            return DENIED_CMD, 0
        arg = argv[2 if cmd.parent else 1].lower()
        if not any(arg == a.lower().encode() for a in allowed_args):
            return DENIED_CMD, 0
    if not sel.allkeys and cmd.has_keys:
        if not keys_cache:
            keys_cache.append(get_keys(cmd, argv))
        idx = denied_key(sel, argv, keys_cache[0])
        if idx is not None:
            return DENIED_KEY, idx
    if not sel.allchannels and cmd.channels is not None:
        for idx, is_pattern in get_channels(cmd, argv):
            ch = argv[idx]
            if is_pattern:
                # Redis compares with strcmp, so `&a` would let `PSUBSCRIBE a\0*` through; we compare
                # every byte and refuse it (deliberately stricter; tests/acl/test_differential_verdicts.py).
                if ch not in sel.channels:
                    return DENIED_CHANNEL, idx
            elif not any(_channel_match(p, ch) for p in sel.channels):
                return DENIED_CHANNEL, idx
    return OK, 0


def denied_key(sel: Selector, argv: Sequence[bytes], keys: list[tuple[int, int]]) -> int | None:
    """The argv index of the first key ``sel``'s patterns do not grant the access it needs, or None
    (the selector's key rule: a pattern with the needed permissions must match each key)."""
    patterns = sel.keys
    for idx, need in keys:
        key = argv[idx]
        for kp in patterns:
            if kp.perms & need == need and kp.match(key):
                break
        else:
            return idx
    return None


def _channel_match(pattern: bytes, channel: bytes) -> bool:
    from .glob import stringmatch

    return stringmatch(pattern, channel)


def check(user: User, cmd: Command, argv: Sequence[bytes]) -> Denied | None:
    """None if ``user`` may run ``argv`` (already resolved to ``cmd``), else why not."""
    relevant, last_idx = DENIED_CMD, 0
    keys_cache: list[list[tuple[int, int]]] = []
    for sel in user.selectors:
        code, idx = _selector_check(sel, cmd, argv, keys_cache)
        if code == OK:
            return None
        if code > relevant or (code == relevant and idx > last_idx):
            relevant, last_idx = code, idx
    return Denied(REASONS[relevant], noperm_error(relevant, cmd), last_idx)


def _unrestricted_read(sel: Selector) -> bool:
    """ACLSelectorHasUnrestrictedKeyAccess(selector, CMD_KEY_ACCESS)."""
    from redisguard.commands.table import READ

    return sel.allkeys or any(kp.pattern == b"*" and kp.perms & READ for kp in sel.keys)


def sort_restriction(user: User, cmd: Command, argv: Sequence[bytes]) -> bytes | None:
    """SORT's own run-time check (sort.c): BY with a pattern and GET need read access to every key.

    Redis runs it inside the command, as the connection's user — upstream that is the proxy's service
    user, so redisguard must make the check itself. Returns Redis's error, or None."""
    full = None
    j, argc = 2, len(argv)
    while j < argc:
        left = argc - j - 1
        arg = argv[j].lower()
        if arg in (b"asc", b"desc", b"alpha"):
            pass
        elif arg == b"limit" and left >= 2:
            j += 2
        elif arg == b"store" and left >= 1 and cmd.name == "sort":
            j += 1
        elif arg in (b"by", b"get") and left >= 1:
            if arg == b"get" or b"*" in argv[j + 1]:
                if full is None:
                    cache: list[list[tuple[int, int]]] = []
                    full = any(_selector_check(s, cmd, argv, cache)[0] == OK and _unrestricted_read(s) for s in user.selectors)
                if not full:
                    opt = b"BY" if arg == b"by" else b"GET"
                    return b"-ERR %s option of SORT denied due to insufficient ACL permissions.\r\n" % opt
            j += 1
        else:
            return None  # a syntax error: Redis itself answers it
        j += 1
    return None
