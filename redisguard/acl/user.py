"""Users and selectors in Redis 7.0's ACL language (acl.c ``ACLSetUser``/``ACLSetSelector``).

Rules apply left to right to a user; each changes one piece of state, exactly as ``ACL SETUSER``
does, with the same error texts. A selector's command permissions are kept as a set of command
names (``get``, ``config|set``) over the command table — Redis's per-selector bitmap — plus the
deprecated first-argument allowances (``+select|0``). :func:`describe_user` renders the canonical
form Redis's ``ACL LIST`` prints.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..commands import READ, WRITE, Command, CommandTable
from ..request import split_args as resp_split_args
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
_HASH_RE = re.compile(r"[0-9a-f]{64}")
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


def split_args(line: str) -> list[str]:
    """sds.c ``sdssplitargs`` (how a selector's ``(...)`` body is split), or [] where it fails.

    The body is a C string, so parsing stops at a NUL; unbalanced quotes make Redis's selector empty,
    hence [] rather than an error. The splitting itself is the request reader's (resp.split_args)."""
    args = resp_split_args(_to_bytes(line).split(b"\0", 1)[0])
    return [] if args is None else [a.decode("utf-8", "surrogateescape") for a in args]


def hash_password(password: bytes) -> str:
    return hashlib.sha256(password).hexdigest()


@dataclass(eq=False)
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
    allowed: set[str] = field(default_factory=set)
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
            self._add_key_pattern(op)
        elif op[:1] == "&":
            if self.allchannels:
                raise ACLError(E_EISDIR)
            pat = _to_bytes(op[1:])
            if _SPACE.search(pat):
                raise ACLError(E_EINVAL)
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

    def _add_key_pattern(self, op: str) -> None:
        if self.allkeys:
            raise ACLError(E_EEXIST)
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
        for kp in self.keys:
            if kp.pattern == pat:
                kp.perms |= perms
                return
        self.keys.append(KeyPattern(pat, perms, compile_glob(pat)))

    def _command_rule(self, op: str) -> None:
        allow = op[0] == "+"
        body = op[1:]
        if not allow or "|" not in body:
            cmd = _lookup(self.table, body) if body.count("|") <= 1 else None
            if cmd is None:
                raise ACLError(E_ENOENT)
            self.change_perm(cmd, allow)
            return
        base, _, sub = body.rpartition("|")
        parent = _lookup(self.table, base) if base.count("|") <= 1 else None
        if parent is None:
            raise ACLError(E_ENOENT)
        if parent.parent is not None:
            raise ACLError(E_ECHILD)
        if not sub:
            raise ACLError(E_EINVAL)
        if parent.subcommands:
            cmd = _lookup(self.table, body)
            if cmd is None:
                raise ACLError(E_ENOENT)
            self.change_perm(cmd, True)
            return
        # Deprecated "+select|0": allow one first argument of an otherwise blocked command.
        allowed = self.firstargs.setdefault(parent.name, [])
        if sub.translate(_ASCII_LOWER) not in (a.translate(_ASCII_LOWER) for a in allowed):
            allowed.append(sub)

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
            self._described = self._describe_commands()
        return self._described

    def _describe_commands(self) -> str:
        # Redis works on two scratch selectors: ``fake``, what the rules emitted so far grant, and
        # ``temp``, the user's bits with each chosen category taken out (added back, when the base is
        # +@all). Here both are bit masks over the table's ACLIndex.
        index = self.table.acl
        allowed = index.mask_of(self.allowed)
        additive = not self.future
        fake = 0 if additive else index.all_mask
        temp = allowed
        rules = ["-@all" if additive else "+@all"]
        sign = "+@" if additive else "-@"
        members_mask, members_count, closure_mask = index.members_mask, index.members_count, index.closure_mask
        pending = list(self.table.categories)
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
        tops = set(self.firstargs)
        top = index.top
        while diff_bits:
            low = diff_bits & -diff_bits
            tops.add(top[low.bit_length() - 1])
            diff_bits ^= low
        commands = self.table.commands
        for name in sorted(tops, key=index.index.__getitem__):
            fake = self._describe_single(commands[name], fake, allowed, rules)
        return " ".join(rules)

    def _describe_single(self, cmd: Command, fake: int, allowed: int, rules: list[str]) -> int:
        index = self.table.acl
        b = index.bit[cmd.name]
        userbit = bool(allowed & b)
        if userbit != bool(fake & b):
            rules.append(("+" if userbit else "-") + cmd.name)
            fam = index.family_mask[cmd.name]
            fake = fake | fam if userbit else fake & ~fam
        for sub in cmd.subcommands.values():
            fake = self._describe_single(sub, fake, allowed, rules)
        if not userbit:
            rules.extend(f"+{cmd.name}|{arg}" for arg in self.firstargs.get(cmd.name, ()))
        return fake


@dataclass(eq=False)
class User:
    name: str
    table: CommandTable = field(repr=False)
    enabled: bool = False
    nopass: bool = False
    sanitize_payload: bool = False
    skip_sanitize_payload: bool = False
    passwords: list[str] = field(default_factory=list)  # sha256 hex
    selectors: list[Selector] = field(default_factory=list)
    implicit: bool = False  # the built-in default a users file without a "user default" line gets
    # describe() and fingerprint, computed at first use; apply() forgets them. A user is changed only
    # through apply() (never its selectors directly), and not at all once it serves clients.
    _description: str | None = field(default=None, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.selectors:
            self.selectors.append(Selector(self.table, root=True))

    @property
    def root(self) -> Selector:
        return self.selectors[0]

    def copy(self) -> User:
        """ACLCopyUser: an independent copy to change (users that serve clients never change)."""
        return User(
            self.name, self.table, self.enabled, self.nopass, self.sanitize_payload, self.skip_sanitize_payload,
            list(self.passwords), [s.copy() for s in self.selectors], self.implicit,
        )  # fmt: skip

    def apply(self, op: str) -> None:
        """ACLSetUser: apply one rule (a selector in parentheses, or a user/root-selector rule)."""
        self._description = self._fingerprint = None
        if not op:
            return  # ACLSetUser: an empty rule is a no-op
        low = _c_lower(op)
        if op.startswith("(") and op.endswith(")"):
            sel = Selector(self.table)
            for part in split_args(op[1:-1]):
                sel.apply(part)
            self.selectors.append(sel)
        elif low == "on":
            self.enabled = True
        elif low == "off":
            self.enabled = False
        elif low == "skip-sanitize-payload":
            self.skip_sanitize_payload, self.sanitize_payload = True, False
        elif low == "sanitize-payload":
            self.skip_sanitize_payload, self.sanitize_payload = False, True
        elif low == "nopass":
            self.nopass = True
            self.passwords = []
        elif low == "resetpass":
            self.nopass = False
            self.passwords = []
        elif op[:1] in (">", "#"):
            h = _password_hash(op)
            if h not in self.passwords:
                self.passwords.append(h)
            self.nopass = False
        elif op[:1] in ("<", "!"):
            h = _password_hash(op)
            if h not in self.passwords:
                raise ACLError(E_ENODEV)
            self.passwords.remove(h)
        elif low == "reset":
            for r in ("resetpass", "resetkeys", "resetchannels", "off", "sanitize-payload",
                      "clearselectors", "-@all"):  # fmt: skip
                self.apply(r)
        elif low == "clearselectors":
            del self.selectors[1:]
        else:
            self.root.apply(op)

    def check_password(self, password: bytes) -> bool:
        """ACLCheckUserCredentials: enabled, then nopass or a matching hash (constant time)."""
        if not self.enabled:
            return False
        if self.nopass:
            return True
        h = hash_password(password)
        ok = False
        for stored in self.passwords:
            ok |= hmac.compare_digest(stored, h)
        return ok

    def flags(self) -> list[str]:
        """The user flags, in Redis's order (ACLUserFlags)."""
        flags = ["on" if self.enabled else "off"]
        if self.nopass:
            flags.append("nopass")
        if self.skip_sanitize_payload:
            flags.append("skip-sanitize-payload")
        if self.sanitize_payload:
            flags.append("sanitize-payload")
        return flags

    def describe(self) -> str:
        """The rules as ``ACL LIST`` prints them after ``user <name>`` (ACLDescribeUser)."""
        if self._description is None:
            parts = self.flags()
            parts.extend("#" + h for h in self.passwords)
            parts.append(self.root.describe())
            parts.extend("(" + s.describe() + ")" for s in self.selectors[1:])
            self._description = " ".join(parts)
        return self._description

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of everything that decides what this user may do, the name aside.

        Two users have the same fingerprint iff their rules, flags and passwords are the same: the
        canonical ``describe()`` form plus the state it folds together (the selectors' allcommands,
        allkeys and allchannels switches). Computed once; compares users across reloads in O(1)."""
        if self._fingerprint is None:
            state = (
                self.enabled, self.nopass, self.sanitize_payload, self.skip_sanitize_payload, tuple(self.passwords),
                tuple((s.allcommands, s.future, s.allkeys, s.allchannels) for s in self.selectors), self.describe(),
            )  # fmt: skip
            self._fingerprint = hashlib.sha256(ascii(state).encode()).hexdigest()
        return self._fingerprint


def _password_hash(op: str) -> str:
    """The sha256 a >pw / <pw rule names, or the validated hash of a #hash / !hash rule."""
    if op[0] in "><":
        return hash_password(_to_bytes(op[1:]))
    h = op[1:]
    if not _HASH_RE.fullmatch(h):
        raise ACLError(E_EBADMSG)
    return h


def merge_selector_args(args: Iterable[str]) -> list[str]:
    """ACLMergeSelectorArguments: re-join ``(`` ... ``)`` spread over several arguments."""
    out: list[str] = []
    current: list[str] | None = None
    for arg in args:
        if arg.startswith("(") and not arg.endswith(")"):
            current = [arg]  # Redis starts over: an unclosed "(" before it is dropped
        elif current is None:
            out.append(arg)
        else:
            current.append(arg)
            if arg.endswith(")"):
                out.append(" ".join(current))
                current = None
    if current is not None:
        raise ACLError("Unmatched parenthesis in acl selector starting at '%s'." % current[0])
    return out


def new_user(name: str, table: CommandTable, rules: Iterable[str] = ()) -> User:
    """A user as ``ACL SETUSER name rules...`` would create it from nothing."""
    user = User(name, table)
    for op in merge_selector_args(rules):
        try:
            user.apply(op)
        except ACLError as e:
            raise ACLError(f"Error in ACL SETUSER modifier '{op}': {e}") from None
    return user


def default_user(table: CommandTable, implicit: bool = False) -> User:
    """Redis's built-in ``default``: ``on nopass ~* &* +@all``."""
    user = new_user("default", table, ["on", "nopass", "~*", "&*", "+@all"])
    user.implicit = implicit
    return user
