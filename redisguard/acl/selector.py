"""A selector in Redis 7.0's ACL language (acl.c ``ACLSetSelector``): commands, keys, channels.

A selector's command permissions are kept as a set of command names (``get``, ``config|set``) over
the command table — Redis's per-selector bitmap — plus the deprecated first-argument allowances
(``+select|0``). The error texts are Redis's own. Users (passwords, flags, several selectors) are in
:mod:`.user`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from redisguard.commands.table import READ, WRITE, ACLIndex, Command, CommandTable

from .glob import compile_glob

ALL_PERMS = READ | WRITE


class ACLError(ValueError):
    """An invalid rule; ``str()`` is the text Redis puts after "Error in ACL SETUSER modifier"."""


E_ENOENT = "Unknown command or category name in ACL"
E_EINVAL = "Syntax error"
E_EEXIST = (
    "Adding a pattern after the * pattern (or the 'allkeys' flag) is not valid and does not have any "
    "effect. Try 'resetkeys' to start with an empty list of patterns"
)
E_EISDIR = (
    "Adding a pattern after the * pattern (or the 'allchannels' flag) is not valid and does not have "
    "any effect. Try 'resetchannels' to start with an empty list of channels"
)
E_ENODEV = "The password you are trying to remove from the user does not exist"
E_EBADMSG = "The password hash must be exactly 64 characters and contain only lowercase hexadecimal characters"
E_ECHILD = "Allowing first-arg of a subcommand is not supported"
_SPACE = re.compile(rb"[ \t\r\n\v\f\x00]")  # ACLStringHasSpaces: isspace() or NUL
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _to_bytes(s: str) -> bytes:
    """A rule as Redis sees it: rules decoded from bytes with surrogateescape go back unchanged."""
    return s.encode("utf-8", "surrogateescape")


def _c_lower(op: str) -> str:
    """What ``strcasecmp`` compares: the C string (up to a NUL), ASCII-only case folding."""
    return op.split("\0", 1)[0].translate(_ASCII_LOWER)


def _lookup(table: CommandTable, name: str) -> Command | None:
    """ACLLookupCommand: command names are ASCII (str.lower() would map the Kelvin sign to 'k')."""
    return table.get(name) if name.isascii() else None


# What a selector's command rules follow from: its commands, +@all as the base, its first-arg rules.
CommandsKey = tuple[frozenset[str], bool, tuple[tuple[str, tuple[str, ...]], ...]]


@dataclass(eq=False, slots=True)  # (slots: a large users file holds hundreds of thousands)
class KeyPattern:
    pattern: bytes
    perms: int
    match: Callable[[bytes], bool] = field(repr=False)


@dataclass(eq=False)
class Selector:
    table: CommandTable = field(repr=False)
    root: bool = False
    allkeys: bool = False
    allchannels: bool = False
    allcommands: bool = False  # skip the command check (set by +@all; any '-' rule clears it)
    future: bool = False  # Redis's reserved bit: +@all was the base, so describe starts "+@all"
    # A frozenset once loaded: users with the same commands share one (users_file.parse_users); the
    # rules only ever rebind it (|=, -=, set_all), so a shared set is never changed through another user.
    allowed: set[str] | frozenset[str] = field(default_factory=set)
    firstargs: dict[str, list[str]] = field(default_factory=dict)
    keys: list[KeyPattern] = field(default_factory=list)
    channels: list[bytes] = field(default_factory=list)
    _described: str | None = field(default=None, init=False, repr=False)  # describe_commands() memo

    def copy(self) -> Selector:
        """An independent copy (key patterns too: a repeated pattern ORs its perms in place)."""
        sel = Selector(
            self.table, self.root, self.allkeys, self.allchannels, self.allcommands, self.future,
            set(self.allowed), {k: list(v) for k, v in self.firstargs.items()},
            [KeyPattern(kp.pattern, kp.perms, kp.match) for kp in self.keys], list(self.channels),
        )  # fmt: skip
        sel._described = self._described
        return sel

    def share_commands(self, seen: dict[CommandsKey, Selector]) -> None:
        """Once loaded: take the command set, as a frozenset, and its ACL LIST form from an equal selector
        in ``seen`` (or be the one later ones take them from). A large users file's users mostly share a
        few command sets of some 12 KiB each, whose rules describe_commands() computes in ~0.1 ms."""
        key = (frozenset(self.allowed), self.future, tuple((n, tuple(a)) for n, a in self.firstargs.items()))
        first = seen.setdefault(key, self)
        if first is self:
            self.allowed = key[0]
        else:
            self.allowed, self._described = first.allowed, first.describe_commands()

    # -- command bits -------------------------------------------------------------------------
    # The precomputed sets of the table's ACLIndex make each of these a set operation instead of a
    # walk over the table. They and apply() forget the describe_commands() memo.
    def _set_names(self, names: frozenset[str], allow: bool) -> None:
        self._described = None
        if allow:
            self.allowed |= names
        elif names:
            self.allowed -= names
            self.allcommands = False

    def change_perm(self, cmd: Command, allow: bool) -> None:
        """ACLChangeSelectorPerm: a container carries all its subcommands with it."""
        self._set_names(self.table.acl.family[cmd.name], allow)
        self.firstargs.pop(cmd.name, None)

    def set_category(self, category: str, allow: bool) -> None:
        """ACLSetSelectorCommandBitsForCategory: every member, containers with their subcommands."""
        index = self.table.acl
        self._set_names(index.closure[category], allow)
        if self.firstargs:
            members = index.members[category]
            for name in [n for n in self.firstargs if n in members]:
                del self.firstargs[name]

    def set_all(self, allow: bool) -> None:
        self._described = None
        if allow:
            self.allowed = set(self.table.acl.all_names)
            self.allcommands = self.future = True
        else:
            self.allowed = set()
            self.allcommands = self.future = False
        self.firstargs = {}

    def count_category(self, category: str) -> tuple[int, int]:
        members = self.table.acl.members[category]
        on = len(members & self.allowed)
        return on, len(members) - on

    # -- one rule -------------------------------------------------------------------------------
    def apply(self, op: str) -> None:
        """ACLSetSelector: apply one selector rule or raise ACLError."""
        self._described = None
        low = _c_lower(op)
        if low in ("allkeys", "~*"):
            self.allkeys = True
            self.keys = []
        elif low == "resetkeys":
            self.allkeys = False
            self.keys = []
        elif low in ("allchannels", "&*"):
            self.allchannels = True
            self.channels = []
        elif low == "resetchannels":
            self.allchannels = False
            self.channels = []
        elif low in ("allcommands", "+@all"):
            self.set_all(True)
        elif low in ("nocommands", "-@all"):
            self.set_all(False)
        elif op[:1] in ("~", "%"):
            if self.allkeys:
                raise ACLError(E_EEXIST)
            self._add_key_pattern(*parse_key_rule(op))
        elif op[:1] == "&":
            if self.allchannels:
                raise ACLError(E_EISDIR)
            pat = parse_channel_rule(op)
            if pat not in self.channels:
                self.channels.append(pat)
        elif op[:2] in ("+@", "-@"):
            if low[2:] not in self.table.categories:
                raise ACLError(E_ENOENT)
            self.set_category(low[2:], op[0] == "+")
        elif op[:1] in ("+", "-"):
            self._command_rule(op.split("\0", 1)[0])  # looked up as a C string
        else:
            raise ACLError(E_EINVAL)

    def _add_key_pattern(self, pat: bytes, perms: int) -> None:
        for kp in self.keys:
            if kp.pattern == pat:  # a repeated pattern ORs its perms in, as Redis does
                kp.perms |= perms
                return
        self.keys.append(KeyPattern(pat, perms, compile_glob(pat)))

    def _command_rule(self, op: str) -> None:
        cmd, firstarg = parse_command_rule(self.table, op)
        if firstarg is None:
            self.change_perm(cmd, op[0] == "+")
            return
        # Deprecated "+select|0": allow one first argument of an otherwise blocked command.
        allowed = self.firstargs.setdefault(cmd.name, [])
        if firstarg.translate(_ASCII_LOWER) not in (a.translate(_ASCII_LOWER) for a in allowed):
            allowed.append(firstarg)

    # -- describe ---------------------------------------------------------------------------------
    def key_rules(self) -> list[str]:
        if self.allkeys:
            return ["~*"]
        prefix = {ALL_PERMS: "~", READ: "%R~", WRITE: "%W~"}
        return [prefix[kp.perms] + kp.pattern.decode("utf-8", "surrogateescape") for kp in self.keys]

    def channel_rules(self) -> list[str]:
        if self.allchannels:
            return ["&*"]
        return ["&" + c.decode("utf-8", "surrogateescape") for c in self.channels]

    def describe(self) -> str:
        parts = self.key_rules()
        if not self.allchannels:
            parts.append("resetchannels")
        parts += self.channel_rules()
        parts.append(self.describe_commands())
        return " ".join(parts)

    def describe_commands(self) -> str:
        """ACLDescribeSelectorCommandRules (7.0): +@all/-@all, greedy categories, then commands.

        Computed once per state of the selector (any change to its command bits forgets it)."""
        if self._described is None:
            self._described = describe_command_rules(self.table, self.allowed, self.future, self.firstargs)
        return self._described


# -- the parts of a rule and of a description that are no selector's state --------------------------
# Pure functions of a rule (or of the bits being described) and the command table, so the class keeps
# only what changes a selector.
def parse_key_rule(op: str) -> tuple[bytes, int]:
    """``~pattern`` or ``%RW~pattern`` (ACLSetSelector): the pattern and the permissions it grants."""
    raw = _to_bytes(op)
    perms = 0
    offset = 1
    if raw[:1] == b"%":
        while offset < len(raw):
            c = raw[offset : offset + 1].upper()
            if c == b"R" and not perms & READ:
                perms |= READ
            elif c == b"W" and not perms & WRITE:
                perms |= WRITE
            elif c == b"~":
                offset += 1
                break
            else:
                raise ACLError(E_EINVAL)
            offset += 1
    else:
        perms = ALL_PERMS
    if not perms:
        raise ACLError(E_EINVAL)
    pat = raw[offset:]
    if _SPACE.search(pat):
        raise ACLError(E_EINVAL)
    return pat, perms


def parse_channel_rule(op: str) -> bytes:
    """``&pattern``: the channel pattern."""
    pat = _to_bytes(op[1:])
    if _SPACE.search(pat):
        raise ACLError(E_EINVAL)
    return pat


def parse_command_rule(table: CommandTable, op: str) -> tuple[Command, str | None]:
    """``+cmd``, ``-cmd``, ``+cmd|sub`` or the deprecated ``+cmd|firstarg`` (ACLSetSelector): the command
    whose bits the rule sets, or (with the first argument it allows) the command it is a first-arg rule of."""
    body = op[1:]
    if op[0] != "+" or "|" not in body:
        cmd = _lookup(table, body) if body.count("|") <= 1 else None
        if cmd is None:
            raise ACLError(E_ENOENT)
        return cmd, None
    base, _, sub = body.rpartition("|")
    parent = _lookup(table, base) if base.count("|") <= 1 else None
    if parent is None:
        raise ACLError(E_ENOENT)
    if parent.parent is not None:
        raise ACLError(E_ECHILD)
    if not sub:
        raise ACLError(E_EINVAL)
    if not parent.subcommands:
        return parent, sub
    cmd = _lookup(table, body)
    if cmd is None:
        raise ACLError(E_ENOENT)
    return cmd, None


def describe_command_rules(table: CommandTable, names: set[str] | frozenset[str], future: bool,
                           firstargs: Mapping[str, Sequence[str]]) -> str:  # fmt: skip
    """ACLDescribeSelectorCommandRules (7.0) of the allowed ``names``: +@all/-@all (``future``: +@all was
    the base), greedy categories, then single commands and first-arg rules."""
    # Redis works on two scratch selectors: ``fake``, what the rules emitted so far grant, and
    # ``temp``, the user's bits with each chosen category taken out (added back, when the base is
    # +@all). Here both are bit masks over the table's ACLIndex.
    index = table.acl
    allowed = index.mask_of(names)
    additive = not future
    fake = 0 if additive else index.all_mask
    temp = allowed
    rules = ["-@all" if additive else "+@all"]
    sign = "+@" if additive else "-@"
    members_mask, members_count, closure_mask = index.members_mask, index.members_count, index.closure_mask
    pending = list(table.categories)
    while pending:
        best, mindiff, maxsame = None, 2**31, 0
        for cat in pending:
            on = (temp & members_mask[cat]).bit_count()
            off = members_count[cat] - on
            diff, same = (off, on) if additive else (on, off)
            if same > diff and (diff < mindiff or (diff == mindiff and same > maxsame)):
                best, mindiff, maxsame = cat, diff, same
        if best is None:
            break
        c = closure_mask[best]
        if additive:
            fake |= c
            temp &= ~c
        else:
            fake &= ~c
            temp |= c
        rules.append(sign + best)
        pending.remove(best)
    # Single commands, in table order: only the top-level commands whose family still differs
    # from ``fake`` (or that carry first-arg rules) can emit anything.
    diff_bits = allowed ^ fake
    tops = set(firstargs)
    top = index.top
    while diff_bits:
        low = diff_bits & -diff_bits
        tops.add(top[low.bit_length() - 1])
        diff_bits ^= low
    commands = table.commands
    for name in sorted(tops, key=index.index.__getitem__):
        fake = _describe_single(index, commands[name], fake, allowed, firstargs, rules)
    return " ".join(rules)


def _describe_single(
    index: ACLIndex, cmd: Command, fake: int, allowed: int, firstargs: Mapping[str, Sequence[str]], rules: list[str]
) -> int:
    b = index.bit[cmd.name]
    userbit = bool(allowed & b)
    if userbit != bool(fake & b):
        rules.append(("+" if userbit else "-") + cmd.name)
        fam = index.family_mask[cmd.name]
        fake = fake | fam if userbit else fake & ~fam
    for sub in cmd.subcommands.values():
        fake = _describe_single(index, sub, fake, allowed, firstargs, rules)
    if not userbit:
        rules.extend(f"+{cmd.name}|{arg}" for arg in firstargs.get(cmd.name, ()))
    return fake
