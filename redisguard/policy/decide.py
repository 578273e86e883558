"""The policy every session shares, and the one decision: may this user run this request?

:func:`decide` is Redis's processCommand up to the point where a command runs: unknown or disabled →
wrong arity → protected (DEBUG, MODULE LOAD) → NOAUTH → ACL (command, keys, channels, SORT's own
BY/GET check) → scripts. The session, ACL DRYRUN and ``redisguard acl check`` all ask it. It is pure,
so huge requests are decided in a worker thread.

Scripts: a proxy cannot see inside a script. Redis checks each ``redis.call`` against the connection's
user: in mirror identity the caller's own mirror (so a script has the caller's rights, less what
redisguard refuses to everyone, which :func:`refused_commands` takes from the mirrors too), in service
identity the service user. There a script of a user whose rights are narrower than the service user's
would run with more rights than its caller, so :func:`decide` refuses :data:`SCRIPT_COMMANDS` to such
users (:meth:`Policy.may_script`, computed by :func:`covers`), unless ``[upstream] service_scripts =
"allow"``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from redisguard.acl import ACLReplies, User, admin, check
from redisguard.acl.check import sort_restriction
from redisguard.acl.glob import stringmatch
from redisguard.acl.user import printable_name
from redisguard.commands.table import Command, CommandTable, unknown_command_error
from redisguard.policy.guards import AuthThrottle, Network, source_allowed
from redisguard.policy.plan import Plan
from redisguard.policy.ports import Mirror, NullObserver, Observer, ProfileRecorder
from redisguard.protocol.resp import cstr, encode_bulk, encode_command, error_format

NOAUTH = b"-NOAUTH Authentication required.\r\n"

# What runs a script, or installs code a later FCALL runs. (FUNCTION LOAD's own run of a library cannot
# call Redis: "attempt to access nonexistent global variable 'call'".) Not SCRIPT LOAD: it runs nothing,
# and EVALSHA names a script by the SHA1 of its text, so what one user loads cannot change what another
# user's EVALSHA runs; EVALSHA itself is here. FUNCTION DELETE/FLUSH run no code: the user's rules decide.
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "function|load",
                             "function|restore"})  # fmt: skip
SCRIPT_WHY = (b"scripts run with the rights of the proxy's service user, which are wider than this user's; use "
              b'[upstream] identity = "mirror"')  # fmt: skip
SCRIPT_REFUSED = b"-NOPERM this user has no permissions to run the '%s' command: " + SCRIPT_WHY + b"\r\n"


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
    mirror: Mirror | None = field(default=None, compare=False, repr=False)
    # Scripts of users narrower than the service user: "refuse" (service identity), "allow" (mirror
    # identity: Redis checks them as the caller; or the [upstream] service_scripts opt-in).
    service_scripts: str = "refuse"
    # The service user's rights as Redis reports them (upstream.service.service_user); None: unknown, every right.
    service_user: User | None = field(default=None, compare=False, repr=False)
    # Per user, may_script()'s answer under this policy (a new policy starts empty, as plans do).
    scripters: dict[User, bool] = field(default_factory=dict, init=False, compare=False, repr=False)

    def with_users(self, users: dict[str, User]) -> Policy:
        return replace(self, users=users)

    def digest(self, acl_list: bytes) -> str:
        """The policy's fingerprint, for comparing sidecars (redisguard_policy_info, check-config --peer):
        SHA-256 of the users as ``ACL LIST`` answers them (``acl_list``: sorted by name, each user's rules in
        Redis's canonical form, password hashes included, so the file's comments, order and spacing do not
        count), [acl] disabled_commands and whether mode is audit; its first 16 hex digits."""
        h = hashlib.sha256(acl_list)
        h.update(b"\ndisabled_commands " + " ".join(sorted(self.disabled)).encode())
        h.update(b"\nmode audit" if self.audit_all else b"\nmode enforce")
        return "sha256:" + h.hexdigest()[:16]

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

    def may_script(self, user: User) -> bool:
        """May ``user`` run :data:`SCRIPT_COMMANDS` (its own rules allowing)? Yes unless scripts would run
        with more rights than the user has: in service identity, only users who :func:`covers` the
        service user."""
        if self.service_scripts == "allow":
            return True
        known = self.scripters.get(user)
        if known is None:
            known = self.scripters[user] = covers(user, self.service_user, refused_commands(self),
                                                  script_callable(self.table))  # fmt: skip
        return known

    def refuses_script(self, user: User, name: str) -> bool:
        """Is command ``name`` a script that ``user`` may not run here (:meth:`may_script`)?"""
        return name in SCRIPT_COMMANDS and not self.may_script(user)

    @property
    def default_user(self) -> User:
        return self.users["default"]

    def upstream_auth(self, user: User | None = None) -> bytes:
        """The AUTH a session's upstream connection sends first: as ``user``'s mirror in mirror mode,
        else as the service user."""
        if self.mirror is not None and user is not None:
            return self.mirror.auth(user)
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
        self.observer: Observer = observer or NullObserver()
        self.throttle = throttle or AuthThrottle(0)
        self.acl_log = admin.ACLLog()
        self.acl_replies = acl_replies  # ACL USERS/LIST/GETUSER, built once per users load
        # Policies put in force so far (swap): a decision made under an earlier one may differ now,
        # even for the very same User (a reload reads an unchanged line as the same user, and a
        # reload may change disabled_commands or the service user's rights).
        self.generation = 0
        self.profile: ProfileRecorder | None = None  # what each user used ([profile] file), if kept
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
        self.generation += 1
        if acl_replies is not None or policy.users is not old.users:
            self.acl_replies = acl_replies  # else rebuilt at first use (or off the loop by the transport)
        if policy.mirror is not None and (policy.users is not old.users or policy.disabled != old.disabled):
            policy.mirror.refused = refused_commands(policy)  # (a reload may change [acl] disabled_commands)
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
    # Redis makes this refusal when the command runs, not in processCommand: no ACL LOG entry, and inside
    # MULTI the command is queued and the error is its element of EXEC's reply. In 7.0 only SORT's BY/GET
    # check (sort.c: ACLUserCheckCmdWithUnrestrictedKeyAccess) is an ACL check made there.
    at_exec: bool = False


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
            return Verdict(cmd, err, "key", cmd.name, at_exec=True)
    if policy.refuses_script(user, cmd.name):
        return Verdict(cmd, SCRIPT_REFUSED % cmd.name.encode(), "script", cmd.name)
    return Verdict(cmd, None, "", cmd.name)


def refused_commands(policy: Policy) -> tuple[str, ...]:
    """What redisguard refuses to everyone whatever their rules, as ACL command names: ``[acl]
    disabled_commands`` (those Redis knows) and the protected commands while their setting is "no"."""
    names = [*sorted(policy.disabled)]
    if policy.enable_debug_command == "no":
        names.append("debug")
    if policy.enable_module_command == "no":
        names += ["module|load", "module|loadex", "module|unload"]
    return tuple(n for n in dict.fromkeys(names) if policy.table.get(n) is not None)


@functools.lru_cache(maxsize=8)
def script_callable(table: CommandTable) -> frozenset[str]:
    """The commands a script can call that matter: those without Redis's ``noscript`` flag (subcommands
    for containers; Redis refuses the others from a script: "This Redis command is not allowed from
    script"), less the ``<container>|help`` subcommands, which answer a fixed text."""
    return frozenset(n for n in table.acl.all_names if (c := table.get(n)) is not None and not c.subcommands
                     and "noscript" not in c.flags and not n.endswith("|help"))  # fmt: skip


