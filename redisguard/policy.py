"""The policy every session shares, and the one decision: may this user run this request?

:func:`decide` is Redis's processCommand up to the point where a command runs: unknown or disabled →
wrong arity → protected (DEBUG, MODULE LOAD) → NOAUTH → ACL (command, keys, channels, SORT's own
BY/GET check). The session, ACL DRYRUN and ``redisguard acl check`` all ask it. It is pure, so huge
requests are decided in a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .acl import ACLReplies, User, admin, check
from .acl.check import sort_restriction
from .acl.glob import stringmatch
from .acl.user import printable_name
from .commands import Command, CommandTable, unknown_command_error
from .fastpath import Plan
from .guards import AuthThrottle, Network, source_allowed
from .profile import TrafficProfile
from .resp import encode_bulk, encode_command, encode_error

if TYPE_CHECKING:
    from .identity import MirrorIdentity
    from .session import Session

NOAUTH = b"-NOAUTH Authentication required.\r\n"


class Observer(Protocol):
    """What a session reports; metrics and audit implement it (no-ops by default)."""

    def command(self, session: Session, cmd: str, allowed: bool, reason: str) -> None: ...
    def allowed(self, labels: list[tuple[str, str]]) -> None: ...
    def would_deny(self, session: Session, cmd: str, reason: str) -> None: ...
    def upstream_auth_failed(self, session: Session) -> None: ...
    def auth(self, session: Session, ok: bool, username: str, reason: str, method: str) -> None: ...
    def reply_latency(self, seconds: float) -> None: ...
    def throttled(self, session: Session, delay: float) -> None: ...


class _NullObserver:
    def command(self, session: Session, cmd: str, allowed: bool, reason: str) -> None:
        pass

    def allowed(self, labels: list[tuple[str, str]]) -> None:
        pass

    def would_deny(self, session: Session, cmd: str, reason: str) -> None:
        pass

    def upstream_auth_failed(self, session: Session) -> None:
        pass

    def auth(self, session: Session, ok: bool, username: str, reason: str, method: str) -> None:
        pass

    def reply_latency(self, seconds: float) -> None:
        pass

    def throttled(self, session: Session, delay: float) -> None:
        pass


class Sequencer(Protocol):
    """The one sequence of changes to the users (reload.Reloader): ACL SETUSER / DELUSER / LOAD go
    through it, in order with the reloads."""

    def submit(self, command: str, args: Sequence[bytes], computed: Any = None) -> bytes | Awaitable[bytes]: ...


@dataclass(frozen=True)
class LoginRules:
    """[acl] cert_only and user_sources, and the listeners whose unmapped client certificates are refused."""

    cert_only: tuple[bytes, ...] = ()  # Redis glob patterns of user names
    user_sources: dict[str, tuple[Network | str, ...]] = field(default_factory=dict)
    refuse_unmapped: frozenset[str] = frozenset()  # listener names with unmapped_cert = "refuse"

    def refusal(self, name: str, address: str, method: str) -> str:
        """Why a login as user ``name`` from ``address`` (an IP, or "unix") is refused whatever its
        credentials ("" = it is not): "cert_only" (a password login as a certificate-only user) or
        "source_not_allowed"."""
        if method == "password" and self.cert_only:
            raw = name.encode("utf-8", "surrogateescape")
            if any(stringmatch(p, raw) for p in self.cert_only):
                return "cert_only"
        allowed = self.user_sources.get(name)
        if allowed is not None:
            if address == "unix":
                return "" if "unix" in allowed else "source_not_allowed"
            if not source_allowed(address, [n for n in allowed if not isinstance(n, str)]):
                return "source_not_allowed"
        return ""


@dataclass(frozen=True)
class Policy:
    """The rules in force: the command table, the users, the global switches. Immutable: a reload or
    an ACL SETUSER/DELUSER/LOAD makes a new one and :meth:`Shared.swap` puts it in place whole, so a
    decision made off the loop reads one consistent policy."""

    table: CommandTable
    users: dict[str, User]
    disabled: frozenset[str] = frozenset()
    upstream_username: str = ""
    upstream_password: str = field(default="", repr=False)
    max_request_bytes: int = 512 * 1024 * 1024 + 64 * 1024
    enable_debug_command: str = "no"  # Redis's protected commands: "no" | "yes" | "local"
    enable_module_command: str = "no"
    users_file: str = ""  # for ACL SAVE / ACL LOAD
    audit_all: bool = False  # [acl] mode = "audit": ACL denials are forwarded, logged as would_deny
    audit_users: tuple[bytes, ...] = ()  # ... for these users (Redis glob patterns) only
    # Per user, the precomputed decisions of the fast path (fastpath.Plan); a new policy starts empty.
    # (init=False: dataclasses.replace() starts every derived policy with none, never shares a cache)
    plans: dict[User, Plan] = field(default_factory=dict, init=False, compare=False, repr=False)
    logins: LoginRules = field(default_factory=LoginRules)  # who may log in how and from where
    # [upstream] identity = "mirror": each session logs in upstream as its user's mirror (identity.py)
    mirror: MirrorIdentity | None = field(default=None, compare=False, repr=False)

    def with_users(self, users: dict[str, User]) -> Policy:
        return replace(self, users=users)

    def audits(self, user: User) -> bool:
        """Is ``user`` in audit mode (its ACL denials forwarded, not enforced)?"""
        if self.audit_all:
            return True
        name = user.name.encode("utf-8", "surrogateescape")
        return any(stringmatch(p, name) for p in self.audit_users)

    def plan(self, user: User, special: frozenset[str]) -> Plan:
        plan = self.plans.get(user)
        if plan is None:
            plan = self.plans[user] = Plan(self, user, printable_name(user.name), special)
        return plan

    @property
    def default_user(self) -> User:
        return self.users["default"]

    def upstream_auth(self, user: User | None = None) -> bytes:
        """The AUTH a session's upstream connection sends first: as ``user``'s mirror in mirror mode,
        else as the service user."""
        if self.mirror is not None and user is not None:
            return self.mirror.auth(user.name)
        return self.auth_command(self.upstream_username, self.upstream_password)

    @staticmethod
    def auth_command(username: str, password: str) -> bytes:
        """The service user's AUTH, or b"" when Redis needs none."""
        if username:
            return encode_command([b"AUTH", username.encode(), password.encode()])
        if password:
            return encode_command([b"AUTH", password.encode()])
        return b""

    def resolve(self, argv: Sequence[bytes]) -> Command | None:
        """The command argv names, or None if unknown to Redis or disabled here."""
        cmd = self.table.lookup(argv)
        if cmd is None or not self.disabled:
            return cmd
        if cmd.name in self.disabled or (cmd.parent is not None and cmd.parent.name in self.disabled):
            return None
        return cmd

    def unknown_error(self, argv: Sequence[bytes]) -> bytes:
        """Redis's reply to an unknown command; a disabled one is unknown, as after rename-command."""
        if self.table.lookup(argv) is not None:
            return unknown_command_error(argv)
        return self.table.unknown_error(argv)


