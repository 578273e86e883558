"""Configuration: one TOML file → frozen dataclasses, validated once, passed down.

Every error names the key and the fix (``ConfigError: listener[0].address: ...``). Relative paths
are resolved against the config file's directory, so a config and its users file and certificates
can move together.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ConfigError(ValueError):
    pass


LISTENER_TYPES = ("tls", "tcp", "unix")
CLIENT_AUTH = ("none", "optional", "required")
CERT_IDENTITIES = ("cn", "san_dns", "san_uri")
TLS_VERSIONS = ("1.2", "1.3")
UNMAPPED_CERT = ("default", "refuse")
UPSTREAM_IDENTITIES = ("auto", "service", "mirror")
SERVICE_SCRIPTS = ("refuse", "allow")
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

    min_version: str = "1.2"  # "1.2" | "1.3"
    ciphers: str = ""  # OpenSSL cipher string for TLS 1.2 ("" = Python's default)
    ciphersuites: tuple[str, ...] = ()  # TLS 1.3: validated only (Python's ssl cannot choose them)
    ecdh_curves: tuple[str, ...] = ()  # at most one key-exchange group (Python's set_ecdh_curve); () = OpenSSL's list
    session_tickets: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    type: str
    host: str = ""
    port: int = 0
    path: Path | None = None  # unix socket
    socket_mode: int = 0o660
    tls: TLSFiles | None = None
    client_auth: str = "none"
    # How a verified client certificate names a user: "cn", "san_dns" or "san_uri"; "" = no mapping.
    cert_user: str = ""
    allow_insecure_remote: bool = False
    allowed_sources: tuple[Network, ...] = ()
    max_connections: int = 10000
    tls_policy: TLSPolicy = TLSPolicy()
    # A verified client certificate that logs in as no user: "default" (the connection goes on as
    # the default user) or "refuse" (it is closed after the handshake).
    unmapped_cert: str = "default"
    # PROXY protocol v1/v2 (a load balancer in front): every connection must start with a header, and is
    # accepted only from proxy_sources ("unix": any peer of a unix listener); the header's address is
    # then the client's for allowed_sources, user_sources, throttling, limits and the audit log.
    proxy_protocol: bool = False
    proxy_sources: tuple[Network | str, ...] = ()

    @property
    def where(self) -> str:
        return str(self.path) if self.type == "unix" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    path: Path | None = None
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_server_name: str = ""
    connect_timeout: float = 2.0
    fetch_command_table: bool = True
    health_check_interval: float = 5.0  # seconds between PINGs that keep redisguard_upstream_up current; 0 = off
    # "service": every client's upstream connection logs in as `username`; "mirror": as the Redis ACL
    # user redisguard keeps for its user (<mirror_prefix><name>, same rules), so Redis enforces them too;
    # "auto" (the default): "mirror" if the service user may manage Redis ACL users, else "service".
    identity: str = "auto"
    mirror_prefix: str = "rg:"
    # Service identity: scripts (EVAL*, FCALL*, FUNCTION LOAD/RESTORE) of users narrower than the service
    # user are refused ("refuse"), or run with the service user's rights ("allow": the operator's risk).
    service_scripts: str = "refuse"
    # What "auto" resolved to at start-up (identity.resolve, once, before any worker forks); not an option.
    resolved_identity: str = ""
    # Send a PROXY v2 header first on every upstream connection (for an intermediate proxy in front of
    # Redis: Redis itself does not accept PROXY headers).
    proxy_protocol: bool = False

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
    enable_debug_command: str = "upstream"  # "upstream": the upstream Redis's own setting (CONFIG GET at start)
    enable_module_command: str = "upstream"
    # Users (Redis glob patterns) who may log in only with a client certificate: AUTH as them is refused.
    cert_only: tuple[str, ...] = ()
    # Per user, the networks a login (password or certificate) may come from ("unix": unix-socket clients).
    user_sources: tuple[tuple[str, tuple[Network | str, ...]], ...] = ()
    # "audit": what the policy would deny is forwarded anyway, logged as would_deny and counted with
    # mode="audit" (least-privilege roll-out); audit_users: the users (Redis globs) in audit mode when
    # the mode is "enforce".
    mode: str = "enforce"
    audit_users: tuple[str, ...] = ()
    reload_guard: bool = False  # refuse a reload whose users would deny traffic in the [profile]


@dataclass(frozen=True)
class ProfileConfig:
    """The traffic profile (commands, key patterns, channels per user) behind `redisguard acl suggest`."""

    file: Path | None = None  # None: no profile is kept
    interval: float = 60.0  # seconds between writes of the file (and at shutdown)


@dataclass(frozen=True)
class LimitsConfig:
    handshake_timeout: float = 10.0
    auth_timeout: float = 10.0  # a connection must authenticate (or send a command) within this
    idle_timeout: float = 0.0  # 0 = never, like Redis's "timeout 0"
    max_request_bytes: int = 512 * 1024 * 1024 + 64 * 1024
    auth_failures_per_minute: float = 20.0  # per source; past it each AUTH waits before its check (0 = off)
    max_pending_handshakes: int = 1024  # TLS handshakes in progress, all listeners; over it new sockets are closed
    max_handshakes_per_source: int = 64  # the same, per source address
    fd_reserve: int = 64  # stop accepting when fewer file descriptors than this remain unpromised
    memory_trim_interval: float = 5.0  # seconds between malloc_trim(0) checks after connections closed; 0 = never


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9187
    node: str = ""  # a `node` label on every series (one sidecar per Redis Cluster node); "" = none


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"
    audit_keys: bool = False  # include key names in command_denied events (values never)
    audit_denied_per_second: float = 100.0  # rate limit for command_denied / auth_failure events
    audit_connections_per_second: float = 100.0  # rate limit per connection event (accepted, rejected, ...)


MAX_WORKERS = 64


@dataclass(frozen=True)
class ServerConfig:
    # Worker processes (see redisguard.runtime.supervisor): 1 = today's single process, no supervisor.
    workers: int = 1
    # SIGTERM/SIGINT: /readyz turns unready, listeners close, clients finish what they sent and are
    # closed once answered and quiet; whoever is still there after this many seconds is cut.
    drain_timeout: float = 25.0
    # Reload (as SIGHUP does) when the users file, a certificate, key, CA or CRL, or the config changes
    # (checked every reload_interval seconds; 0 = only on SIGHUP).
    reload_interval: float = 0.0
    # ... once every watched file has stayed the same (size, mtime, inode, content) for this many seconds:
    # a file still being written is never loaded (a writer that pauses longer must replace files by rename).
    reload_settle: float = 1.0


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


# --------------------------------------------------------------------------------------------------

# Every key each table accepts: an unknown key (a typo like ``cert_fiel``) is reported as such before
# anything else, so it is never mistaken for a missing one. (``_Section.done`` double-checks.)
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "": ("server", "listener", "upstream", "acl", "limits", "metrics", "log", "profile"),
    "server": ("workers", "drain_timeout", "reload_interval", "reload_settle"),
    "listener": ("name", "type", "address", "path", "socket_mode", "cert_file", "key_file", "ca_file", "client_auth",
                 "cert_user", "allow_insecure_remote", "allowed_sources", "max_connections", "min_version", "ciphers",
                 "ciphersuites", "ecdh_curves", "session_tickets", "crl_file", "unmapped_cert",
                 "proxy_protocol", "proxy_sources"),
    "upstream": ("address", "path", "username", "password", "password_file", "password_env", "tls", "tls_ca_file",
                 "tls_cert_file", "tls_key_file", "tls_server_name", "connect_timeout", "fetch_command_table",
                 "health_check_interval", "identity", "mirror_prefix", "service_scripts", "proxy_protocol"),
    "acl": ("users_file", "disabled_commands", "enable_debug_command", "enable_module_command", "cert_only",
            "user_sources", "mode", "audit_users", "reload_guard"),
    "profile": ("file", "interval"),
    "limits": tuple(LimitsConfig.__dataclass_fields__),
    "metrics": ("enabled", "address", "node"),
    "log": tuple(LogConfig.__dataclass_fields__),
}  # fmt: skip


def _table_name(kind: str) -> str:
    return "[[listener]]" if kind == "listener" else f"[{kind}]" if kind else "the top level"


def unknown_key_message(kind: str, key: str) -> str:
    """``unknown option in [[listener]] (did you mean cert_file?)`` for a key the table does not have."""
    known = KNOWN_KEYS[kind]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
    return f"unknown option in {_table_name(kind)} ({hint})"


class _Section:
    """Typed access to one TOML table that remembers its key path and rejects unknown keys."""

    def __init__(self, data: Any, where: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table")
        self.data = data
        self.where = where
        self.base = base
        self.used: set[str] = set()
        kind = re.sub(r"\[\d+\]$", "", where)
        for key in data:
            if kind in KNOWN_KEYS and key not in KNOWN_KEYS[kind]:
                raise ConfigError(f"{self._key(key)}: {unknown_key_message(kind, key)}")

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        v = self.data[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise ConfigError(f"{self._key(key)}: expected {name}, got {type(v).__name__} {v!r}")
        return v

    def path(self, key: str, default: Path | None = None) -> Path | None:
        v = self.get(key, str)
        if v is None:
            return default
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.get(key, str, default)
        if v not in choices:
            raise ConfigError(f"{self._key(key)}: must be one of {', '.join(choices)}; got {v!r}")
        return v

    def section(self, key: str) -> _Section:
        return _Section(self.get(key, dict, {}), self._key(key), self.base)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise ConfigError(f"{self._key(extra[0])}: unknown option (check the spelling)")

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self._key(key)}: {msg}")


def _host_port(sec: _Section, key: str, default_port: int | None = None) -> tuple[str, int]:
    addr = sec.get(key, str)
    if addr is None:
        raise sec.fail(key, 'required (host:port, e.g. "127.0.0.1:6380")')
    host, sep, port_s = addr.rpartition(":")
    if not sep:
        if default_port is None:
            raise sec.fail(key, f"expected host:port, got {addr!r}")
        host, port_s = addr, str(default_port)
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise sec.fail(key, f"port must be a number, got {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise sec.fail(key, f"port out of range: {port}")
    return host or "0.0.0.0", port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret(sec: _Section, name: str) -> str:
    """A secret from ``<name>_file`` or ``<name>_env``; never inline in the config."""
    if name in sec.data:
        sec.used.add(name)
        raise sec.fail(name, f"do not put secrets in the config; use {name}_file or {name}_env")
    path = sec.path(f"{name}_file")
    env = sec.get(f"{name}_env", str)
    if path and env:
        raise sec.fail(f"{name}_file", f"set either {name}_file or {name}_env, not both")
    if path:
        try:
            return path.read_text().strip("\r\n")
        except OSError as e:
            raise sec.fail(f"{name}_file", f"cannot read {path}: {e.strerror}") from None
    if env:
        if env not in os.environ:
            raise sec.fail(f"{name}_env", f"environment variable {env} is not set")
        return os.environ[env]
    return ""


def _listener(sec: _Section, index: int, openssl: TLSSupport | None) -> ListenerConfig:
    typ = sec.choice("type", LISTENER_TYPES, "tls")
    name = sec.get("name", str, f"{typ}{index}")
    host, port, path = "", 0, None
    if typ == "unix":
        path = sec.path("path")
        if path is None:
            raise sec.fail("path", "required for a unix listener")
    else:
        host, port = _host_port(sec, "address")
    mode_s = sec.get("socket_mode", str, "660")
    try:
        socket_mode = int(mode_s, 8)
    except ValueError:
        raise sec.fail("socket_mode", f'octal permissions like "660", got {mode_s!r}') from None
    tls = None
    client_auth = sec.choice("client_auth", CLIENT_AUTH, "none")
    cert_user = sec.get("cert_user", str, "")
    if cert_user and cert_user not in CERT_IDENTITIES:
        raise sec.fail("cert_user", f"must be one of {', '.join(CERT_IDENTITIES)}; got {cert_user!r}")
    if typ == "tls":
        cert, key = sec.path("cert_file"), sec.path("key_file")
        if cert is None or key is None:
            raise sec.fail("cert_file", "a tls listener needs cert_file and key_file")
        ca = sec.path("ca_file")
        if client_auth != "none" and ca is None:
            raise sec.fail("ca_file", f"client_auth = {client_auth!r} needs ca_file (the client CA)")
        crl = sec.path("crl_file")
        if crl is not None and client_auth == "none":
            raise sec.fail("crl_file", 'a CRL checks client certificates: it needs client_auth = "optional" or "required"')
        tls = TLSFiles(cert, key, ca, crl)
        tls_policy = _tls_policy(sec, openssl)
        unmapped = sec.choice("unmapped_cert", UNMAPPED_CERT, "default")
        if unmapped != "default" and not cert_user:
            raise sec.fail("unmapped_cert", "only means something with cert_user set (certificates that name a user)")
    else:
        for k in ("cert_file", "key_file", "ca_file"):
            sec.get(k, str)
        for k in (*TLS_POLICY_KEYS, "crl_file", "unmapped_cert"):
            if k in sec.data:
                raise sec.fail(k, "only for a tls listener")
        if client_auth != "none" or cert_user:
            raise sec.fail("client_auth", "client certificates need a tls listener")
        tls_policy, unmapped = TLSPolicy(), "default"
    insecure = sec.get("allow_insecure_remote", bool, False)
    if typ == "tcp" and not _is_loopback(host) and not insecure:
        raise sec.fail(
            "address",
            f"a plaintext listener on {host} would expose Redis traffic unencrypted; bind it to "
            "127.0.0.1 or a unix socket, or set allow_insecure_remote = true",
        )
    sources = []
    for s in sec.get("allowed_sources", list, []):
        try:
            sources.append(ipaddress.ip_network(s, strict=False))
        except (ValueError, TypeError):
            raise sec.fail("allowed_sources", f"not a CIDR network: {s!r}") from None
    max_conn = sec.get("max_connections", int, 10000)
    if max_conn < 1:
        raise sec.fail("max_connections", "must be at least 1")
    proxy_protocol = sec.get("proxy_protocol", bool, False)
    proxy_sources = _proxy_sources(sec, typ, proxy_protocol)
    sec.done()
    return ListenerConfig(
        name=name, type=typ, host=host, port=port, path=path, socket_mode=socket_mode, tls=tls,
        client_auth=client_auth, cert_user=cert_user, allow_insecure_remote=insecure,
        allowed_sources=tuple(sources), max_connections=max_conn, tls_policy=tls_policy, unmapped_cert=unmapped,
        proxy_protocol=proxy_protocol, proxy_sources=proxy_sources,
    )  # fmt: skip


def _proxy_sources(sec: _Section, typ: str, enabled: bool) -> tuple[Network | str, ...]:
    """proxy_sources: the load balancers (CIDRs; "unix" on a unix listener) whose PROXY headers are trusted."""
    raw = sec.get("proxy_sources", list, [])
    if not enabled:
        if raw:
            raise sec.fail("proxy_sources", "only means something with proxy_protocol = true")
        return ()
    if not raw:
        raise sec.fail("proxy_sources", "required with proxy_protocol = true: the load balancers' addresses "
                       '(CIDRs, e.g. ["10.0.0.0/24"]) whose PROXY headers are trusted; a connection from '
                       'anywhere else is refused' + ('; on a unix listener, ["unix"]' if typ == "unix" else ""))  # fmt: skip
    out: list[Network | str] = []
    for s in raw:
        if s == "unix" and typ == "unix":
            out.append(s)
            continue
        try:
            out.append(ipaddress.ip_network(s, strict=False))
        except (ValueError, TypeError):
            hint = ' (or "unix")' if typ == "unix" else ""
            raise sec.fail("proxy_sources", f"not a CIDR network{hint}: {s!r}") from None
    return tuple(out)


TLS_POLICY_KEYS = ("min_version", "ciphers", "ciphersuites", "ecdh_curves", "session_tickets")


class TLSSupport(Protocol):
    """What this process's OpenSSL accepts (transport/tls.py's OpenSSLSupport): the config is checked
    against it so that a typo fails at start and in check-config, naming the key."""

    def ciphers_ok(self, ciphers: str) -> bool: ...
    def tls13_suites(self) -> tuple[str, ...]: ...
    def curve_ok(self, name: str) -> bool: ...


def _tls_policy(sec: _Section, openssl: TLSSupport | None) -> TLSPolicy:
    """min_version, ciphers, ciphersuites, ecdh_curves, session_tickets: each checked (with ``openssl``:
    against this process's OpenSSL too)."""
    version = sec.choice("min_version", TLS_VERSIONS, "1.2")
    ciphers = sec.get("ciphers", str, "")
    if ciphers and openssl is not None and not openssl.ciphers_ok(ciphers):
        raise sec.fail("ciphers", f"OpenSSL selects no cipher from {ciphers!r} (an OpenSSL cipher string for "
                       'TLS 1.2, e.g. "ECDHE+AESGCM:ECDHE+CHACHA20")')  # fmt: skip
    suites = sec.get("ciphersuites", list, [])
    for name in suites:
        if name not in TLS13_SUITES:
            raise sec.fail("ciphersuites", f"not a TLS 1.3 cipher suite: {name!r} (known: {', '.join(TLS13_SUITES)})")
    offered = openssl.tls13_suites() if openssl is not None else ()
    if suites and offered and sorted(set(suites)) != sorted(offered):
        raise sec.fail("ciphersuites", "Python's ssl module cannot choose TLS 1.3 cipher suites: this build always "
                       f"offers exactly {', '.join(offered)}. List those (to assert them) or leave ciphersuites out; "
                       "to restrict them for the whole process use OpenSSL's own config (OPENSSL_CONF with "
                       "`Ciphersuites = ...` in its system_default section; see docs/security.md)")  # fmt: skip
    curves = sec.get("ecdh_curves", list, [])
    if len(curves) > 1:
        raise sec.fail("ecdh_curves", "Python's ssl module can set one curve (set_ecdh_curve); list exactly one, "
                       'e.g. ["prime256v1"], or leave it out for OpenSSL\'s default list')  # fmt: skip
    for name in curves:
        if openssl is not None and not openssl.curve_ok(name):
            raise sec.fail("ecdh_curves", f"unknown elliptic curve {name!r} (e.g. prime256v1, secp384r1)")
    return TLSPolicy(version, ciphers, tuple(suites), tuple(curves),
                     sec.get("session_tickets", bool, True))  # fmt: skip


def _user_sources(acl: _Section) -> tuple[tuple[str, tuple[Network | str, ...]], ...]:
    """[acl.user_sources]: ``alice = ["10.0.0.0/8", "unix"]`` per user."""
    out = []
    for user, nets in acl.get("user_sources", dict, {}).items():
        key = f"user_sources.{user}"
        if not isinstance(nets, list) or not nets:
            raise acl.fail(key, 'a non-empty list of CIDR networks (or "unix"), e.g. ["10.0.0.0/8"]')
        parsed: list[Network | str] = []
        for s in nets:
            if s == "unix":
                parsed.append(s)
                continue
            try:
                parsed.append(ipaddress.ip_network(s, strict=False))
            except (ValueError, TypeError):
                raise acl.fail(key, f'not a CIDR network (or "unix"): {s!r}') from None
        out.append((user, tuple(parsed)))
    return tuple(out)


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None, tls: TLSSupport | None = None) -> Config:
    """The config in ``data`` (a parsed TOML document); ``tls``: check the TLS settings against OpenSSL too."""
    root = _Section(data, "", base)
    raw_listeners = root.get("listener", list, [])
    if not raw_listeners:
        raise ConfigError("listener: at least one [[listener]] is required")
    listeners = tuple(_listener(_Section(d, f"listener[{i}]", base), i, tls) for i, d in enumerate(raw_listeners))
    names = [lst.name for lst in listeners]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"listener: name {n!r} is used twice; names label metrics and must differ")

    up = root.section("upstream")
    path = up.path("path")
    if path is not None and "address" in up.data:
        raise up.fail("address", "set either address or path, not both")
    host, port = ("", 0) if path else _host_port(up, "address", 6379) if "address" in up.data else ("127.0.0.1", 6379)
    timeout = up.get("connect_timeout", float, 2.0)
    if timeout <= 0:
        raise up.fail("connect_timeout", "must be > 0 seconds")
    health = up.get("health_check_interval", float, UpstreamConfig.health_check_interval)
    if health < 0:
        raise up.fail("health_check_interval", "must not be negative (0 turns the periodic check off)")
    upstream = UpstreamConfig(
        host=host, port=port, path=path, username=up.get("username", str, ""),
        password=_secret(up, "password"), tls=up.get("tls", bool, False),
        tls_ca_file=up.path("tls_ca_file"), tls_cert_file=up.path("tls_cert_file"),
        tls_key_file=up.path("tls_key_file"), tls_server_name=up.get("tls_server_name", str, ""),
        connect_timeout=timeout, fetch_command_table=up.get("fetch_command_table", bool, True),
        health_check_interval=health, identity=up.choice("identity", UPSTREAM_IDENTITIES, "auto"),
        mirror_prefix=up.get("mirror_prefix", str, "rg:"),
        service_scripts=up.choice("service_scripts", SERVICE_SCRIPTS, "refuse"),
        proxy_protocol=up.get("proxy_protocol", bool, False),
    )  # fmt: skip
    if upstream.identity != "service" and not re.fullmatch(r"[!-~]{1,64}", upstream.mirror_prefix):
        raise up.fail("mirror_prefix", f"1 to 64 printable characters without spaces, got {upstream.mirror_prefix!r}")
    if upstream.identity == "mirror" and (conflict := mirror_prefix_conflict(upstream)):
        raise up.fail("mirror_prefix", conflict)
    up.done()

    acl = root.section("acl")
    users_file = acl.path("users_file")
    if users_file is None:
        raise acl.fail("users_file", "required: the users file in Redis ACL syntax")
    disabled = acl.get("disabled_commands", list, [])
    for c in disabled:
        if not isinstance(c, str) or not c or " " in c:
            raise acl.fail("disabled_commands", f"command names only, got {c!r}")
    protected = {}
    for key in ("enable_debug_command", "enable_module_command"):
        protected[key] = acl.get(key, str, "upstream")
        if protected[key] not in ("no", "yes", "local", "upstream"):
            raise acl.fail(key, f'"no", "yes", "local" or "upstream", got {protected[key]!r}')
    cert_only = acl.get("cert_only", list, [])
    for pattern in cert_only:
        if not isinstance(pattern, str) or not pattern:
            raise acl.fail("cert_only", f"user name patterns (Redis glob, e.g. \"svc-*\"), got {pattern!r}")
    audit_users = acl.get("audit_users", list, [])
    if not all(isinstance(u, str) and u for u in audit_users):
        raise acl.fail("audit_users", f"user names or Redis glob patterns, got {audit_users!r}")
    acl_cfg = ACLConfig(users_file, tuple(c.lower() for c in disabled), **protected, cert_only=tuple(cert_only),
                        user_sources=_user_sources(acl), mode=acl.choice("mode", ("enforce", "audit"), "enforce"),
                        audit_users=tuple(audit_users), reload_guard=acl.get("reload_guard", bool, False))  # fmt: skip
    acl.done()

    pr = root.section("profile")
    profile = ProfileConfig(pr.path("file"), pr.get("interval", float, 60.0))
    if profile.interval <= 0:
        raise pr.fail("interval", "must be positive (seconds)")
    pr.done()

    lim = root.section("limits")
    limits = LimitsConfig(
        handshake_timeout=lim.get("handshake_timeout", float, 10.0),
        auth_timeout=lim.get("auth_timeout", float, 10.0),
        idle_timeout=lim.get("idle_timeout", float, 0.0),
        max_request_bytes=lim.get("max_request_bytes", int, LimitsConfig.max_request_bytes),
        auth_failures_per_minute=lim.get("auth_failures_per_minute", float, 20.0),
        max_pending_handshakes=lim.get("max_pending_handshakes", int, LimitsConfig.max_pending_handshakes),
        max_handshakes_per_source=lim.get("max_handshakes_per_source", int, LimitsConfig.max_handshakes_per_source),
        fd_reserve=lim.get("fd_reserve", int, LimitsConfig.fd_reserve),
        memory_trim_interval=lim.get("memory_trim_interval", float, LimitsConfig.memory_trim_interval),
    )
    for k in ("handshake_timeout", "auth_timeout", "idle_timeout", "max_request_bytes", "auth_failures_per_minute",
              "fd_reserve", "memory_trim_interval"):  # fmt: skip
        if getattr(limits, k) < 0:
            raise lim.fail(k, "must not be negative")
    for k in ("max_pending_handshakes", "max_handshakes_per_source"):
        if getattr(limits, k) < 1:
            raise lim.fail(k, "must be at least 1")
    lim.done()

    met = root.section("metrics")
    mhost, mport = _host_port(met, "address") if "address" in met.data else ("127.0.0.1", 9187)
    metrics = MetricsConfig(enabled=met.get("enabled", bool, True), host=mhost, port=mport, node=met.get("node", str, ""))
    if metrics.node and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", metrics.node):
        raise met.fail("node", f"1 to 64 letters, digits or _.:- (a label value), got {metrics.node!r}")
    met.done()

    lg = root.section("log")
    log = LogConfig(
        format=lg.choice("format", ("auto", "json", "console"), "auto"),
        level=lg.choice("level", ("debug", "info", "warning", "error"), "info"),
        audit_keys=lg.get("audit_keys", bool, False),
        audit_denied_per_second=lg.get("audit_denied_per_second", float, 100.0),
        audit_connections_per_second=lg.get("audit_connections_per_second", float, 100.0),
    )
    for k in ("audit_denied_per_second", "audit_connections_per_second"):
        if getattr(log, k) <= 0:
            raise lg.fail(k, "must be > 0")
    lg.done()
    server = _server(root.section("server"), listeners)
    root.done()
    return Config(listeners, upstream, acl_cfg, limits, metrics, log, profile, source, server)


