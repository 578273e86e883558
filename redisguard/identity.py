"""Who may log in how and from where, and whom the upstream connection logs in as.

Logins: ``[acl] cert_only`` (users who log in only with a client certificate), ``[acl.user_sources]``
(the networks a user may log in from) and the listeners' ``unmapped_cert`` become the policy's
:class:`~redisguard.policy.LoginRules`; the session asks them at each login.

Upstream identity (``[upstream] identity``): with ``"service"`` every client's upstream connection
logs in as the configured upstream user, so scripts (EVAL, FCALL) run with that user's rights
whatever the client's key patterns. With ``"mirror"`` redisguard keeps, for each of its users, a Redis
ACL user ``<mirror_prefix><name>`` with the same command, key and channel rules and a password only
this process knows, and each client's upstream connection logs in as its user's mirror: Redis then
enforces the same rules inside scripts, and ``CLIENT LIST`` / ``ACL LOG`` on Redis name the user.

Which identity (``identity = "auto"``, the default): :func:`resolve` asks Redis, once at start-up
(``serve`` before any worker forks, and ``check-config``), whether the service user may run ACL
SETUSER, DELUSER and USERS — queued in a MULTI that is discarded, so nothing runs: yes → mirror, no →
service. In service identity it also reads the service user's own rights (:func:`service_user`: ACL
GETUSER, else the same MULTI probe over every command a script can call) for the scripts rule of
:func:`~redisguard.policy.decide`, and refuses to start if the service user may run a command that
``[acl] disabled_commands`` refuses (a script could still call it).

Theory of operation (mirror mode)
---------------------------------
The mirror password of a user is ``HMAC-SHA256(key, name)`` with a random key made at start and
held in memory only; Redis is sent its SHA-256 (``#<hash>``), never the password, and neither is
ever logged. :class:`MirrorIdentity` pushes the users to Redis with ``ACL SETUSER <mirror> reset on
#<hash> <rules>`` and ``ACL DELUSER`` through its own connection as the upstream user: all of them at
start (stale ``<prefix>*`` users are deleted), then — in the background, coalesced, bounded by a
timeout — whatever changed each time the users change (a reload, ACL SETUSER/DELUSER/LOAD through
redisguard: ``Shared.swap`` tells it). A user whose rules did not change costs nothing. If Redis
cannot be reached, it retries with a growing delay until it can.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import hiredis

from .acl import ACLError, User, new_user
from .acl.user import printable_name
from .audit import get_logger
from .commands import CommandTable
from .config import Config
from .policy import LoginRules, Shared, refused_commands, script_callable
from .resp import encode_command
from .upstream import queued, upstream_replies

log = get_logger("redisguard")

# The key mirror passwords derive from, made once per process start. Made at import, so with
# [server] workers the supervisor makes it before it forks and every worker (and every restarted one)
# shares it: workers never reset each other's mirror passwords.
PROCESS_KEY = secrets.token_bytes(32)

# Commands per pipelined batch on the admin connection, and its timeout per batch (seconds).
BATCH = 500
TIMEOUT = 10.0
RETRY_MAX = 30.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


def login_rules(config: Config) -> LoginRules:
    return LoginRules(
        cert_only=tuple(p.encode("utf-8", "surrogateescape") for p in config.acl.cert_only),
        user_sources=dict(config.acl.user_sources),
        refuse_unmapped=frozenset(lst.name for lst in config.listeners if lst.unmapped_cert == "refuse"),
    )


async def install(shared: Shared, config: Config) -> None:
    """At start, before any client: the login rules; in mirror mode the mirror users in Redis, in
    service mode the service user's rights (for the scripts rule)."""
    policy = replace(shared.policy, logins=login_rules(config))
    up = config.upstream
    if up.identity == "auto" and not up.resolved_identity:  # (serve resolves it before any worker forks)
        config = (await resolve(config, policy.table)).config
    if config.upstream.effective_identity == "mirror":
        mirror = MirrorIdentity(config, key=PROCESS_KEY)
        policy = replace(policy, mirror=mirror, service_scripts="allow")  # Redis checks scripts as the caller
        mirror.refused = refused_commands(policy)
        await mirror.start(policy.users)
    else:
        try:
            service = await service_user(config, policy.table)
        except UNREACHABLE:
            service = None  # unknown: counted as every right
        policy = replace(policy, service_scripts=up.service_scripts, service_user=service)
    shared.policy = policy


