"""Who may log in how and from where, and whom the upstream connection logs in as.

Logins: ``[acl] cert_only`` (users who log in only with a client certificate), ``[acl.user_sources]``
(the networks a user may log in from) and the listeners' ``unmapped_cert`` become the policy's
:class:`~redisguard.policy.decide.LoginRules`; the session asks them at each login.

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
GETUSER of itself; unreadable → every right) for the scripts rule of :func:`~redisguard.policy.decide.decide`,
and refuses to start if the service user may run a command that ``[acl] disabled_commands`` refuses (a
script could still call it), a first-argument rule (``+flushall|async``) included, or may for all that
can be read (:func:`start_problems`). If Redis cannot be asked at start, the identity is service and
each process asks again for the rights in the background until Redis answers
(:func:`await_service_rights`).

Theory of operation (mirror mode)
---------------------------------
The mirror password of a user is ``HMAC-SHA256(key, name, rules)`` over the exact rules text pushed
(:func:`mirror_rules`), so a mirror Redis holds with other rules (an ACL LOAD of an older file, a restart
or failover to older ACLs) refuses our AUTH and is pushed again. The key is :func:`mirror_key`: derived
from the service user's password, so every instance sharing the service user (an HA pair, a rolling
deploy, a restart) computes the same passwords; without a service password, a random key made at start
(held in memory only). Redis is sent the password's SHA-256 (``#<hash>``), never the password, and
neither is ever logged. :class:`MirrorIdentity` pushes the users to Redis with ``ACL SETUSER <mirror> reset on
#<hash> <rules>`` and ``ACL DELUSER`` through its own connection as the upstream user: all of them at
start (stale ``<prefix>*`` users are deleted), then — in the background, coalesced, bounded by a
timeout — whatever changed each time the users change (a reload, ACL SETUSER/DELUSER/LOAD through
redisguard: ``Shared.swap`` tells it). A user whose rules did not change costs nothing. If Redis
cannot be reached, or refuses a push (-BUSY while a script runs, say), the mirror is left marked
not pushed and retried with a growing delay until Redis has it.

Redis is the truth: what was pushed is not trusted to still be there (a restart, an ACL LOAD or a
failover to a replica drop the mirrors). :meth:`MirrorIdentity.verify` compares Redis with what was
pushed and pushes again what is missing or refuses its password: ``ACL USERS`` (names; ~2 ms for
10,000 users) on every health check, and with ``full`` also an ``AUTH`` as each mirror (exists, on,
our password) when a client's upstream AUTH is refused, when Redis is back after the health check saw
it down, and on every reload (SIGHUP). Not ``ACL LIST``: it costs Redis ~1.3 s per 10,000 users.
Checks are coalesced (every caller until a check starts shares it; they start at most one per
``VERIFY_GAP``) and, like every push, go through one lock: Redis hears one conversation at a time.
The service user is never a mirror (``config.mirror_prefix_conflict``) and never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import ssl
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hiredis

from redisguard.acl import ACLError, User, new_user
from redisguard.acl.user import printable_name
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config, ConfigError, mirror_prefix_conflict
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import LoginRules, Shared, refused_commands, script_callable, service_may_run
from redisguard.protocol.resp import encode_command
from redisguard.upstream.client import queued, upstream_replies

log = get_logger("redisguard")

# The key mirror passwords derive from when the service user has no password, made once per process
# start. Made at import, so with [server] workers the supervisor makes it before it forks and every
# worker (and every restarted one) shares it: workers never reset each other's mirror passwords.
PROCESS_KEY = secrets.token_bytes(32)
# Domain separation of the mirror key derived from the service password (mirror_key).
KEY_CONTEXT = b"redisguard mirror passwords v1\x00"

# Commands per pipelined batch on the admin connection, and its timeout per batch (seconds).
BATCH = 500
TIMEOUT = 10.0
RETRY_MAX = 30.0
# Verifications start at least this many seconds apart: clients refused at once share one check, and a
# stream of them causes at most one a second.
VERIFY_GAP = 1.0
# At most this many mirror names in one log line (the counts are always whole).
LOG_NAMES = 5
# A mirror we pushed less than this many seconds ago that refuses our password was most likely pushed
# again by another instance with other users or credentials (or an ACL LOAD right after our push).
CONTEST_WINDOW = 60.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


def login_rules(config: Config) -> LoginRules:
    return LoginRules(
        cert_only=tuple(p.encode("utf-8", "surrogateescape") for p in config.acl.cert_only),
        user_sources=dict(config.acl.user_sources),
        refuse_unmapped=frozenset(lst.name for lst in config.listeners if lst.unmapped_cert == "refuse"),
    )


async def install(shared: Shared, config: Config, metrics: Metrics | None = None) -> MirrorIdentity | None:
    """At start, before any client: the login rules; in mirror mode the mirror users in Redis, in
    service mode the service user's rights (for the scripts rule). The mirror users' keeper, if any."""
    policy = replace(shared.policy, logins=login_rules(config))
    up = config.upstream
    mirror = None
    if up.identity == "auto" and not up.resolved_identity:  # (serve resolves it before any worker forks)
        config = (await resolve(config, policy.table)).config
    if config.upstream.effective_identity == "mirror":
        key = mirror_key(config)
        if key is None:
            log.warning("mirror_key_per_process", upstream=up.where,
                        detail="the service user has no password, so the mirror passwords derive from a key of this "
                        "process: several redisguard instances in front of one Redis need a service password (shared "
                        "by all of them) or they reset each other's mirror users")  # fmt: skip
        mirror = MirrorIdentity(config, key=key or PROCESS_KEY, metrics=metrics)
        policy = replace(policy, mirror=mirror, service_scripts="allow")  # Redis checks scripts as the caller
        mirror.refused = refused_commands(policy)
        await mirror.start(policy.users)
    else:
        try:
            service, _ = await service_user(config, policy.table)
            down: BaseException | None = None
        except UNREACHABLE as e:
            service, down = None, e  # unknown: counted as every right until Redis answers
        policy = replace(policy, service_scripts=up.service_scripts, service_user=service)
        if down is not None:
            _background.add(task := asyncio.ensure_future(await_service_rights(shared, config, down)))
            task.add_done_callback(_background.discard)
    shared.policy = policy
    return mirror


def mirror_rules(user: User, refused: Sequence[str] = ()) -> list[str]:
    """``user``'s rules as ACL SETUSER arguments, without its passwords and on/off (the mirror gets
    ``on`` and its own password): the canonical ``ACL LIST`` form of :meth:`User.describe`, less the
    ``refused`` commands (redisguard's for everyone: :func:`~redisguard.policy.decide.refused_commands`) in
    every selector, so a script cannot call them either."""
    minus = [f"-{c}" for c in refused]
    flags = [f for f in user.flags() if f not in ("on", "off", "nopass")]
    return [*flags, *user.root.describe().split(" "), *minus,
            *("(" + " ".join([s.describe(), *minus]) + ")" for s in user.selectors[1:])]  # fmt: skip


def mirror_key(config: Config) -> bytes | None:
    """The key of the mirror passwords, from the service user's credentials (None without a password):
    every instance logging in as the same service user derives the same mirror passwords."""
    up = config.upstream
    if not up.password:
        return None
    who = (up.username or "default").encode("utf-8", "surrogateescape")
    return hmac.new(up.password.encode("utf-8", "surrogateescape"), KEY_CONTEXT + who, hashlib.sha256).digest()


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
    unread: str = ""  # service identity, Redis answered: why the service user's rights could not be read
    reached: bool = True  # False: Redis could not be asked (identity and rights unknown)

    @property
    def identity(self) -> str:
        return self.config.upstream.effective_identity


def probe(table: CommandTable, name: str) -> list[bytes]:
    """A request for command ``name`` (``acl|setuser``) with its arity's worth of placeholder arguments:
    only ever queued in a MULTI that is discarded (:func:`~redisguard.upstream.client.queued`)."""
    cmd = table.get(name)
    argv = [part.upper().encode() for part in name.split("|")]
    want = abs(cmd.arity) if cmd is not None else len(argv)
    return argv + [b"redisguard:probe"] * max(0, want - len(argv))


def _refused_by_redis(reply: Any) -> bool:
    """A queued probe's reply: Redis's refusal of the command itself (not of a key: the command may run)."""
    return isinstance(reply, hiredis.ReplyError) and "no permissions to run the" in str(reply)


async def may_run(config: Config, table: CommandTable, names: Sequence[str]) -> list[bool] | None:
    """Per command, may the service user run it (on some keys)? Redis's own answer, from a MULTI that is
    discarded; None if the service user may not run MULTI. Only a yes proves anything: the probe has
    placeholder arguments, so a refusal does not rule out a first-argument rule (``+flushall|async``)."""
    replies = await queued(config, [probe(table, n) for n in names], TIMEOUT)
    return None if replies is None else [not _refused_by_redis(r) for r in replies]


async def manages_acl_users(config: Config, table: CommandTable) -> bool:
    """May the service user run what the mirror users need (``identity = "auto"`` → mirror)?"""
    ok = await may_run(config, table, MIRROR_COMMANDS)
    return ok is not None and all(ok)


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


async def service_user(config: Config, table: CommandTable) -> tuple[User | None, str]:
    """The service user's rights as Redis has them (ACL GETUSER of itself), or None (unknown: every
    right) and why they could not be read. No probing command by command: Redis refuses a probe the same
    way whether the user lacks the command or has only a first-argument rule for it, so a probe can
    never show a command to be out of a script's reach."""
    name = config.upstream.username or "default"
    (reply,) = await upstream_replies(config, [[b"ACL", b"GETUSER", name.encode()]], TIMEOUT)
    if isinstance(reply, hiredis.ReplyError):
        return None, f"ACL GETUSER {name}: {reply}"
    if not isinstance(reply, list | dict) or not reply:
        return None, f"ACL GETUSER {name} answered {reply!r}"
    try:
        return new_user(name, table, getuser_rules(reply)), ""
    except ACLError as e:  # rules this command table cannot read (a module's commands)
        return None, f"ACL GETUSER {name}: rules this command table cannot read ({e})"