def service_may_run(service: User | None, scriptable: frozenset[str]) -> frozenset[str]:
    """The script-callable commands a script run as ``service`` may call, with some arguments on some
    keys: a command's own rule, a subcommand's or a first-argument rule (``+flushall|async``) counts;
    ``service`` None (unknown) may run every one. The one answer to "may the service user run X" for
    the scripts rule (:func:`covers`) and the start-up check (upstream.service.runnable_refused)."""
    if service is None:
        return scriptable
    return frozenset(n for s in service.selectors for n in (*s.allowed, *s.firstargs)) & scriptable


def covers(user: User, service: User | None, refused: Iterable[str], scriptable: frozenset[str]) -> bool:
    """Can ``user`` do everything a script run as ``service`` can? True iff one selector of ``user``
    allows every script-callable command some selector of ``service`` allows (less ``refused``, which
    redisguard refuses to ``user`` whatever its rules), on every key pattern (with at least its
    read/write permissions) and channel of ``service``. Conservative: patterns compare as text, so
    ``~a*`` does not cover ``~ab*``; ``service`` None (unknown) has every right."""
    family = user.table.acl.family
    taken = {n for r in refused for n in family.get(r, (r,))}
    needed = service_may_run(service, scriptable)
    if service is None:
        keys, channels = None, None
    else:
        keys = None if any(s.allkeys for s in service.selectors) else [kp for s in service.selectors for kp in s.keys]
        channels = None if any(s.allchannels for s in service.selectors) else [c for s in service.selectors for c in s.channels]
    for sel in user.selectors:
        if not needed <= (sel.allowed - taken):
            continue
        if not sel.allkeys and (keys is None or not all(any(k.pattern == kp.pattern and k.perms & kp.perms == kp.perms
                                                            for k in sel.keys) for kp in keys)):  # fmt: skip
            continue
        if not sel.allchannels and (channels is None or not all(c in sel.channels for c in channels)):
            continue
        return True
    return False


def dryrun(policy: Policy, argv: Sequence[bytes]) -> bytes:
    """ACL DRYRUN <user> <command> [arg ...]: the decision above, in DRYRUN's words."""
    name = argv[0].decode("utf-8", "surrogateescape")
    user = policy.users.get(name)
    if user is None:
        return error_format(b"User '%s' not found" % cstr(argv[0]))
    cmd_argv = list(argv[1:])
    if policy.resolve(cmd_argv) is None:  # a disabled command is unknown, as after rename-command
        return error_format(b"Command '%s' not found" % cstr(cmd_argv[0]))
    verdict = decide(policy, user, cmd_argv, False, dry=True)
    if verdict.error is None:
        return b"+OK\r\n"
    if verdict.reason == "command" and verdict.cmd is not None:
        return encode_bulk(f"This user has no permissions to run the '{verdict.cmd.name}' command")
    if verdict.reason == "script" and verdict.cmd is not None:  # a denial, so in DRYRUN's shape: a bulk string
        return encode_bulk(b"This user has no permissions to run the '%s' command: %s" % (verdict.cmd.name.encode(),
                                                                                        SCRIPT_WHY))  # fmt: skip
    if verdict.reason in ("key", "channel"):  # the name as printf's %s shows it: up to a NUL
        obj = cmd_argv[verdict.index].split(b"\0", 1)[0]
        return encode_bulk(b"This user has no permissions to access the '%s' %s" % (obj, verdict.reason.encode()))
    return verdict.error