def mirror_rules(user: User, refused: Sequence[str] = ()) -> list[str]:
    """``user``'s rules as ACL SETUSER arguments, without its passwords and on/off (the mirror gets
    ``on`` and its own password): the canonical ``ACL LIST`` form of :meth:`User.describe`, less the
    ``refused`` commands (redisguard's for everyone: :func:`~redisguard.policy.refused_commands`) in
    every selector, so a script cannot call them either."""
    minus = [f"-{c}" for c in refused]
    flags = [f for f in user.flags() if f not in ("on", "off", "nopass")]
    return [*flags, *user.root.describe().split(" "), *minus,
            *("(" + " ".join([s.describe(), *minus]) + ")" for s in user.selectors[1:])]  # fmt: skip


# -- which identity, and what the service user may do ---------------------------------------------
UNREACHABLE = (TimeoutError, OSError, ConnectionError, ssl.SSLError)
# What the mirror users need (MirrorIdentity's own commands), asked as the service user.
MIRROR_COMMANDS = ("acl|setuser", "acl|deluser", "acl|users")


@dataclass(frozen=True)
class Resolution:
    config: Config  # with [upstream] resolved_identity set
    why: str  # how the identity was chosen, for the log line and check-config
    service: User | None = None  # service identity: the service user's rights (None: unknown, every right)
    problems: tuple[str, ...] = ()  # service identity: why it must not start

    @property
    def identity(self) -> str:
        return self.config.upstream.effective_identity


def probe(table: CommandTable, name: str) -> list[bytes]:
    """A request for command ``name`` (``acl|setuser``) with its arity's worth of placeholder arguments:
    only ever queued in a MULTI that is discarded (:func:`~redisguard.upstream.queued`)."""
    cmd = table.get(name)
    argv = [part.upper().encode() for part in name.split("|")]
    want = abs(cmd.arity) if cmd is not None else len(argv)
    return argv + [b"redisguard:probe"] * max(0, want - len(argv))


def _refused_by_redis(reply: Any) -> bool:
    """A queued probe's reply: Redis's refusal of the command itself (not of a key: the command may run)."""
    return isinstance(reply, hiredis.ReplyError) and "no permissions to run the" in str(reply)


async def may_run(config: Config, table: CommandTable, names: Sequence[str]) -> list[bool] | None:
    """Per command, may the service user run it at all (on some keys)? Redis's own answer, from a MULTI
    that is discarded; None if the service user may not run MULTI."""
    replies = await queued(config, [probe(table, n) for n in names], TIMEOUT)
    return None if replies is None else [not _refused_by_redis(r) for r in replies]


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else ""


def getuser_rules(reply: Any) -> list[str]:
    """ACL GETUSER's reply (flags, passwords, commands, keys, channels, selectors) as the rules that make
    the same rights (passwords and flags left out)."""
    def fields(raw: Any) -> dict[str, Any]:
        items = list(raw.items()) if isinstance(raw, dict) else list(zip(raw[::2], raw[1::2], strict=True))
        return {_text(k): v for k, v in items}

    def rules(d: dict[str, Any]) -> list[str]:
        return [r for f in ("commands", "keys", "channels") for r in _text(d.get(f)).split()]

    d = fields(reply)
    return [*rules(d), *("(" + " ".join(rules(fields(sel))) + ")" for sel in d.get("selectors") or [])]


async def service_user(config: Config, table: CommandTable) -> User | None:
    """The service user's rights as Redis has them: from ACL GETUSER if it may read itself, else every
    command a script can call that Redis does not refuse it (in a discarded MULTI) with every key and
    channel; None if neither can be asked."""
    name = config.upstream.username or "default"
    (reply,) = await upstream_replies(config, [[b"ACL", b"GETUSER", name.encode()]], TIMEOUT)
    if isinstance(reply, list | dict) and reply:
        try:
            return new_user(name, table, getuser_rules(reply))
        except ACLError:
            pass  # rules this command table cannot read (a module's commands): ask command by command
    names = sorted(script_callable(table))
    allowed = await may_run(config, table, names)
    if allowed is None:
        return None
    return new_user(name, table, ["~*", "&*", "+@all", *(f"-{n}" for n, ok in zip(names, allowed, strict=True) if not ok)])