def runnable_refused(service: User | None, refused: Sequence[str], table: CommandTable) -> list[str]:
    """The refused commands (``[acl] disabled_commands``) a script run as ``service`` could still call
    (:func:`~redisguard.policy.decide.service_may_run`: first-argument and subcommand rules count)."""
    scriptable = script_callable(table)
    mine = service_may_run(service, scriptable)
    return [r for r in refused if table.acl.family.get(r, frozenset({r})) & mine]


def start_problems(who: str, service: User | None, unread: str, refused: Sequence[str], table: CommandTable
                   ) -> tuple[str, ...]:  # fmt: skip
    """Why service identity must not run with this service user (one line, the same for ``serve`` and
    ``check-config``): it may run, or may for all redisguard can tell, a command that ``refused``
    (``[acl] disabled_commands``) refuses, and every script runs as that user."""
    runnable = runnable_refused(service, refused, table)
    if not runnable:
        return ()
    names = ", ".join(n.upper() for n in runnable)
    alt = 'or use [upstream] identity = "mirror"'
    if service is None:
        return (f"upstream: the rights of the service user {who!r} could not be read ({unread}), so nothing shows it "
                f"cannot run {names} in Redis, which [acl] disabled_commands refuses, and in service identity every "
                f"script runs as that user; let it read them: ACL SETUSER {who} +acl|getuser (and in Redis's ACL file), "
                f"{alt}",)  # fmt: skip
    return (f"upstream: the service user {who!r} may run {names} in Redis, which [acl] disabled_commands refuses, and "
            f"in service identity every script runs as that user; fix it in Redis: ACL SETUSER {who} "
            f"{' '.join('-' + n for n in runnable)} (and in Redis's ACL file), {alt}",)  # fmt: skip


