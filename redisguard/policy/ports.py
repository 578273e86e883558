"""What the policy layer needs from layers above it, stated as Protocols they implement.

The policy holds the mirror identity (upstream/) and the traffic profile (observe/), and observers are
told about clients (session/): each is a value handed in from above. Declaring here only what is called
keeps the import arrows pointing down (the house's rule: no cycle, not even under TYPE_CHECKING)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Protocol

from redisguard.acl import User
from redisguard.commands.table import Command


class ClientInfo(Protocol):
    """What an observer reads of a client (a session): who, from where, through which listener."""


    @property
    def user(self) -> User: ...
    @property
    def listener(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def tls_identity(self) -> str: ...
    @property
    def policy(self) -> PolicyView: ...
    def last_keys(self) -> list[str]: ...


class Mirror(Protocol):
    """Mirror identity (upstream/identity.py): each user logs in upstream as its own Redis ACL user."""

    refused: Sequence[str]  # what redisguard refuses to everyone, taken from every mirror too

    def auth(self, user: User) -> bytes: ...
    def users_changed(self, users: dict[str, User]) -> None: ...
    def verify(self, reason: str) -> Awaitable[bool]: ...  # (a future the caller need not await)


class PolicyView(Protocol):
    """The part of the policy in force an observer reads."""

    @property
    def mirror(self) -> Mirror | None: ...


class Observer(Protocol):
    """What a session reports; metrics and audit implement it (no-ops by default)."""

    def command(self, client: ClientInfo, cmd: str, allowed: bool, reason: str) -> None: ...
    def allowed(self, labels: list[tuple[str, str]]) -> None: ...
    def would_deny(self, client: ClientInfo, cmd: str, reason: str) -> None: ...
    def upstream_auth_failed(self, client: ClientInfo) -> None: ...
    def auth(self, client: ClientInfo, ok: bool, username: str, reason: str, method: str) -> None: ...
    def reply_latency(self, seconds: float) -> None: ...
    def throttled(self, client: ClientInfo, delay: float) -> None: ...


class NullObserver:
    """The observer of sessions nobody watches (unit tests, one-off tools)."""

    def command(self, client: ClientInfo, cmd: str, allowed: bool, reason: str) -> None:
        pass

    def allowed(self, labels: list[tuple[str, str]]) -> None:
        pass

    def would_deny(self, client: ClientInfo, cmd: str, reason: str) -> None:
        pass

    def upstream_auth_failed(self, client: ClientInfo) -> None:
        pass

    def auth(self, client: ClientInfo, ok: bool, username: str, reason: str, method: str) -> None:
        pass

    def reply_latency(self, seconds: float) -> None:
        pass

    def throttled(self, client: ClientInfo, delay: float) -> None:
        pass


class ProfileRecorder(Protocol):
    """The traffic profile (observe/profile.py): what each user used, for ``acl suggest``."""

    @property
    def users(self) -> Mapping[str, object]: ...
    def record(self, user: str, cmd: Command, argv: Sequence[bytes], keys: Iterable[tuple[int, int]],
               channels: Iterable[tuple[int, bool]]) -> None: ...  # fmt: skip
    def forget(self, names: Iterable[str]) -> None: ...