def runnable_refused(service: User | None, refused: Sequence[str], table: CommandTable) -> list[str]:
    """The refused commands (``[acl] disabled_commands``) a script run as ``service`` could still call."""
    scriptable = script_callable(table)
    mine = {n for s in service.selectors for n in s.allowed} if service is not None else scriptable
    return [r for r in refused if any(n in mine for n in table.acl.family.get(r, frozenset({r})) & scriptable)]


async def resolve(config: Config, table: CommandTable) -> Resolution:
    """Which identity, asked of Redis once (``serve`` before any worker forks, and ``check-config``), and
    in service identity the service user's rights and whether redisguard may start with them."""
    up = config.upstream
    who = up.username or "default"
    identity, why = up.identity, "configured"
    try:
        if identity == "auto":
            ok = await may_run(config, table, MIRROR_COMMANDS)
            identity = "mirror" if ok is not None and all(ok) else "service"
            why = (f"auto: the service user {who!r} may manage Redis ACL users" if identity == "mirror" else
                   f"auto: the service user {who!r} may not manage Redis ACL users (ACL SETUSER, DELUSER, USERS)")  # fmt: skip
        service = await service_user(config, table) if identity == "service" else None
        reached = True
    except UNREACHABLE as e:
        identity = "service" if identity == "auto" else identity
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
        why = f"{why if up.identity != 'auto' else 'auto'}; Redis at {up.where} could not be asked ({reason})"
        service, reached = None, False
    resolved = replace(config, upstream=replace(up, resolved_identity=identity))
    if identity == "mirror" or not reached:
        return Resolution(resolved, why)
    refused = [n for n in config.acl.disabled_commands if table.get(n) is not None]
    runnable = runnable_refused(service, refused, table)
    problems: tuple[str, ...] = ()
    if runnable:
        known = "" if service is not None else " (its rights could not be read: grant it +acl|getuser or +multi +discard)"
        problems = (f"upstream: the service user {who!r} may run {', '.join(n.upper() for n in runnable)} in Redis{known}, "
                    "which [acl] disabled_commands refuses, and in service identity every script runs as that user; fix "
                    f"it in Redis: ACL SETUSER {who} {' '.join('-' + n for n in runnable)} (and in Redis's ACL file), or "
                    'use [upstream] identity = "mirror"',)  # fmt: skip
    return Resolution(resolved, why, service, problems)