class Shared:
    """What every session shares: the policy in force (swapped whole), and the services that outlive
    a policy — the observer sessions report to, the AUTH throttle, the ACL LOG, the ACL replies."""

    def __init__(self, policy: Policy, observer: Observer | None = None, throttle: AuthThrottle | None = None,
                 acl_replies: ACLReplies | None = None) -> None:  # fmt: skip
        self.policy = policy
        self.observer: Observer = observer or _NullObserver()
        self.throttle = throttle or AuthThrottle(0)
        self.acl_log = admin.ACLLog()
        self.acl_replies = acl_replies  # ACL USERS/LIST/GETUSER, built once per users load
        self.profile: TrafficProfile | None = None  # what each user used ([profile] file), if kept
        # Set by the transport: moves or disconnects clients when the users change (changed=None:
        # compare every user, as ACL LOAD and a reload do).
        # Returns how many clients it disconnected.
        self.on_users_changed: Callable[[Policy, set[str] | None, Sequence[str]], int] | None = None
        # Set by the transport: where ACL SETUSER / DELUSER / LOAD are applied and acknowledged (None:
        # swapped in here at once, for sessions without a transport).
        self.sequencer: Sequencer | None = None

    def swap(self, policy: Policy, changed: set[str] | None = None, deleted: Sequence[str] = (),
             acl_replies: ACLReplies | None = None) -> int:  # fmt: skip
        """Put ``policy`` in force; with new users, tell the transport (which rebinds the sessions and
        says how many clients it disconnected)."""
        old, self.policy = self.policy, policy
        if acl_replies is not None or policy.users is not old.users:
            self.acl_replies = acl_replies  # else rebuilt at first use (or off the loop by the transport)
        if policy.users is not old.users and policy.mirror is not None:
            policy.mirror.users_changed(policy.users)  # the mirror users in Redis follow (in the background)
        if policy.users is not old.users and self.on_users_changed is not None:
            return self.on_users_changed(policy, changed, deleted)
        return 0

    def replies(self) -> ACLReplies:
        users = self.policy.users
        if self.acl_replies is None or self.acl_replies.users is not users:
            self.acl_replies = ACLReplies(users)
        return self.acl_replies

    def offer_replies(self, acl_replies: ACLReplies) -> None:
        """ACL replies prepared off the loop: used if they are still of the users in force."""
        if acl_replies.users is self.policy.users and self.acl_replies is None:
            self.acl_replies = acl_replies