def _server(sec: _Section, listeners: tuple[ListenerConfig, ...]) -> ServerConfig:
    workers = sec.get("workers", (int, str), 1)
    if workers == "auto":
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise sec.fail("workers", f'a number of processes (1 to {MAX_WORKERS}) or "auto", got {workers!r}')
    if not 1 <= workers <= MAX_WORKERS:
        raise sec.fail("workers", f'must be 1 to {MAX_WORKERS} (or "auto": one per CPU), got {workers}')
    if workers > 1:
        for i, lst in enumerate(listeners):
            if lst.type != "unix" and lst.port == 0:
                raise ConfigError(f"listener[{i}].address: port 0 (any free port) cannot be shared by {workers} "
                                  "workers; give a port number")  # fmt: skip
    drain = sec.get("drain_timeout", float, ServerConfig.drain_timeout)
    if not 0 <= drain <= 3600:
        raise sec.fail("drain_timeout", f"seconds, 0 to 3600, got {drain}")
    interval = sec.get("reload_interval", float, 0.0)
    if interval < 0 or 0 < interval < 0.5:
        raise sec.fail("reload_interval", f"0 (off) or at least 0.5 seconds, got {interval}")
    settle = sec.get("reload_settle", float, ServerConfig.reload_settle)
    if not 0.1 <= settle <= 300:
        raise sec.fail("reload_settle", f"seconds, 0.1 to 300, got {settle}")
    sec.done()
    return ServerConfig(workers, drain, interval, settle)


def load_config(path: str | os.PathLike[str], text: bytes | None = None, tls: TLSSupport | None = None) -> Config:
    """The config file at ``path``; ``text``: its bytes as already read (a reload parses what it checked);
    ``tls``: as in :func:`parse_config` (serve and check-config pass OpenSSL's)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text() if text is None else text.decode())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse_config(data, p.resolve().parent, p, tls)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