def _known(names: Iterable[str], table: CommandTable) -> list[str]:
    return [n for n in sorted(names) if table.get(n) is not None]


async def resolve(config: Config, table: CommandTable) -> Resolution:
    """Which identity, asked of Redis once (``serve`` before any worker forks, and ``check-config``), and
    in service identity the service user's rights and whether redisguard may start with them."""
    up = config.upstream
    who = up.username or "default"
    identity, why = up.identity, "configured"
    try:
        if identity == "auto":
            identity = "mirror" if await manages_acl_users(config, table) else "service"
            why = (f"auto: the service user {who!r} may manage Redis ACL users" if identity == "mirror" else
                   f"auto: the service user {who!r} may not manage Redis ACL users (ACL SETUSER, DELUSER, USERS)")  # fmt: skip
        service, unread = await service_user(config, table) if identity == "service" else (None, "")
        reached = True
    except UNREACHABLE as e:
        identity = "service" if identity == "auto" else identity
        why = f"{why if up.identity != 'auto' else 'auto'}; Redis at {up.where} could not be asked ({_reason(e)})"
        service, unread, reached = None, "", False
    resolved = replace(config, upstream=replace(up, resolved_identity=identity))
    if identity == "mirror" or not reached:
        return Resolution(resolved, why, reached=reached)
    problems = start_problems(who, service, unread, _known(config.acl.disabled_commands, table), table)
    return Resolution(resolved, why, service, problems, unread)


