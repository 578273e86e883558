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

The modules of it: which identity, and the service user's rights (:mod:`~redisguard.upstream.service`);
in mirror identity what a mirror user is (:mod:`~redisguard.upstream.mirror_users`), keeping Redis in
step with them (:mod:`~redisguard.upstream.mirror_sync`) and checking it still is
(:mod:`~redisguard.upstream.mirror_verify`). :class:`MirrorIdentity` holds the last three.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from redisguard.acl import User
from redisguard.config.model import Config, ConfigError, mirror_prefix_conflict
from redisguard.observe.audit import get_logger
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import LoginRules, Shared, refused_commands
from redisguard.upstream.mirror_sync import MirrorSync
from redisguard.upstream.mirror_users import PROCESS_KEY, MirrorUsers, mirror_key
from redisguard.upstream.mirror_verify import MirrorVerifier
from redisguard.upstream.service import UNREACHABLE, ask_again, resolve, service_user

log = get_logger("redisguard")


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
            ask_again(shared, config, down)
    shared.policy = policy
    return mirror


class MirrorIdentity:
    """The mirror users, as the policy holds them (policy.ports.Mirror): each user's AUTH, the pushes, the checks."""

    def __init__(self, config: Config, key: bytes | None = None, metrics: Metrics | None = None) -> None:
        conflict = mirror_prefix_conflict(config.upstream)
        if conflict:  # (the config parser refuses it too; this holds however the mode was chosen)
            raise ConfigError(f"upstream.mirror_prefix: {conflict}")
        self.mirrors = MirrorUsers(config, key)
        self.sync = MirrorSync(config, self.mirrors, metrics)
        self.verifier = MirrorVerifier(self.sync)

    @property
    def refused(self) -> Sequence[str]:
        """Taken from every mirror (mirror_rules); set by install and Shared.swap."""
        return self.mirrors.refused

    @refused.setter
    def refused(self, value: Sequence[str]) -> None:
        self.mirrors.refused = value

    def auth(self, user: User) -> bytes:
        return self.mirrors.auth(user)

    async def start(self, users: dict[str, User]) -> None:
        await self.sync.start(users)

    def users_changed(self, users: dict[str, User]) -> None:
        self.sync.users_changed(users)

    async def apply(self, users: dict[str, User], changed: set[str] | None, deleted: Sequence[str]) -> None:
        await self.sync.apply(users, changed, deleted)

    def verify(self, reason: str, full: bool = True) -> asyncio.Future[bool]:
        return self.verifier.verify(reason, full)