@dataclass(frozen=True, slots=True)
class Verdict:
    """What Redis's processCommand would decide before running ``argv`` (error None: allowed)."""

    cmd: Command | None
    error: bytes | None
    reason: str  # "" | unknown_command | disabled | arity | noauth | command | key | channel
    name: str  # the command's name for metrics and logs ("unknown" if Redis does not know it)
    index: int = 0  # for key/channel denials: the argument Redis names in ACL LOG


_PROTECTED = {"debug": ("DEBUG", "enable-debug-command"), "module|load": ("MODULE", "enable-module-command"),
              "module|loadex": ("MODULE", "enable-module-command"), "module|unload": ("MODULE", "enable-module-command")}


def decide(policy: Policy, user: User, argv: Sequence[bytes], auth_required: bool, local: bool = False,
           dry: bool = False) -> Verdict:  # fmt: skip
    """The decision, in Redis's order: unknown or disabled → arity → protected → NOAUTH → ACL. Pure:
    may run in a worker thread for huge requests. ``dry`` is ACL DRYRUN's: Redis's command table (no
    disabled commands), arity and ACL only."""
    cmd = policy.table.lookup(argv) if dry else policy.resolve(argv)
    if cmd is None:
        known = policy.table.lookup(argv)
        return Verdict(None, policy.unknown_error(argv), "disabled" if known else "unknown_command",
                       known.name if known else "unknown")  # fmt: skip
    err = CommandTable.arity_error(cmd, len(argv))
    if err:
        return Verdict(cmd, err, "arity", cmd.name)
    protected = None if dry else _PROTECTED.get(cmd.name)  # ACL DRYRUN (dry) checks arity and ACL only
    if protected is not None:
        setting = policy.enable_debug_command if protected[0] == "DEBUG" else policy.enable_module_command
        if not (setting == "yes" or (setting == "local" and local)):  # "no" (and anything unresolved)
            return Verdict(cmd, b'-ERR %s command not allowed. If the %s option is set to "local", you can run it '
                           b"from a local connection, otherwise you need to set this option in the configuration "
                           b"file, and then restart the server.\r\n" % (protected[0].encode(), protected[1].encode()),
                           "protected", cmd.name)  # fmt: skip
    if auth_required and not cmd.no_auth:
        return Verdict(cmd, NOAUTH, "noauth", cmd.name)
    denied = check(user, cmd, argv)
    if denied is not None:
        return Verdict(cmd, denied.error, denied.reason, cmd.name, denied.index)
    if cmd.name in ("sort", "sort_ro") and not dry:
        # SORT's own run-time check (BY/GET patterns), which Redis makes as the connection's user
        err = sort_restriction(user, cmd, argv)
        if err:
            return Verdict(cmd, err, "key", cmd.name)
    return Verdict(cmd, None, "", cmd.name)


def dryrun(policy: Policy, argv: Sequence[bytes]) -> bytes:
    """ACL DRYRUN <user> <command> [arg ...]: the decision above, in DRYRUN's words."""
    name = argv[0].decode("utf-8", "surrogateescape")
    user = policy.users.get(name)
    if user is None:
        return encode_error("ERR User '%s' not found" % argv[0].decode("utf-8", "replace"))
    cmd_argv = list(argv[1:])
    if policy.table.lookup(cmd_argv) is None:
        return encode_error("ERR Command '%s' not found" % cmd_argv[0].decode("utf-8", "replace"))
    verdict = decide(policy, user, cmd_argv, False, dry=True)
    if verdict.error is None:
        return b"+OK\r\n"
    if verdict.reason == "command" and verdict.cmd is not None:
        return encode_bulk(f"This user has no permissions to run the '{verdict.cmd.name}' command")
    if verdict.reason in ("key", "channel"):  # the name as printf's %s shows it: up to a NUL
        obj = cmd_argv[verdict.index].split(b"\0", 1)[0]
        return encode_bulk(b"This user has no permissions to access the '%s' %s" % (obj, verdict.reason.encode()))
    return verdict.error
