"""Users in Redis 7.0's ACL language (acl.c ``ACLSetUser``): flags, passwords, selectors.

Rules apply left to right to a user; each changes one piece of state, exactly as ``ACL SETUSER``
does, with the same error texts. Command, key and channel rules belong to a user's selectors
(:mod:`.selector`). ``User.describe`` renders the canonical form Redis's ``ACL LIST`` prints.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from redisguard.commands.table import CommandTable
from redisguard.protocol.request import split_args as resp_split_args

from .selector import E_EBADMSG, E_ENODEV, ACLError, KeyPattern, Selector, _c_lower, _to_bytes

__all__ = ["ACLError", "KeyPattern", "Selector", "User"]

_HASH_RE = re.compile(r"[0-9a-f]{64}")


def split_args(line: str) -> list[str]:
    """sds.c ``sdssplitargs`` (how a selector's ``(...)`` body is split), or [] where it fails.

    The body is a C string, so parsing stops at a NUL; unbalanced quotes make Redis's selector empty,
    hence [] rather than an error. The splitting itself is the request reader's (resp.split_args)."""
    args = resp_split_args(_to_bytes(line).split(b"\0", 1)[0])
    return [] if args is None else [a.decode("utf-8", "surrogateescape") for a in args]


def printable_name(name: str) -> str:
    """A user name as a metric label or log field: names may hold any bytes (surrogate-escaped), which
    the exposition format cannot carry; those bytes are shown as \\xNN."""
    return name if name.isascii() else name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def hash_password(password: bytes) -> str:
    return hashlib.sha256(password).hexdigest()


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
