"""A parsed TOML document → :class:`~.model.Config`, each value checked, every error naming its key.

Pure: the TOML file and the secret files are read by the caller (:mod:`.load`), or through the
``secrets`` given. Types, defaults, choices and single-value checks come from the declarations
(:mod:`.options`); what involves several options is checked here. Relative paths are resolved against
the config file's directory, so a config and its users file and certificates can move together.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Protocol

from redisguard.config.model import (
    TLS13_SUITES,
    ACLConfig,
    Config,
    ConfigError,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    Network,
    ProfileConfig,
    ServerConfig,
    TLSFiles,
    TLSPolicy,
    UpstreamConfig,
    mirror_prefix_conflict,
)
from redisguard.config.options import KNOWN_KEYS, MAX_WORKERS, REQUIRED, TABLES, option, unknown_key_message

_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": float, "bool": bool, "list": list,
                                              "table": dict, "path": str, "address": str, "workers": (int, str)}  # fmt: skip
TLS_POLICY_KEYS = ("min_version", "ciphers", "ciphersuites", "ecdh_curves", "session_tickets")


class TLSSupport(Protocol):
    """What this process's OpenSSL accepts (transport/tls.py's OpenSSLSupport): the config is checked
    against it so that a typo fails at start and in check-config, naming the key."""

    def ciphers_ok(self, ciphers: str) -> bool: ...
    def tls13_suites(self) -> tuple[str, ...]: ...
    def curve_ok(self, name: str) -> bool: ...


class Secrets(Protocol):
    """Where ``password_file`` / ``password_env`` are read (config.load.LocalSecrets: the file system and
    the environment)."""

    def read_file(self, path: Path) -> str: ...  # OSError if it cannot be read
    def env(self, name: str) -> str | None: ...


class _Section:
    """Typed access to one TOML table that remembers its key path and rejects unknown keys."""

    def __init__(self, data: Any, where: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table")
        self.data = data
        self.where = where
        self.base = base
        self.used: set[str] = set()
        self.kind = re.sub(r"\[\d+\]$", "", where)
        for key in data:
            if self.kind in KNOWN_KEYS and key not in KNOWN_KEYS[self.kind]:
                raise ConfigError(f"{self._key(key)}: {unknown_key_message(self.kind, key)}")

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

    def value(self, key: str) -> Any:
        """The declared option ``key`` of this table: type-checked, its default if absent, its choices and
        check applied. Paths come resolved; a required option that is absent comes as None."""
        opt = option(self.kind, key)
        default = None if opt.default is REQUIRED else opt.default
        if isinstance(default, (list, dict)):
            default = type(default)()
        v = self.get(key, _TYPES[opt.kind], default)
        if opt.kind == "path" and v is not None:
            p = Path(v).expanduser()
            return p if p.is_absolute() else (self.base / p)
        if opt.choices and v not in opt.choices:
            raise self.fail(key, f"must be one of {', '.join(c for c in opt.choices if c)}; got {v!r}")
        if opt.check is not None and v is not None and (msg := opt.check(v)):
            raise self.fail(key, msg)
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
    addr = sec.value(key)
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


def _secret(sec: _Section, name: str, secrets: Secrets) -> str:
    """A secret from ``<name>_file`` or ``<name>_env``; never inline in the config."""
    if name in sec.data:
        sec.used.add(name)
        raise sec.fail(name, f"do not put secrets in the config; use {name}_file or {name}_env")
    path = sec.value(f"{name}_file")
    env = sec.value(f"{name}_env")
    if path and env:
        raise sec.fail(f"{name}_file", f"set either {name}_file or {name}_env, not both")
    if path:
        try:
            return secrets.read_file(path).strip("\r\n")
        except OSError as e:
            raise sec.fail(f"{name}_file", f"cannot read {path}: {e.strerror}") from None
    if env:
        value = secrets.env(env)
        if value is None:
            raise sec.fail(f"{name}_env", f"environment variable {env} is not set")
        return value
    return ""


def _networks(sec: _Section, key: str, values: list[Any], unix: bool, what: str = "not a CIDR network") -> list[Network | str]:
    """CIDR networks (and "unix" where ``unix``), each checked, the error naming ``key``."""
    out: list[Network | str] = []
    for s in values:
        if unix and s == "unix":
            out.append(s)
            continue
        try:
            out.append(ipaddress.ip_network(s, strict=False))
        except (ValueError, TypeError):
            raise sec.fail(key, f"{what}: {s!r}") from None
    return out


def _listener(sec: _Section, index: int, openssl: TLSSupport | None) -> ListenerConfig:
    typ = sec.value("type")
    name = sec.value("name") or f"{typ}{index}"
    host, port, path = "", 0, None
    if typ == "unix":
        path = sec.value("path")
        if path is None:
            raise sec.fail("path", "required for a unix listener")
    else:
        host, port = _host_port(sec, "address")
    mode_s = sec.value("socket_mode")
    try:
        socket_mode = int(mode_s, 8)
    except ValueError:
        raise sec.fail("socket_mode", f'octal permissions like "660", got {mode_s!r}') from None
    tls = None
    client_auth, cert_user = sec.value("client_auth"), sec.value("cert_user")
    if typ == "tls":
        cert, key = sec.value("cert_file"), sec.value("key_file")
        if cert is None or key is None:
            raise sec.fail("cert_file", "a tls listener needs cert_file and key_file")
        ca = sec.value("ca_file")
        if client_auth != "none" and ca is None:
            raise sec.fail("ca_file", f"client_auth = {client_auth!r} needs ca_file (the client CA)")
        crl = sec.value("crl_file")
        if crl is not None and client_auth == "none":
            raise sec.fail("crl_file", 'a CRL checks client certificates: it needs client_auth = "optional" or "required"')
        tls = TLSFiles(cert, key, ca, crl)
        tls_policy = _tls_policy(sec, openssl)
        unmapped = sec.value("unmapped_cert")
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
    insecure = sec.value("allow_insecure_remote")
    if typ == "tcp" and not _is_loopback(host) and not insecure:
        raise sec.fail(
            "address",
            f"a plaintext listener on {host} would expose Redis traffic unencrypted; bind it to "
            "127.0.0.1 or a unix socket, or set allow_insecure_remote = true",
        )
    sources = [n for n in _networks(sec, "allowed_sources", sec.value("allowed_sources"), unix=False) if not isinstance(n, str)]
    proxy_protocol = sec.value("proxy_protocol")
    proxy_sources = _proxy_sources(sec, typ, proxy_protocol)
    max_connections = sec.value("max_connections")
    sec.done()
    return ListenerConfig(
        name=name, type=typ, host=host, port=port, path=path, socket_mode=socket_mode, tls=tls,
        client_auth=client_auth, cert_user=cert_user, allow_insecure_remote=insecure,
        allowed_sources=tuple(sources), max_connections=max_connections, tls_policy=tls_policy,
        unmapped_cert=unmapped, proxy_protocol=proxy_protocol, proxy_sources=proxy_sources,
    )  # fmt: skip


def _proxy_sources(sec: _Section, typ: str, enabled: bool) -> tuple[Network | str, ...]:
    """proxy_sources: the load balancers (CIDRs; "unix" on a unix listener) whose PROXY headers are trusted."""
    raw = sec.value("proxy_sources")
    if not enabled:
        if raw:
            raise sec.fail("proxy_sources", "only means something with proxy_protocol = true")
        return ()
    if not raw:
        raise sec.fail("proxy_sources", "required with proxy_protocol = true: the load balancers' addresses "
                       '(CIDRs, e.g. ["10.0.0.0/24"]) whose PROXY headers are trusted; a connection from '
                       'anywhere else is refused' + ('; on a unix listener, ["unix"]' if typ == "unix" else ""))  # fmt: skip
    unix = typ == "unix"
    return tuple(_networks(sec, "proxy_sources", raw, unix, "not a CIDR network" + (' (or "unix")' if unix else "")))


def _tls_policy(sec: _Section, openssl: TLSSupport | None) -> TLSPolicy:
    """min_version, ciphers, ciphersuites, ecdh_curves, session_tickets: each checked (with ``openssl``:
    against this process's OpenSSL too)."""
    version = sec.value("min_version")
    ciphers = sec.value("ciphers")
    if ciphers and openssl is not None and not openssl.ciphers_ok(ciphers):
        raise sec.fail("ciphers", f"OpenSSL selects no cipher from {ciphers!r} (an OpenSSL cipher string for "
                       'TLS 1.2, e.g. "ECDHE+AESGCM:ECDHE+CHACHA20")')  # fmt: skip
    suites = sec.value("ciphersuites")
    for name in suites:
        if name not in TLS13_SUITES:
            raise sec.fail("ciphersuites", f"not a TLS 1.3 cipher suite: {name!r} (known: {', '.join(TLS13_SUITES)})")
    offered = openssl.tls13_suites() if openssl is not None else ()
    if suites and offered and sorted(set(suites)) != sorted(offered):
        raise sec.fail("ciphersuites", "Python's ssl module cannot choose TLS 1.3 cipher suites: this build always "
                       f"offers exactly {', '.join(offered)}. List those (to assert them) or leave ciphersuites out; "
                       "to restrict them for the whole process use OpenSSL's own config (OPENSSL_CONF with "
                       "`Ciphersuites = ...` in its system_default section; see docs/security.md)")  # fmt: skip
    curves = sec.value("ecdh_curves")
    if len(curves) > 1:
        raise sec.fail("ecdh_curves", "Python's ssl module can set one curve (set_ecdh_curve); list exactly one, "
                       'e.g. ["prime256v1"], or leave it out for OpenSSL\'s default list')  # fmt: skip
    for name in curves:
        if openssl is not None and not openssl.curve_ok(name):
            raise sec.fail("ecdh_curves", f"unknown elliptic curve {name!r} (e.g. prime256v1, secp384r1)")
    return TLSPolicy(version, ciphers, tuple(suites), tuple(curves), sec.value("session_tickets"))


def _upstream(up: _Section, secrets: Secrets) -> UpstreamConfig:
    path = up.value("path")
    if path is not None and "address" in up.data:
        raise up.fail("address", "set either address or path, not both")
    host, port = ("", 0) if path else _host_port(up, "address", 6379)
    upstream = UpstreamConfig(
        host=host, port=port, path=path, username=up.value("username"), password=_secret(up, "password", secrets),
        tls=up.value("tls"), tls_ca_file=up.value("tls_ca_file"), tls_cert_file=up.value("tls_cert_file"),
        tls_key_file=up.value("tls_key_file"), tls_server_name=up.value("tls_server_name"),
        connect_timeout=up.value("connect_timeout"), fetch_command_table=up.value("fetch_command_table"),
        health_check_interval=up.value("health_check_interval"), identity=up.value("identity"),
        mirror_prefix=up.value("mirror_prefix"), service_scripts=up.value("service_scripts"),
        proxy_protocol=up.value("proxy_protocol"),
    )  # fmt: skip
    if upstream.identity != "service" and not re.fullmatch(r"[!-~]{1,64}", upstream.mirror_prefix):
        raise up.fail("mirror_prefix", f"1 to 64 printable characters without spaces, got {upstream.mirror_prefix!r}")
    if upstream.identity == "mirror" and (conflict := mirror_prefix_conflict(upstream)):
        raise up.fail("mirror_prefix", conflict)
    up.done()
    return upstream


def _acl(acl: _Section) -> ACLConfig:
    users_file = acl.value("users_file")
    if users_file is None:
        raise acl.fail("users_file", "required: the users file in Redis ACL syntax")
    disabled = acl.value("disabled_commands")
    for c in disabled:
        if not isinstance(c, str) or not c or " " in c:
            raise acl.fail("disabled_commands", f"command names only, got {c!r}")
    cert_only = acl.value("cert_only")
    for pattern in cert_only:
        if not isinstance(pattern, str) or not pattern:
            raise acl.fail("cert_only", f"user name patterns (Redis glob, e.g. \"svc-*\"), got {pattern!r}")
    audit_users = acl.value("audit_users")
    if not all(isinstance(u, str) and u for u in audit_users):
        raise acl.fail("audit_users", f"user names or Redis glob patterns, got {audit_users!r}")
    sources = []
    for user, nets in acl.value("user_sources").items():  # ``alice = ["10.0.0.0/8", "unix"]`` per user
        key = f"user_sources.{user}"
        if not isinstance(nets, list) or not nets:
            raise acl.fail(key, 'a non-empty list of CIDR networks (or "unix"), e.g. ["10.0.0.0/8"]')
        sources.append((user, tuple(_networks(acl, key, nets, unix=True, what='not a CIDR network (or "unix")'))))
    cfg = ACLConfig(users_file, tuple(c.lower() for c in disabled), acl.value("enable_debug_command"),
                    acl.value("enable_module_command"), tuple(cert_only), tuple(sources), acl.value("mode"),
                    tuple(audit_users), acl.value("reload_guard"))  # fmt: skip
    acl.done()
    return cfg


def _plain(sec: _Section, cls: type[Any]) -> Any:
    """A table whose options are its dataclass's fields, one for one."""
    out = cls(**{o.key: sec.value(o.key) for o in TABLES[sec.kind]})
    sec.done()
    return out


def _metrics(met: _Section) -> MetricsConfig:
    host, port = _host_port(met, "address")
    metrics = MetricsConfig(enabled=met.value("enabled"), host=host, port=port, node=met.value("node"))
    if metrics.node and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", metrics.node):
        raise met.fail("node", f"1 to 64 letters, digits or _.:- (a label value), got {metrics.node!r}")
    met.done()
    return metrics


def _server(sec: _Section, listeners: tuple[ListenerConfig, ...], cpus: int) -> ServerConfig:
    workers = sec.value("workers")
    if workers == "auto":
        workers = min(cpus, MAX_WORKERS)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise sec.fail("workers", f'a number of processes (1 to {MAX_WORKERS}) or "auto", got {workers!r}')
    if not 1 <= workers <= MAX_WORKERS:
        raise sec.fail("workers", f'must be 1 to {MAX_WORKERS} (or "auto": one per CPU), got {workers}')
    if workers > 1:
        for i, lst in enumerate(listeners):
            if lst.type != "unix" and lst.port == 0:
                raise ConfigError(f"listener[{i}].address: port 0 (any free port) cannot be shared by {workers} "
                                  "workers; give a port number")  # fmt: skip
    server = ServerConfig(workers, sec.value("drain_timeout"), sec.value("reload_interval"), sec.value("reload_settle"))
    sec.done()
    return server


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None, tls: TLSSupport | None = None,
                 secrets: Secrets | None = None, cpus: int = 1) -> Config:  # fmt: skip
    """The config in ``data`` (a parsed TOML document). ``tls``: check the TLS settings against OpenSSL
    too; ``secrets``: where password files and variables are read (default: nowhere, as if unset);
    ``cpus``: what ``workers = "auto"`` means."""
    root = _Section(data, "", base)
    raw_listeners = root.get("listener", list, [])
    if not raw_listeners:
        raise ConfigError("listener: at least one [[listener]] is required")
    listeners = tuple(_listener(_Section(d, f"listener[{i}]", base), i, tls) for i, d in enumerate(raw_listeners))
    names = [lst.name for lst in listeners]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"listener: name {n!r} is used twice; names label metrics and must differ")
    upstream = _upstream(root.section("upstream"), secrets or _NoSecrets())
    acl = _acl(root.section("acl"))
    profile = _plain(root.section("profile"), ProfileConfig)
    limits = _plain(root.section("limits"), LimitsConfig)
    metrics = _metrics(root.section("metrics"))
    log = _plain(root.section("log"), LogConfig)
    server = _server(root.section("server"), listeners, cpus)
    root.done()
    return Config(listeners, upstream, acl, limits, metrics, log, profile, source, server)


class _NoSecrets:
    def read_file(self, path: Path) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    def env(self, name: str) -> str | None:
        return None