def _reason(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__


# Asking again for the service user's rights when Redis could not be asked at start: from this delay,
# doubling up to RIGHTS_RETRY_MAX (seconds), so Redis started at the same time is seen within seconds.
RIGHTS_RETRY = 0.5
RIGHTS_RETRY_MAX = 5.0
_background: set[asyncio.Future[None]] = set()  # (held, so the retry task is not collected)


async def await_service_rights(shared: Shared, config: Config, first: BaseException) -> None:
    """Redis could not be asked at start: the service user's rights count as every right (scripts refused
    to all but users with every right) until it answers. Ask again, with a growing delay, and then put its
    rights in force; with ``identity = "auto"`` log that a restart is needed if it would now be mirror
    (this process stays in service identity). With [server] workers each worker asks on its own: the
    same question of the same Redis, so the same answer unless its ACL changes meanwhile."""
    up, table = config.upstream, shared.policy.table
    who = up.username or "default"
    failing = _reason(first)
    log.warning("service_rights_unknown", upstream=up.where, user=who, error=failing,
                detail="Redis could not be asked for the service user's rights: until it answers they count as every "
                "right (scripts are refused to users narrower than that); asking again in the background")  # fmt: skip
    delay = RIGHTS_RETRY
    while True:
        await asyncio.sleep(delay)
        delay = min(delay * 2, RIGHTS_RETRY_MAX)
        try:
            mirror = up.identity == "auto" and await manages_acl_users(config, table)
            service, unread = await service_user(config, table)
        except UNREACHABLE as e:
            if _reason(e) != failing:  # once per distinct error, not per retry
                failing = _reason(e)
                log.warning("service_rights_unknown", upstream=up.where, user=who, error=failing,
                            detail="still asking in the background")  # fmt: skip
            continue
        except Exception as e:  # a bug must not end the retries silently: the rights stay unknown (safe)
            log.error("internal_error", message="reading the service user's rights failed", error=repr(e))
            continue
        break
    if mirror:
        log.error("upstream_identity_restart_required", upstream=up.where, identity="service",
                  why=f"auto: Redis answers now and the service user {who!r} may manage Redis ACL users",
                  detail='identity = "auto" would resolve to mirror, but it was decided while Redis could not be asked; '
                  "this process stays in service identity: restart redisguard to switch to mirror identity")  # fmt: skip
    problems = start_problems(who, service, unread, _known(shared.policy.disabled, table), table)  # (as reloaded)
    if problems:  # (start-up would have refused to start): every script stays refused but the widest users'
        log.error("service_rights_unsafe", upstream=up.where, user=who, error=problems[0],
                  detail="the service user's rights still count as every right; fix it in Redis and restart")  # fmt: skip
        return
    shared.swap(replace(shared.policy, service_user=service))
    if service is None:
        log.warning("service_rights_unreadable", upstream=up.where, user=who, error=unread,
                    detail=f"they still count as every right; let it read them: ACL SETUSER {who} +acl|getuser")  # fmt: skip
    else:
        log.info("service_rights_read", upstream=up.where, user=who, rights=" ".join(mirror_rules(service)),
                 detail="in force for the scripts rule from now on")  # fmt: skip


class MirrorError(Exception):
    """Redis did not take a mirror user change: its error, or why it could not be reached (redacted)."""


class MirrorIdentity:
    def __init__(self, config: Config, key: bytes | None = None, metrics: Metrics | None = None) -> None:
        conflict = mirror_prefix_conflict(config.upstream)
        if conflict:  # (the config parser refuses it too; this holds however the mode was chosen)
            raise ConfigError(f"upstream.mirror_prefix: {conflict}")
        self.config = config
        self.metrics = metrics
        self.prefix = config.upstream.mirror_prefix
        # Redis users a mirror push must never set nor delete, whatever the prefix and the user names.
        self.protected = frozenset({config.upstream.username or "default", "default"})
        # Several processes sharing the mirrors must share the key (mirror_key: from the service password).
        self._key = key or mirror_key(config) or secrets.token_bytes(32)
        # Per user (users never change once they serve clients: a change makes a new User), its AUTH for
        # the rules it had with these refused commands; bounded by the users alive.
        self._auth: weakref.WeakKeyDictionary[User, tuple[Sequence[str], bytes]] = weakref.WeakKeyDictionary()
        self._synced: dict[str, str] = {}  # mirror name → the rules Redis has for it (absent: not known to)
        self._pushed_at: dict[str, float] = {}  # mirror name → when we last pushed it (monotonic)
        self._wake = asyncio.Event()  # a retry waiting out its delay goes at once when the users change
        self._users: list[tuple[str, User]] | None = None  # the users to push next (None: nothing to do)
        self._task: asyncio.Task[None] | None = None
        self._failing = ""
        self._current: list[tuple[str, User]] = []  # the users Redis should have the mirrors of
        self._lock = asyncio.Lock()  # one conversation with Redis about the mirrors at a time
        self._next: asyncio.Future[bool] | None = None  # the check callers wait for, not started yet
        self._next_reason = ""
        self._next_full = False
        self._verifying: asyncio.Task[None] | None = None
        self._verify_began = -VERIFY_GAP
        self.refused: Sequence[str] = ()  # taken from every mirror (mirror_rules); set by install and Shared.swap

    def mirror_name(self, name: str) -> str:
        return self.prefix + name

    def password(self, name: str, rules: str) -> str:
        """The mirror password of user ``name`` with ``rules`` (the pushed mirror_rules text): a mirror
        Redis holds with other rules refuses it. (The name's length first: no two pairs share a message.)"""
        raw = name.encode("utf-8", "surrogateescape")
        msg = len(raw).to_bytes(4, "big") + raw + rules.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def rules_text(self, user: User) -> str:
        return " ".join(mirror_rules(user, self.refused))

    def auth(self, user: User) -> bytes:
        """``AUTH <mirror> <password>`` for ``user`` as it is now (encoded once per user and refused commands)."""
        cached = self._auth.get(user)
        if cached is not None and cached[0] == self.refused:
            return cached[1]
        cmd = self._auth_command(user.name, self.rules_text(user))
        self._auth[user] = (self.refused, cmd)
        return cmd

    def _auth_command(self, name: str, rules: str) -> bytes:
        return encode_command([b"AUTH", self.mirror_name(name).encode("utf-8", "surrogateescape"),
                               self.password(name, rules).encode()])  # fmt: skip

    def setuser(self, user: User, rules: Sequence[str]) -> list[bytes]:
        pw_hash = hashlib.sha256(self.password(user.name, " ".join(rules)).encode()).hexdigest()
        return [b"ACL", b"SETUSER", self.mirror_name(user.name).encode("utf-8", "surrogateescape"), b"reset", b"on",
                b"#" + pw_hash.encode(), *(r.encode("utf-8", "surrogateescape") for r in rules)]  # fmt: skip

    # -- keeping Redis in step -------------------------------------------------------------------
    async def start(self, users: dict[str, User]) -> None:
        """Push every user now (stale mirrors deleted); if Redis is not there, keep trying in the background."""
        self._users = self._current = list(users.items())
        try:
            async with self._lock:
                self._synced_log(await asyncio.wait_for(self._push(stale=True), TIMEOUT * 3))
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self._failed(e)
            self._task = asyncio.ensure_future(self._run(retry=True))

    def users_changed(self, users: dict[str, User]) -> None:
        """The users changed (on the event loop): push the difference in the background."""
        self._users = self._current = list(users.items())  # a snapshot: the dict may be released while we read it
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def _retry(self) -> None:
        """Redis did not take (all of) a push: push the newest users again in the background, with a
        growing delay, until it does."""
        if self._users is None:
            self._users = self._current
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run(retry=True))

    async def _run(self, retry: bool = False) -> None:
        delay = 1.0
        if retry:
            await self._backoff(delay)
        while self._users is not None:
            try:
                async with self._lock:
                    counts = await asyncio.wait_for(self._push(stale=bool(self._failing)), TIMEOUT * 3)
                self._synced_log(counts)
                if not counts[2]:
                    delay = 1.0
                    continue
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self._failed(e)
            await self._backoff(delay)  # (Redis refused or could not be reached: _push kept the users to push)
            delay = min(delay * 2, RETRY_MAX)

    async def _backoff(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if the users change meanwhile (a change is never held back)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    def _failed(self, e: BaseException) -> None:
        msg = _redact(f"{type(e).__name__}: {e}")
        if msg != self._failing:  # once per distinct error, not per retry
            log.error("mirror_sync_failed", upstream=self.config.upstream.where, error=msg,
                      detail="clients cannot log in upstream as their mirror users until this works; the upstream "
                      "user needs +acl|setuser +acl|deluser +acl|users (docs/security.md)")  # fmt: skip
        self._failing = msg

    async def apply(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> None:
        """Push the mirrors of the ``changed`` users (None: of every user whose rules Redis lacks) and
        delete those of ``deleted``; return once Redis has them (ACL SETUSER/DELUSER/LOAD answer then).
        Raises MirrorError if Redis refuses or cannot be reached within TIMEOUT."""
        async with self._lock:
            if changed is None:
                commands, names, gone = await asyncio.to_thread(self._plan, list(users.items()))
            else:
                commands, names, gone = [], [], [m for m in map(self.mirror_name, deleted) if m not in self.protected]
                for name in sorted(changed):
                    if name in users and self.mirror_name(name) not in self.protected:
                        args = mirror_rules(users[name], self.refused)
                        commands.append(self.setuser(users[name], args))
                        names.append((self.mirror_name(name), " ".join(args)))
            if gone:
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in gone)])
                names.append(("", ""))
            errors: list[str] = []
            try:
                for i in range(0, len(commands), BATCH):
                    replies = await asyncio.wait_for(self._request(commands[i:i + BATCH]), TIMEOUT)
                    errors += self._took(names[i:i + BATCH], commands[i:i + BATCH], replies)
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self._failed(e)
                for mirror, _ in names:  # (which of them Redis took is unknown)
                    self._synced.pop(mirror, None)
                self._retry()
                raise MirrorError(_redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)) from e
            if errors:
                self._retry()
                raise MirrorError(errors[0])

    def _took(self, names: Sequence[tuple[str, str]], commands: Sequence[list[bytes]], replies: Sequence[Any]
              ) -> list[str]:  # fmt: skip
        """Record Redis's replies to a batch of ``commands`` (``names``: (mirror, rules), ("", "") for an
        ACL DELUSER): a mirror Redis took is synced; one it refused is marked not synced (a refused
        DELUSER keeps its mirrors listed, to delete again) and logged. The errors, redacted."""
        errors = []
        now = time.monotonic()
        for (mirror, rules), command, reply in zip(names, commands, replies, strict=True):
            deleted = [] if mirror else [d.decode("utf-8", "surrogateescape") for d in command[2:]]
            if isinstance(reply, hiredis.ReplyError):
                error = _redact(str(reply))
                errors.append(error)
                log.error("mirror_user_failed", user=printable_name(mirror) if mirror else "",
                          deleted=[printable_name(d) for d in deleted[:LOG_NAMES]] if not mirror else [],
                          error=error, detail="Redis refused this mirror user change; retrying in the background")  # fmt: skip
                if mirror:
                    self._synced.pop(mirror, None)
                if self.metrics is not None:
                    self.metrics.mirror_push_errors.inc()
            elif mirror:
                self._synced[mirror] = rules
                self._pushed_at[mirror] = now
            else:
                for d in deleted:
                    self._synced.pop(d, None)
                    self._pushed_at.pop(d, None)
        if errors:
            self._failing = errors[0]  # (the retries sweep stale mirrors too; recovery is logged)
        return errors

    async def _push(self, stale: bool = False, listed: list[bytes] | None = None) -> tuple[int, int, int]:
        """Push ``_users`` (the newest users, if any) where Redis lacks them; (set, deleted, errors)."""
        users = self._users
        if users is None:
            return 0, 0, 0
        self._users = None
        try:
            commands, names, deleted = await asyncio.to_thread(self._plan, users)
            if stale:  # (at start, or after a failure: Redis may hold mirrors of users that are gone)
                if listed is None:
                    listed = await self._acl_users()
                keep = {self.mirror_name(n) for n, _ in users} | self.protected | set(deleted)
                gone = [u for u in (x.decode("utf-8", "surrogateescape") for x in listed)
                        if u.startswith(self.prefix) and u not in keep]  # fmt: skip
                deleted += gone
            for i in range(0, len(deleted), BATCH):
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in deleted[i:i + BATCH])])
                names.append(("", ""))
            errors = 0
            for i in range(0, len(commands), BATCH):
                replies = await self._request(commands[i:i + BATCH])
                errors += len(self._took(names[i:i + BATCH], commands[i:i + BATCH], replies))
        except BaseException:
            if self._users is None:
                self._users = users  # try this change again (unless a newer one is waiting)
            raise
        if errors:
            self._retry()
        elif self._failing:
            log.info("mirror_sync_recovered", upstream=self.config.upstream.where)
            self._failing = ""
        return sum(1 for n in names if n[0]), len(deleted), errors

    @staticmethod
    def _synced_log(counts: tuple[int, int, int]) -> None:
        if any(counts):
            log.info("mirror_users_synced", set=counts[0], deleted=counts[1], errors=counts[2])

    async def _acl_users(self) -> list[bytes]:
        (listed,) = await self._request([[b"ACL", b"USERS"]])
        if isinstance(listed, hiredis.ReplyError):
            raise ConnectionError(f"ACL USERS: {listed}")
        return list(listed)

    # -- Redis is the truth: verifying the mirrors -------------------------------------------------
    def verify(self, reason: str, full: bool = True) -> asyncio.Future[bool]:
        """Check that Redis still has every mirror as pushed and push again what it lacks (``reason``:
        one of metrics.MIRROR_RESYNC_REASONS). ``full``: also log in as each mirror, else names only.

        Coalesced: the answer comes from a check that starts after this call (one that already read
        Redis may have missed what the caller saw), shared by every caller until it starts; checks
        start at most one per VERIFY_GAP. The future (shield it before a timeout) says whether Redis
        could be asked."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next_reason, self._next_full = reason, full
            self._verifying = asyncio.ensure_future(self._verify())
        elif full and not self._next_full:  # a names-only check not started yet becomes a full one
            self._next_reason, self._next_full = reason, True
        return self._next

    async def _verify(self) -> None:
        loop = asyncio.get_running_loop()
        fut = self._next
        assert fut is not None
        try:
            await asyncio.sleep(self._verify_began + VERIFY_GAP - loop.time())
            async with self._lock:  # (behind a push or check under way)
                self._next = None  # from now on a caller needs the check after this one
                self._verify_began = loop.time()
                await asyncio.wait_for(self._resync(self._next_reason, self._next_full), TIMEOUT * 3)
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
            self._failed(e)
            fut.set_result(False)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:  # never leave the callers waiting on a bug
            log.error("internal_error", message="verifying the mirror users failed", error=repr(e))
            fut.set_result(False)
        else:
            fut.set_result(True)
        finally:
            if self._next is fut:
                self._next = None

    async def _resync(self, reason: str, full: bool) -> None:
        began = time.monotonic()
        users = self._users if self._users is not None else self._current  # the newest users
        listed = await self._acl_users()
        lost, stale, probes = await asyncio.to_thread(self._compare, users, listed, full)
        refused: list[str] = []  # there, but not on or not with our password, so not with our rules
        for i in range(0, len(probes), BATCH):  # full: exists, on, and takes our password?
            batch = probes[i:i + BATCH]
            replies = await self._request([cmd for _, cmd in batch])
            refused += [m for (m, _), r in zip(batch, replies, strict=True) if isinstance(r, hiredis.ReplyError)]
        if not lost and not refused and not stale:
            if self._users is not None:  # a retry waits out its delay: whoever asked for this check needs it now
                self._synced_log(await self._push(stale=bool(self._failing)))
            return
        self._contested(refused)
        lost += refused
        for m in lost:
            self._synced.pop(m, None)
        if self._users is None:
            self._users = users
        pushed, deleted, errors = await self._push(stale=full, listed=listed)
        if self.metrics is not None:
            self.metrics.mirror_resyncs.labels(reason).inc()
            self.metrics.mirrors_recreated.inc(len(lost))
        log.warning("mirror_resync", reason=reason, upstream=self.config.upstream.where, recreated=len(lost),
                    deleted=deleted, set=pushed, errors=errors, seconds=round(time.monotonic() - began, 3),
                    mirrors=[printable_name(m) for m in (lost or stale)[:LOG_NAMES]],
                    detail="Redis no longer had these mirror users as pushed (a restart, ACL LOAD or failover?): "
                    "pushed them again")  # fmt: skip

    def _contested(self, refused: Sequence[str]) -> None:
        """Mirrors we pushed a moment ago that Redis has with another password (other rules, or another
        key): most likely another redisguard instance in front of this Redis with other users or other
        service credentials, each pushing its own over the other's."""
        now = time.monotonic()
        contested = [m for m in refused if now - self._pushed_at.get(m, -CONTEST_WINDOW) < CONTEST_WINDOW]
        if not contested:
            return
        if self.metrics is not None:
            self.metrics.mirrors_contested.inc(len(contested))
        log.warning("mirror_contested", upstream=self.config.upstream.where, contested=len(contested),
                    mirrors=[printable_name(m) for m in contested[:LOG_NAMES]], window=CONTEST_WINDOW,
                    detail="Redis has these mirror users with other rules or another password less than a minute "
                    "after we pushed them: is another redisguard instance in front of this Redis with another users "
                    "file or other service credentials? Several instances must share both (docs/security.md); "
                    "pushing ours again")  # fmt: skip

    def _compare(self, users: list[tuple[str, User]], listed: list[bytes], full: bool
                 ) -> tuple[list[str], list[str], list[tuple[str, list[bytes]]]]:  # fmt: skip
        """(in a worker thread) Against Redis's ``ACL USERS``: the pushed mirrors it lacks, the
        ``<prefix>*`` users it has that are no mirror of ours and an AUTH to try as each pushed mirror it
        has (these two when ``full``)."""
        present = {x.decode("utf-8", "surrogateescape") for x in listed}
        synced = self._synced
        wanted = {m: u for n, u in users if (m := self.mirror_name(n)) not in self.protected}
        lost = [m for m in wanted if m in synced and m not in present]
        stale = [u for u in present if u.startswith(self.prefix) and u not in wanted and u not in self.protected
                 ] if full else []  # (workers mid-reload may differ for a moment: left to the full checks)
        probes = [(m, [b"AUTH", m.encode("utf-8", "surrogateescape"), self.password(u.name, self.rules_text(u)).encode()])
                  for m, u in wanted.items() if m in synced and m in present] if full else []  # fmt: skip
        return lost, stale, probes

    def _plan(self, users: list[tuple[str, User]]) -> tuple[list[list[bytes]], list[tuple[str, str]], list[str]]:
        """(in a worker thread) The ACL SETUSERs for users whose rules Redis does not have yet, and the
        mirrors of users that are gone."""
        commands: list[list[bytes]] = []
        names: list[tuple[str, str]] = []
        for name, user in users:
            if self.mirror_name(name) in self.protected:  # (refused at start: never overwrite the service user)
                continue
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

