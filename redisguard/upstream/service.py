"""Which identity the upstream connections log in as, and what the service user may do.

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
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hiredis

from redisguard.acl import ACLError, User, new_user
from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.observe.audit import get_logger
from redisguard.policy.decide import Shared, script_callable, service_may_run
from redisguard.upstream.client import TIMEOUT, queued, upstream_replies
from redisguard.upstream.mirror_users import mirror_rules

log = get_logger("redisguard")

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


def ask_again(shared: Shared, config: Config, first: BaseException) -> None:
    """Start :func:`await_service_rights` in the background (held until done)."""
    _background.add(task := asyncio.ensure_future(await_service_rights(shared, config, first)))
    task.add_done_callback(_background.discard)