class MirrorIdentity:
    def __init__(self, config: Config, key: bytes | None = None) -> None:
        self.config = config
        self.prefix = config.upstream.mirror_prefix
        self._key = key or secrets.token_bytes(32)  # several processes sharing the mirrors must share the key
        self._auth: dict[str, bytes] = {}
        self._synced: dict[str, str] = {}  # mirror name → the rules Redis has for it
        self._users: list[tuple[str, User]] | None = None  # the users to push next (None: nothing to do)
        self._task: asyncio.Task[None] | None = None
        self._failing = ""
        self.refused: Sequence[str] = ()  # taken from every mirror (mirror_rules); set by install and Shared.swap

    def mirror_name(self, name: str) -> str:
        return self.prefix + name

    def _password(self, name: str) -> str:
        return hmac.new(self._key, name.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()

    def auth(self, name: str) -> bytes:
        """``AUTH <mirror> <password>`` for user ``name`` (encoded once per name)."""
        cmd = self._auth.get(name)
        if cmd is None:
            cmd = self._auth[name] = encode_command(
                [b"AUTH", self.mirror_name(name).encode("utf-8", "surrogateescape"), self._password(name).encode()])
        return cmd

    def setuser(self, user: User, rules: Sequence[str]) -> list[bytes]:
        pw_hash = hashlib.sha256(self._password(user.name).encode()).hexdigest()
        return [b"ACL", b"SETUSER", self.mirror_name(user.name).encode("utf-8", "surrogateescape"), b"reset", b"on",
                b"#" + pw_hash.encode(), *(r.encode("utf-8", "surrogateescape") for r in rules)]  # fmt: skip

    # -- keeping Redis in step -------------------------------------------------------------------
    async def start(self, users: dict[str, User]) -> None:
        """Push every user now (stale mirrors deleted); if Redis is not there, keep trying in the background."""
        self._users = list(users.items())
        try:
            await asyncio.wait_for(self._push(stale=True), TIMEOUT * 3)
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self._failed(e)
            self._task = asyncio.ensure_future(self._run(retry=True))

    def users_changed(self, users: dict[str, User]) -> None:
        """The users changed (on the event loop): push the difference in the background."""
        self._users = list(users.items())  # a snapshot: the dict may be released while we read it
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self, retry: bool = False) -> None:
        delay = 1.0
        if retry:
            await asyncio.sleep(delay)
        while self._users is not None:
            try:
                await asyncio.wait_for(self._push(stale=bool(self._failing)), TIMEOUT * 3)
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self._failed(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _failed(self, e: BaseException) -> None:
        msg = _redact(f"{type(e).__name__}: {e}")
        if msg != self._failing:  # once per distinct error, not per retry
            log.error("mirror_sync_failed", upstream=self.config.upstream.where, error=msg,
                      detail="clients cannot log in upstream as their mirror users until this works; the upstream "
                      "user needs +acl|setuser +acl|deluser +acl|users (docs/security.md)")  # fmt: skip
        self._failing = msg

    async def _push(self, stale: bool = False) -> None:
        users = self._users
        if users is None:
            return
        self._users = None
        try:
            commands, names, deleted = await asyncio.to_thread(self._plan, users)
            if stale:  # (at start, or after a failure: Redis may hold mirrors of users that are gone)
                (listed,) = await self._request([[b"ACL", b"USERS"]])
                if isinstance(listed, hiredis.ReplyError):
                    raise ConnectionError(f"ACL USERS: {listed}")
                keep = {self.mirror_name(n) for n, _ in users} | {self.config.upstream.username, *deleted}
                gone = [u for u in (x.decode("utf-8", "surrogateescape") for x in listed)
                        if u.startswith(self.prefix) and u not in keep]  # fmt: skip
                deleted += gone
            for i in range(0, len(deleted), BATCH):
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in deleted[i:i + BATCH])])
                names.append(("", ""))
            errors = 0
            for i in range(0, len(commands), BATCH):
                replies = await self._request(commands[i:i + BATCH])
                for (mirror, rules), reply in zip(names[i:i + BATCH], replies, strict=True):
                    if isinstance(reply, hiredis.ReplyError):
                        errors += 1
                        log.error("mirror_user_failed", user=printable_name(mirror), error=_redact(str(reply)))
                    elif mirror:
                        self._synced[mirror] = rules
            for d in deleted:
                self._synced.pop(d, None)
        except BaseException:
            if self._users is None:
                self._users = users  # try this change again (unless a newer one is waiting)
            raise
        if self._failing:
            log.info("mirror_sync_recovered", upstream=self.config.upstream.where)
            self._failing = ""
        log.info("mirror_users_synced", set=sum(1 for n in names if n[0]), deleted=len(deleted), errors=errors)

    def _plan(self, users: list[tuple[str, User]]) -> tuple[list[list[bytes]], list[tuple[str, str]], list[str]]:
        """(in a worker thread) The ACL SETUSERs for users whose rules Redis does not have yet, and the
        mirrors of users that are gone."""
        commands: list[list[bytes]] = []
        names: list[tuple[str, str]] = []
        for name, user in users:
            rules = mirror_rules(user, self.refused)
            text = " ".join(rules)
            if self._synced.get(self.mirror_name(name)) != text:
                commands.append(self.setuser(user, rules))
                names.append((self.mirror_name(name), text))
        wanted = {self.mirror_name(n) for n, _ in users}
        return commands, names, [m for m in self._synced if m not in wanted]

    async def _request(self, commands: list[list[bytes]]) -> list[Any]:
        return await upstream_replies(self.config, commands, TIMEOUT)


def _redact(text: str) -> str:
    """No password hash in a log line (Redis's ACL SETUSER errors quote the rule they reject)."""
    return _HEX64.sub("<redacted>", text)

