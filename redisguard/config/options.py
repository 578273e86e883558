"""Every option of redisguard's config, declared once: its table, key, type, default, check and doc line.

What is derived from here: the known keys of each table (an unknown key is reported as a typo), the
defaults the parser applies and the config dataclasses start from (:mod:`.model`), the checks of single
values, and the docs' option table (``docs/configuration.md``: :func:`reference_markdown`). The shipped
``config/redisguard.toml`` is tested against it (every option shown, with its real default). What
involves several options at once (a tls listener needs cert_file and key_file) is checked in
:mod:`.parse`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "required"})()  # no default: must be given

MAX_WORKERS = 64
LISTENER_TYPES = ("tls", "tcp", "unix")
CLIENT_AUTH = ("none", "optional", "required")
CERT_IDENTITIES = ("", "cn", "san_dns", "san_uri")
TLS_VERSIONS = ("1.2", "1.3")
UNMAPPED_CERT = ("default", "refuse")
UPSTREAM_IDENTITIES = ("auto", "service", "mirror")
SERVICE_SCRIPTS = ("refuse", "allow")
PROTECTED = ("no", "yes", "local", "upstream")


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # "str" | "int" | "float" | "bool" | "path" | "list" | "table" | "address" | "workers"
    default: Any  # as the TOML file would hold it; REQUIRED, or None for "not set"
    doc: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # an error message for a bad value, else None


def non_negative(v: float) -> str | None:
    return "must not be negative" if v < 0 else None


def at_least_one(v: int) -> str | None:
    return "must be at least 1" if v < 1 else None


def positive(v: float) -> str | None:
    return "must be > 0" if v <= 0 else None


def seconds_between(low: float, high: float) -> Callable[[float], str | None]:
    return lambda v: None if low <= v <= high else f"seconds, {low:g} to {high:g}, got {v:g}"


_o = Option
TABLES: dict[str, tuple[Option, ...]] = {
    "server": (
        _o("workers", "workers", 1, f'processes, each with its own event loop (1 to {MAX_WORKERS}, or "auto": one per CPU)'),
        _o("drain_timeout", "float", 25.0, "SIGTERM: seconds clients get to finish what they sent before they are cut",
          check=seconds_between(0, 3600)),
        _o("reload_interval", "float", 0.0, "> 0: also reload (as SIGHUP) when a watched file changes, checked this often",
          check=lambda v: f"0 (off) or at least 0.5 seconds, got {v:g}" if v < 0 or 0 < v < 0.5 else None),
        _o("reload_settle", "float", 1.0, "... once every watched file has read the same for this many seconds",
          check=seconds_between(0.1, 300)),
    ),
    "listener": (
        _o("name", "str", None, 'labels metrics and logs; unique (default: type and index, e.g. "tls0")'),
        _o("type", "str", "tls", '"tls", "tcp" (plaintext) or "unix"', choices=LISTENER_TYPES),
        _o("address", "address", REQUIRED, 'host:port ("[::]:6380" for IPv6); not for a unix listener'),
        _o("path", "path", None, "a unix listener's socket path"),
        _o("socket_mode", "str", "660", "a unix socket's permissions, octal"),
        _o("cert_file", "path", None, "tls: the PEM certificate chain (required)"),
        _o("key_file", "path", None, "tls: its key (required)"),
        _o("ca_file", "path", None, "tls: the CA of client certificates"),
        _o("crl_file", "path", None, "tls: PEM CRL of the client CA (revoked client certificates fail the handshake)"),
        _o("client_auth", "str", "none", 'client certificates: "none", "optional" or "required"', choices=CLIENT_AUTH),
        _o("cert_user", "str", "", 'a verified client certificate logs in as the user it names: "cn", "san_dns", "san_uri"',
          choices=CERT_IDENTITIES),
        _o("unmapped_cert", "str", "default", 'a verified certificate that names no user: "default" or "refuse"',
          choices=UNMAPPED_CERT),
        _o("min_version", "str", "1.2", 'the oldest TLS version accepted: "1.2" or "1.3"', choices=TLS_VERSIONS),
        _o("ciphers", "str", "", "OpenSSL cipher string for TLS 1.2 (empty: Python's default)"),
        _o("ciphersuites", "list", [], "TLS 1.3 suites: checked, not set (Python's ssl cannot choose them)"),
        _o("ecdh_curves", "list", [], "one key-exchange group (empty: OpenSSL's list)"),
        _o("session_tickets", "bool", True, "false: no TLS session tickets"),
        _o("allow_insecure_remote", "bool", False, "allow a plaintext listener on a non-loopback address"),
        _o("allowed_sources", "list", [], "CIDRs allowed to connect (empty: any)"),
        _o("max_connections", "int", 10000, "clients at once on this listener", check=at_least_one),
        _o("proxy_protocol", "bool", False, "each connection starts with a PROXY v1/v2 header naming the client"),
        _o("proxy_sources", "list", [], 'the load balancers whose PROXY headers are trusted (CIDRs; "unix")'),
    ),
    "upstream": (
        _o("address", "address", "127.0.0.1:6379", "Redis's host:port"),
        _o("path", "path", None, "or Redis's unix socket"),
        _o("username", "str", "", "the proxy's own Redis user (empty: Redis's default user)"),
        _o("password_file", "path", None, "a file holding its password (never inline in the config)"),
        _o("password_env", "str", None, "or the environment variable holding it"),
        _o("connect_timeout", "float", 2.0, "seconds to connect to Redis",
          check=lambda v: "must be > 0 seconds" if v <= 0 else None),
        _o("fetch_command_table", "bool", True, "read COMMAND INFO from Redis at start (else the shipped 7.0 table)"),
        _o("health_check_interval", "float", 5.0, "seconds between PINGs as the service user; 0 = off",
          check=lambda v: "must not be negative (0 turns the periodic check off)" if v < 0 else None),
        _o("identity", "str", "auto", 'who clients are upstream: "mirror", "service" or "auto"', choices=UPSTREAM_IDENTITIES),
        _o("mirror_prefix", "str", "rg:", "mirror users are named <prefix><user>"),
        _o("service_scripts", "str", "refuse", 'service identity: scripts of narrower users, "refuse" or "allow"',
          choices=SERVICE_SCRIPTS),
        _o("proxy_protocol", "bool", False, "send a PROXY v2 header first on every upstream connection"),
        _o("tls", "bool", False, "TLS to Redis"),
        _o("tls_ca_file", "path", None, "the CA of Redis's certificate"),
        _o("tls_cert_file", "path", None, "a client certificate for Redis"),
        _o("tls_key_file", "path", None, "its key"),
        _o("tls_server_name", "str", "", "the name Redis's certificate must carry (empty: the host)"),
    ),
    "acl": (
        _o("users_file", "path", REQUIRED, "the users file in Redis ACL syntax"),
        _o("disabled_commands", "list", [], "commands answered as unknown, for every user (rename-command)"),
        _o("enable_debug_command", "str", "upstream", 'DEBUG: "no", "yes", "local" or "upstream" (Redis\'s setting)',
          choices=PROTECTED),
        _o("enable_module_command", "str", "upstream", 'MODULE LOAD/UNLOAD: as enable_debug_command', choices=PROTECTED),
        _o("cert_only", "list", [], "users (Redis globs) who log in only with a client certificate"),
        _o("user_sources", "table", {}, 'per user, the networks a login may come from ("unix": unix-socket clients)'),
        _o("mode", "str", "enforce", '"audit": what would be denied is forwarded and logged', choices=("enforce", "audit")),
        _o("audit_users", "list", [], "users (Redis globs) in audit mode while the mode is enforce"),
        _o("reload_guard", "bool", False, "refuse a reload whose users would deny traffic in the [profile]"),
    ),
    "profile": (
        _o("file", "path", None, "keep a traffic profile there (for `redisguard acl suggest`)"),
        _o("interval", "float", 60.0, "seconds between writes of the profile",
          check=lambda v: "must be positive (seconds)" if v <= 0 else None),
    ),
    "limits": (
        _o("handshake_timeout", "float", 10.0, "seconds for the TLS handshake", check=non_negative),
        _o("auth_timeout", "float", 10.0, "seconds for a new connection to authenticate (or speak)", check=non_negative),
        _o("idle_timeout", "float", 0.0, "close clients idle this long (as Redis's timeout); 0 = never", check=non_negative),
        _o("max_request_bytes", "int", 512 * 1024 * 1024 + 64 * 1024, "one request's size (proto-max-bulk-len + 64k)",
          check=non_negative),
        _o("auth_failures_per_minute", "float", 20.0, "failed AUTHs per source before each AUTH waits (0 = off)",
          check=non_negative),
        _o("max_pending_handshakes", "int", 1024, "TLS handshakes in progress, all listeners", check=at_least_one),
        _o("max_handshakes_per_source", "int", 64, "the same, per client address", check=at_least_one),
        _o("fd_reserve", "int", 64, "stop accepting when fewer file descriptors than this remain", check=non_negative),
        _o("memory_trim_interval", "float", 5.0, "seconds between malloc_trim(0) after connections closed; 0 = never",
          check=non_negative),
    ),
    "metrics": (
        _o("enabled", "bool", True, "serve /metrics, /healthz and /readyz"),
        _o("address", "address", "127.0.0.1:9187", "where"),
        _o("node", "str", "", "a node label on every series (one sidecar per cluster node)"),
    ),
    "log": (
        _o("format", "str", "auto", '"auto" (console on a TTY, else JSON), "json" or "console"',
          choices=("auto", "json", "console")),
        _o("level", "str", "info", '"debug", "info", "warning" or "error"', choices=("debug", "info", "warning", "error")),
        _o("audit_keys", "bool", False, "key names (never values) in command_denied events"),
        _o("audit_denied_per_second", "float", 100.0, "rate limit of command_denied and auth_failure lines", check=positive),
        _o("audit_connections_per_second", "float", 100.0, "rate limit of each connection event", check=positive),
    ),
}  # fmt: skip
del _o

# Keys that are known only to be refused with a reason (parse.py): a secret never goes in the config.
REFUSED_KEYS: dict[str, tuple[str, ...]] = {"upstream": ("password",)}
# Every key each table accepts (the top level: the tables).
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "": tuple(TABLES), **{t: tuple(o.key for o in opts) + REFUSED_KEYS.get(t, ()) for t, opts in TABLES.items()}
}
_BY_KEY = {(t, o.key): o for t, opts in TABLES.items() for o in opts}


def option(table: str, key: str) -> Option:
    return _BY_KEY[(table, key)]


def default(table: str, key: str) -> Any:
    """The declared default of ``[table] key`` (what the config dataclasses start from)."""
    return _BY_KEY[(table, key)].default


def split_address(address: str) -> tuple[str, int]:
    """A declared ``host:port`` default as (host, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def table_name(kind: str) -> str:
    return "[[listener]]" if kind == "listener" else f"[{kind}]" if kind else "the top level"


def unknown_key_message(kind: str, key: str) -> str:
    """``unknown option in [[listener]] (did you mean cert_file?)`` for a key the table does not have."""
    known = KNOWN_KEYS[kind]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
    return f"unknown option in {table_name(kind)} ({hint})"


def toml_value(v: Any) -> str:
    """A default as it is written in TOML."""
    if v is REQUIRED:
        return "required"
    if v is None:
        return "not set"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{}"
    return repr(v)


def reference_markdown() -> str:
    """The option table of docs/configuration.md, made from the declarations."""
    out = ["# Configuration reference", "",
           "Every option of redisguard's TOML config, with its default. Made from the declarations in",
           "`redisguard/config/options.py` (regenerate: `python -m redisguard.config.options > docs/configuration.md`;",
           "a test fails when they differ). `config/redisguard.toml` shows each one in context.", ""]  # fmt: skip
    for table, opts in TABLES.items():
        out += [f"## {table_name(table)}", "", "| option | default | what it does |", "|---|---|---|"]
        for o in opts:
            out.append(f"| `{o.key}` | `{toml_value(o.default)}` | {o.doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
