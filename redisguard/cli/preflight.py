"""Everything that would stop ``serve`` from starting, found without starting it.

``check-config`` and ``serve`` both run :func:`preflight`: it opens every file the proxy will open
(certificates, keys, CAs, the users file), builds the TLS contexts (a key that does not match its
certificate fails here), and test-binds every listener address, unix socket path and the metrics
port, holding them all at once so two listeners on one port are caught too. Each problem is one line
that names the listener or key, the path, and the fix — never ``[Errno 13]`` or ``None``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import socket
import ssl
import stat
from pathlib import Path

from redisguard.config.model import Config, ListenerConfig
from redisguard.files.problems import access_hint, file_problem
from redisguard.transport.tls import TLSConfigError, server_context, upstream_context

# The longest unix socket path Linux accepts (sun_path is 108 bytes with the terminating NUL).
MAX_UNIX_PATH = 107


def preflight(config: Config, bind: bool = True, takeover: bool = False) -> list[str]:
    """One line per problem; ``bind=False`` skips the port and socket tests (checking a config for
    another host, or inside an image build); ``takeover`` (serve --takeover): a listener port that a
    redisguard of this user holds is no problem (the restart handover, docs: SO_REUSEPORT)."""
    errors = files_and_tls(config)
    if bind:
        errors += bind_all(config, takeover)
    return errors


def files_and_tls(config: Config) -> list[str]:
    errors: list[str] = []
    problem = file_problem(config.acl.users_file, "users file")
    if problem:
        errors.append(f"acl.users_file: {problem}")
    for lst in config.listeners:
        if lst.tls is None:
            continue
        where = f"listener {lst.name!r}"
        files = [(lst.tls.cert_file, "certificate", "cert_file"), (lst.tls.key_file, "key", "key_file")]
        if lst.tls.ca_file is not None and lst.client_auth != "none":
            files.append((lst.tls.ca_file, "client CA", "ca_file"))
        if lst.tls.crl_file is not None:
            files.append((lst.tls.crl_file, "CRL", "crl_file"))
        problems = [f"{where}: {key}: {p}" for path, what, key in files if (p := file_problem(path, what))]
        if problems:
            errors += [p + ("; run: redisguard certs init, or fix the path" if "not found" in p else "") for p in problems]
            continue
        try:
            server_context(lst)
        except TLSConfigError as e:
            errors.append(str(e))
            continue
        if lst.tls.crl_file is not None and (p := crl_problem(lst.tls.crl_file)):
            errors.append(f"{where}: crl_file: {p}")
    up = config.upstream
    if up.tls:
        for path, what, key in ((up.tls_ca_file, "CA", "tls_ca_file"), (up.tls_cert_file, "certificate", "tls_cert_file"),
                                (up.tls_key_file, "key", "tls_key_file")):  # fmt: skip
            if path is not None and (p := file_problem(path, what)):
                errors.append(f"upstream.{key}: {p}")
        if not errors:
            try:
                upstream_context(up)
            except (ssl.SSLError, OSError) as e:
                errors.append(f"upstream: cannot load the upstream TLS files: {getattr(e, 'reason', None) or e} "
                              "(do tls_cert_file and tls_key_file match? are they PEM?)")  # fmt: skip
    return errors


def crl_problem(path: Path, now: datetime.datetime | None = None) -> str | None:
    """A CRL past its nextUpdate makes OpenSSL refuse every client certificate of its CA."""
    from cryptography import x509

    now = now or datetime.datetime.now(datetime.UTC)
    for block in path.read_bytes().split(b"-----END X509 CRL-----")[:-1]:
        try:
            crl = x509.load_pem_x509_crl(block + b"-----END X509 CRL-----\n")
        except ValueError as e:
            return f"{path}: not a valid PEM CRL ({e})"
        nxt = crl.next_update_utc
        if nxt is not None and nxt < now:
            return (f"{path}: the CRL of {crl.issuer.rfc4514_string()} expired at {nxt:%Y-%m-%d %H:%M} UTC: every "
                    "client certificate of that CA would be refused; publish a fresh CRL")  # fmt: skip
    return None


def root_warning(euid: int | None = None) -> str | None:
    """redisguard needs no privileges: running as root turns any bug into a root compromise."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    return ("running as root (uid 0): redisguard needs no privileges; run it as a dedicated user (the container "
            "image uses uid 10001, the systemd example DynamicUser=yes; a port below 1024 needs only "
            "CAP_NET_BIND_SERVICE)")  # fmt: skip


