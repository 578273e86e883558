"""The config as the rest of redisguard reads it: frozen dataclasses, built once by :mod:`.parse`.

Defaults come from the declarations (:mod:`.options`, ``D``): an option's default is written once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from redisguard.config.options import default as D
from redisguard.config.options import split_address


class ConfigError(ValueError):
    pass


# The TLS 1.3 cipher suites (RFC 8446) by their OpenSSL/IANA names.
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
                "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256")  # fmt: skip
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TLSFiles:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    crl_file: Path | None = None  # PEM CRL(s) of the client CA: revoked client certificates fail the handshake


@dataclass(frozen=True)
class TLSPolicy:
    """A TLS listener's protocol policy (see tls.server_context for what each one sets)."""

    min_version: str = D("listener", "min_version")  # "1.2" | "1.3"
    ciphers: str = D("listener", "ciphers")  # OpenSSL cipher string for TLS 1.2 ("" = Python's default)
    ciphersuites: tuple[str, ...] = ()  # TLS 1.3: validated only (Python's ssl cannot choose them)
    ecdh_curves: tuple[str, ...] = ()  # at most one key-exchange group (Python's set_ecdh_curve); () = OpenSSL's list
    session_tickets: bool = D("listener", "session_tickets")


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    type: str
    host: str = ""
    port: int = 0
    path: Path | None = None  # unix socket
    socket_mode: int = int(D("listener", "socket_mode"), 8)
    tls: TLSFiles | None = None
    client_auth: str = D("listener", "client_auth")
    # How a verified client certificate names a user: "cn", "san_dns" or "san_uri"; "" = no mapping.
    cert_user: str = D("listener", "cert_user")
    allow_insecure_remote: bool = D("listener", "allow_insecure_remote")
    allowed_sources: tuple[Network, ...] = ()
    max_connections: int = D("listener", "max_connections")
    tls_policy: TLSPolicy = TLSPolicy()
    # A verified client certificate that logs in as no user: "default" (the connection goes on as
    # the default user) or "refuse" (it is closed after the handshake).
    unmapped_cert: str = D("listener", "unmapped_cert")
    # PROXY protocol v1/v2 (a load balancer in front): every connection must start with a header, and is
    # accepted only from proxy_sources ("unix": any peer of a unix listener); the header's address is
    # then the client's for allowed_sources, user_sources, throttling, limits and the audit log.
    proxy_protocol: bool = D("listener", "proxy_protocol")
    proxy_sources: tuple[Network | str, ...] = ()

    @property
    def where(self) -> str:
        return str(self.path) if self.type == "unix" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = split_address(D("upstream", "address"))[0]
    port: int = split_address(D("upstream", "address"))[1]
    path: Path | None = None
    username: str = D("upstream", "username")
    password: str = field(default="", repr=False)
    tls: bool = D("upstream", "tls")
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_server_name: str = D("upstream", "tls_server_name")
    connect_timeout: float = D("upstream", "connect_timeout")
    fetch_command_table: bool = D("upstream", "fetch_command_table")
    health_check_interval: float = D("upstream", "health_check_interval")
    # "service": every client's upstream connection logs in as `username`; "mirror": as the Redis ACL
    # user redisguard keeps for its user (<mirror_prefix><name>, same rules), so Redis enforces them too;
    # "auto" (the default): "mirror" if the service user may manage Redis ACL users, else "service".
    identity: str = D("upstream", "identity")
    mirror_prefix: str = D("upstream", "mirror_prefix")
    # Service identity: scripts (EVAL*, FCALL*, FUNCTION LOAD/RESTORE) of users narrower than the service
    # user are refused ("refuse"), or run with the service user's rights ("allow": the operator's risk).
    service_scripts: str = D("upstream", "service_scripts")
    # What "auto" resolved to at start-up (upstream.service.resolve, once, before any worker forks); not an option.
    resolved_identity: str = ""
    # Send a PROXY v2 header first on every upstream connection (for an intermediate proxy in front of
    # Redis: Redis itself does not accept PROXY headers).
    proxy_protocol: bool = D("upstream", "proxy_protocol")

    @property
    def where(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    @property
    def effective_identity(self) -> str:
        """"service" or "mirror": as configured, or as "auto" resolved (unresolved: "service", the
        identity whose scripts rule needs nothing from Redis)."""
        identity = self.resolved_identity or self.identity
        return identity if identity != "auto" else "service"


def mirror_prefix_conflict(up: UpstreamConfig) -> str | None:
    """Mirror mode owns every Redis user named ``<mirror_prefix>...`` (it overwrites them and deletes the
    stale ones): the service user must not be one of them, or a redisguard user could overwrite it."""
    service = up.username or "default"  # (AUTH with a password only logs in as Redis's default user)
    if not service.startswith(up.mirror_prefix):
        return None
    return (f"the service user {service!r} ([upstream] username) starts with mirror_prefix {up.mirror_prefix!r}, so "
            "redisguard would overwrite or delete it as a mirror user; choose a mirror_prefix it does not start with")


@dataclass(frozen=True)
class ACLConfig:
    users_file: Path
    disabled_commands: tuple[str, ...] = ()
    # Redis's enable-debug-command / enable-module-command: "no" | "yes" | "local" (loopback and unix
    # socket clients of redisguard; Redis itself sees every proxied client as local).
    enable_debug_command: str = D("acl", "enable_debug_command")
    enable_module_command: str = D("acl", "enable_module_command")
    # Users (Redis glob patterns) who may log in only with a client certificate: AUTH as them is refused.
    cert_only: tuple[str, ...] = ()
    # Per user, the networks a login (password or certificate) may come from ("unix": unix-socket clients).
    user_sources: tuple[tuple[str, tuple[Network | str, ...]], ...] = ()
    # "audit": what the policy would deny is forwarded anyway, logged as would_deny and counted with
    # mode="audit" (least-privilege roll-out); audit_users: the users (Redis globs) in audit mode when
    # the mode is "enforce".
    mode: str = D("acl", "mode")
    audit_users: tuple[str, ...] = ()
    reload_guard: bool = D("acl", "reload_guard")  # refuse a reload whose users would deny traffic in the [profile]


@dataclass(frozen=True)
class ProfileConfig:
    """The traffic profile (commands, key patterns, channels per user) behind `redisguard acl suggest`."""

    file: Path | None = None  # None: no profile is kept
    interval: float = D("profile", "interval")  # seconds between writes of the file (and at shutdown)


@dataclass(frozen=True)
class LimitsConfig:
    handshake_timeout: float = D("limits", "handshake_timeout")
    auth_timeout: float = D("limits", "auth_timeout")  # a connection must authenticate (or send a command) within this
    idle_timeout: float = D("limits", "idle_timeout")  # 0 = never, like Redis's "timeout 0"
    max_request_bytes: int = D("limits", "max_request_bytes")
    auth_failures_per_minute: float = D("limits", "auth_failures_per_minute")
    max_pending_handshakes: int = D("limits", "max_pending_handshakes")
    max_handshakes_per_source: int = D("limits", "max_handshakes_per_source")  # the same, per source address
    fd_reserve: int = D("limits", "fd_reserve")  # stop accepting when fewer file descriptors than this remain unpromised
    memory_trim_interval: float = D("limits", "memory_trim_interval")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = D("metrics", "enabled")
    host: str = split_address(D("metrics", "address"))[0]
    port: int = split_address(D("metrics", "address"))[1]
    node: str = D("metrics", "node")  # a `node` label on every series (one sidecar per Redis Cluster node); "" = none


@dataclass(frozen=True)
class LogConfig:
    format: str = D("log", "format")  # auto | json | console
    level: str = D("log", "level")
    audit_keys: bool = D("log", "audit_keys")  # include key names in command_denied events (values never)
    audit_denied_per_second: float = D("log", "audit_denied_per_second")  # rate limit for command_denied / auth_failure events
    audit_connections_per_second: float = D("log", "audit_connections_per_second")


@dataclass(frozen=True)
class ServerConfig:
    # Worker processes (see redisguard.runtime.supervisor): 1 = today's single process, no supervisor.
    workers: int = D("server", "workers")
    # SIGTERM/SIGINT: /readyz turns unready, listeners close, clients finish what they sent and are
    # closed once answered and quiet; whoever is still there after this many seconds is cut.
    drain_timeout: float = D("server", "drain_timeout")
    # Reload (as SIGHUP does) when the users file, a certificate, key, CA or CRL, or the config changes
    # (checked every reload_interval seconds; 0 = only on SIGHUP).
    reload_interval: float = D("server", "reload_interval")
    # ... once every watched file has stayed the same (size, mtime, inode, content) for this many seconds:
    # a file still being written is never loaded (a writer that pauses longer must replace files by rename).
    reload_settle: float = D("server", "reload_settle")


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstream: UpstreamConfig
    acl: ACLConfig
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    profile: ProfileConfig = ProfileConfig()
    source: Path | None = None
    server: ServerConfig = ServerConfig()


