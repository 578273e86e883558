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
from dataclasses import replace
from typing import Any

import hiredis

from .acl import User
from .acl.user import printable_name
from .audit import get_logger
from .config import Config
from .policy import LoginRules, Shared
from .resp import encode_command
from .upstream import upstream_replies

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
    """At start, before any client: the login rules, and in mirror mode the mirror users in Redis."""
    policy = replace(shared.policy, logins=login_rules(config))
    if config.upstream.identity == "mirror":
        mirror = MirrorIdentity(config, key=PROCESS_KEY)
        policy = replace(policy, mirror=mirror)
        await mirror.start(policy.users)
    shared.policy = policy


def mirror_rules(user: User) -> list[str]:
    """``user``'s rules as ACL SETUSER arguments, without its passwords and on/off (the mirror gets
    ``on`` and its own password): the canonical ``ACL LIST`` form of :meth:`User.describe`."""
    flags = [f for f in user.flags() if f not in ("on", "off", "nopass")]
    return [*flags, *user.root.describe().split(" "), *("(" + s.describe() + ")" for s in user.selectors[1:])]


class MirrorError(Exception):
    """Redis did not take a mirror user change: its error, or why it could not be reached (redacted)."""


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
        self._lock = asyncio.Lock()  # one push at a time: an older snapshot never lands after a newer change

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

    async def apply(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> None:
        """Push the mirrors of the ``changed`` users (None: of every user whose rules Redis lacks) and
        delete those of ``deleted``; return once Redis has them (ACL SETUSER/DELUSER/LOAD answer then).
        Raises MirrorError if Redis refuses or cannot be reached within TIMEOUT."""
        async with self._lock:
            if changed is None:
                commands, names, gone = await asyncio.to_thread(self._plan, list(users.items()))
            else:
                commands, names, gone = [], [], [self.mirror_name(n) for n in deleted]
                for name in sorted(changed):
                    if name in users:
                        args = mirror_rules(users[name])
                        commands.append(self.setuser(users[name], args))
                        names.append((self.mirror_name(name), " ".join(args)))
            if gone:
                commands.append([b"ACL", b"DELUSER", *(d.encode("utf-8", "surrogateescape") for d in gone)])
                names.append(("", ""))
            errors = []
            try:
                for i in range(0, len(commands), BATCH):
                    replies = await asyncio.wait_for(self._request(commands[i:i + BATCH]), TIMEOUT)
                    for (mirror, rules), reply in zip(names[i:i + BATCH], replies, strict=True):
                        if isinstance(reply, hiredis.ReplyError):
                            errors.append(_redact(str(reply)))
                        elif mirror:
                            self._synced[mirror] = rules
            except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
                self._failed(e)
                raise MirrorError(_redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)) from e
            for d in gone:
                self._synced.pop(d, None)
            if errors:
                log.error("mirror_user_failed", error=errors[0], errors=len(errors))
                raise MirrorError(errors[0])

    async def _push(self, stale: bool = False) -> None:
        async with self._lock:  # (read self._users under it: the newest snapshot)
            await self._push_locked(stale)

    async def _push_locked(self, stale: bool) -> None:
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
            rules = mirror_rules(user)
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