def proxy_protocol_warnings(config: Config) -> list[str]:
    """PROXY protocol settings that run but defeat their purpose (the config parser already refused the
    invalid ones: proxy_protocol without proxy_sources, a bad CIDR)."""
    out = []
    for lst in config.listeners:
        if not lst.proxy_protocol:
            continue
        wide = [str(n) for n in lst.proxy_sources if not isinstance(n, str) and n.prefixlen == 0]
        if wide:
            out.append(f"listener {lst.name!r}: proxy_sources includes {', '.join(wide)}: any client can send a PROXY "
                       "header and claim any address (bypassing allowed_sources, user_sources and the AUTH throttle); "
                       "list only the load balancers' addresses")  # fmt: skip
    return out


def bind_all(config: Config, takeover: bool = False) -> list[str]:
    """Bind (and listen on) every address the proxy will, all held together, then let them go.

    The proxy binds with SO_REUSEPORT (transport.listeners.REUSE_PORT), which would let it join a port
    another redisguard of this user listens on and share its clients silently: a listener port is tested
    without it, so that is refused unless ``takeover``. The metrics port is tested with it: a process
    that drains keeps answering /readyz there till its end, and its replacement must start meanwhile."""
    held: list[socket.socket] = []
    errors: list[str] = []
    taken: list[tuple[str, int]] = []
    try:
        for lst in config.listeners:
            where = f"listener {lst.name!r}"
            if lst.type == "unix":
                problem = unix_path_problem(lst, takeover)
                if problem:
                    errors.append(f"{where}: {problem}")
                continue
            problem = _claim(lst.host, lst.port, taken) or _bind(lst.host, lst.port, held, share=takeover)
            if problem:
                errors.append(f"{where}: cannot listen on {lst.host}:{lst.port}: {problem}")
        m = config.metrics
        if m.enabled:
            problem = _claim(m.host, m.port, taken) or _bind(m.host, m.port, held, share=True)
            if problem:
                errors.append(f"metrics.address: cannot listen on {m.host}:{m.port} (the metrics port for /metrics, "
                              f"/healthz, /readyz): {problem}; change [metrics] address or stop the other process")  # fmt: skip
    finally:
        for s in held:
            s.close()
    return errors


# As transport.listeners.REUSE_PORT (not imported: this module stays free of the connection code)
REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
WILDCARDS = ("", "0.0.0.0", "::")


def _claim(host: str, port: int, taken: list[tuple[str, int]]) -> str | None:
    """Another address of this config on the same port (the same host, or either one a wildcard)? Asked
    here: two sockets bound with SO_REUSEPORT do not conflict."""
    if port and any(p == port and (h == host or h in WILDCARDS or host in WILDCARDS) for h, p in taken):
        return _bind_error(OSError(errno.EADDRINUSE, "in use"), port)
    taken.append((host, port))
    return None


def _bind(host: str, port: int, held: list[socket.socket], share: bool) -> str | None:
    """Bind and listen as asyncio's create_server would (every address the host resolves to,
    SO_REUSEADDR, IPv6 sockets v6-only), with SO_REUSEPORT if ``share`` (a port a redisguard of this user
    holds is free to us then); the sockets go into ``held``. None, or the problem."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    for family, typ, proto, _, addr in {(i[0], i[1], i[2], i[3], i[4]) for i in infos}:
        s = socket.socket(family, typ, proto)
        held.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        share = share and REUSE_PORT
        if share:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(addr)
            if not share:  # (with SO_REUSEADDR, Linux lets two sockets bind one port until one listens; with
                s.listen(1)  # SO_REUSEPORT, bind refuses another's listening port, and listening would take connections)
        except OSError as e:
            return _bind_error(e, port)
    return None


def _bind_error(e: OSError, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use (another process, or another listener in this config, has this port)"
    if e.errno == errno.EACCES:
        return (f"permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE; uid {os.geteuid()})"
                if port < 1024 else "permission denied")  # fmt: skip
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available (no network interface on this host has that IP)"
    return e.strerror or str(e)


def unix_path_problem(lst: ListenerConfig, takeover: bool = False) -> str | None:
    """Can a unix socket be created at the listener's path (and is nothing else using it, unless
    ``takeover``: then the socket is replaced, and the process that made it keeps its clients)?"""
    assert lst.path is not None
    path = lst.path
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        return f"{path}: too long for a unix socket path (at most {MAX_UNIX_PATH} bytes); choose a shorter path"
    parent = path.parent
    if not parent.is_dir():
        return f"{path}: directory {parent} does not exist (create it, e.g. RuntimeDirectory= in a systemd unit)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: cannot create a socket in {parent}: permission denied ({access_hint(parent)})"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path}: exists and is not a socket (redisguard would replace it): remove it or choose another path"
    if not takeover and _socket_in_use(path):
        return f"{path}: another process is listening on this socket (is redisguard already running?)"
    return None


def _socket_in_use(path: Path) -> bool:
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False  # a stale socket file from a previous run: serve replaces it
        return True
