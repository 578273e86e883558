"""Real processes for tests: redis-server and redisguard on free loopback ports; and random ACL rules and
requests, for the differential tests."""

from __future__ import annotations

import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict, cast

import redis
from hypothesis import strategies as st

from redisguard.cli.procs import free_port as free_port  # (for tests: the demo starts processes the same way)
from redisguard.cli.procs import scrape as scrape
from redisguard.cli.procs import wait_port as wait_port
from redisguard.cli.procs import write_config
from redisguard.commands.table import CommandTable

UPSTREAM_USER = "svc"
UPSTREAM_PASSWORD = "svc-test-password"


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not installed: the tests need a real Redis 7 (apt-get install redis-server, "
            "or run `bash .ci/run`, which installs it)"
        )
    return path


@dataclass
class RedisProc:
    port: int
    args: list[str]
    proc: subprocess.Popen[bytes] = field(init=False)  # start() runs it

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def restart(self) -> None:
        """A new redis-server on the same port: its users are only the configured ones (no data kept)."""
        self.stop()
        self.start()


def _split(extra: list[str]) -> list[str]:
    # redis-server takes a config directive's arguments as separate argv entries.
    return [part for arg in extra for part in arg.split(" ")]


def start_redis(port: int | None = None, extra: list[str] | None = None, aclfile: Path | None = None) -> RedisProc:
    """A scratch redis-server: loopback only, no persistence, a service user for the proxy (``aclfile``:
    written with that user, and given to Redis, so ACL LOAD there drops every other user)."""
    port = port or free_port()
    # (-flushall: proxy_config disables FLUSHALL, and a service user that could run it in a script is refused)
    service = f"{UPSTREAM_USER} on >{UPSTREAM_PASSWORD} ~* &* +@all -flushall"
    if aclfile is not None:
        aclfile.write_text(f"user {service}\nuser default on nopass ~* &* +@all\n")
    users = ["--aclfile", str(aclfile)] if aclfile is not None else ["--user", *service.split()]
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        *users, *_split(extra or []),
    ]  # fmt: skip
    r = RedisProc(port, args)
    r.start()
    return r


class TLSClient(Protocol):
    """The tls_client fixture: a redis-py client of the session's proxy over TLS (as alice unless told)."""

    def __call__(self, username: str | None = ..., password: str | None = ..., **kw: Any) -> redis.Redis: ...


class ACLUser(TypedDict):
    """ACL GETUSER as redis-py decodes it (its annotation, one union for every field, says less)."""

    flags: list[str]
    passwords: list[str]
    commands: list[str]
    categories: list[str]
    keys: list[str]
    channels: list[str]
    enabled: bool


def find_acl_user(r: redis.Redis, name: str) -> ACLUser | None:
    return cast(ACLUser | None, r.acl_getuser(name))


def acl_user(r: redis.Redis, name: str) -> ACLUser:
    got = find_acl_user(r, name)
    assert got is not None, f"no ACL user {name!r}"
    return got


@dataclass
class ProxyProc:
    proc: subprocess.Popen[bytes]
    tls_port: int
    plain_port: int
    metrics_port: int
    config: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def proxy_config(
    d: Path, certs: Path, users: Path, redis_port: int, tls_port: int, plain_port: int, metrics_port: int,
    extra: str = "", disabled: str = '["FLUSHALL", "CONFIG"]', upstream_extra: str = "", limits: str = "",
    tls_listener: str = "", acl: str = "",
) -> Path:  # fmt: skip
    """The demo's config, logging in upstream as the service user, with short test timeouts.

    ``extra`` adds lines at the end (the [log] table), ``limits`` to [limits] (later keys win),
    ``tls_listener`` to the TLS listener, ``acl`` to [acl]."""
    (d / "upstream.pw").write_text(UPSTREAM_PASSWORD + "\n")
    if "health_check_interval" not in upstream_extra:  # no PINGs of its own in the shared Redis's MONITOR feed
        upstream_extra += "\nhealth_check_interval = 0.0"
    if "identity" not in upstream_extra:  # (the service user may manage ACL users: "auto" would choose mirror)
        upstream_extra += '\nidentity = "service"'
    cfg = write_config(
        d, tls_port, plain_port, redis_port, metrics_port, users, certs, disabled=disabled,
        upstream=f'username = "{UPSTREAM_USER}"\npassword_file = "upstream.pw"\n{upstream_extra}',
        limits=_limits({"auth_timeout": "3.0", "handshake_timeout": "3.0",
                        "auth_failures_per_minute": "100000.0"},  # the suite fails AUTH on purpose from one address
                       limits),
        log='level = "debug"', extra=extra,
    )  # fmt: skip
    text = cfg.read_text().replace('cert_user = "cn"\n', f'cert_user = "cn"\n{tls_listener}\n', 1)
    cfg.write_text(text.replace("\ndisabled_commands = ", f"\n{acl}\ndisabled_commands = ", 1))
    return cfg


def _limits(defaults: dict[str, str], override: str) -> str:
    """[limits] lines: the test defaults, with any key set in ``override`` taking its place."""
    lines = [line for line in override.splitlines() if line.strip()]
    given = {line.split("=", 1)[0].strip() for line in lines}
    return "\n".join([*(f"{k} = {v}" for k, v in defaults.items() if k not in given), *lines])


def start_proxy(d: Path, certs: Path, users: Path, redis_port: int, nofile: int | None = None,
                ports: tuple[int, int, int] | None = None, **kw: str) -> ProxyProc:  # fmt: skip
    """``nofile``: start redisguard with RLIMIT_NOFILE soft = hard = that (it cannot raise it); ``ports``:
    its (TLS, plaintext, metrics) ports, else free ones — chosen again if one was taken meanwhile (a
    free port can become another socket's before redisguard binds it)."""
    for attempt in range(3):
        try:
            return _start_proxy(d, certs, users, redis_port, nofile, ports, **kw)
        except RuntimeError as e:
            if ports is not None or "address already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_proxy(d: Path, certs: Path, users: Path, redis_port: int, nofile: int | None,
                 ports: tuple[int, int, int] | None, **kw: str) -> ProxyProc:  # fmt: skip
    tls_port, plain_port, metrics_port = ports or (free_port(), free_port(), free_port())
    cfg = proxy_config(d, certs, users, redis_port, tls_port, plain_port, metrics_port, **kw)
    log = d / f"redisguard-{tls_port}.log"
    limit = None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = subprocess.Popen(
        [sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=limit,
    )  # fmt: skip
    try:
        wait_port(tls_port, proc)
        wait_port(plain_port, proc)
        wait_port(metrics_port, proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n--- redisguard log ---\n{log.read_text()}") from None
    return ProxyProc(proc, tls_port, plain_port, metrics_port, cfg, log)


def upstream_user(upstream: Any, info: object) -> str | None:
    """The user Redis itself shows for a proxied connection, found by the id in its CLIENT INFO through
    redisguard (which names redisguard's own users there): the upstream identity. ``upstream``: a redis-py
    client of Redis itself."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    rows = upstream.client_list(client_id=[int(text.split("id=", 1)[1].split(" ", 1)[0])])
    user = rows[0]["user"] if rows else None
    return user.decode() if isinstance(user, bytes) else user


def raw_exchange(
    port: int, data: bytes, expect_close: bool = False, timeout: float = 3.0, quiet: float = 0.3,
    chunks: list[int] | None = None,
) -> bytes:  # fmt: skip
    """Send ``data`` (optionally split at the ``chunks`` offsets), then read until the peer closes, or
    (unless ``expect_close``) until it has been quiet for ``quiet`` seconds; ``timeout`` bounds it all."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        prev = 0
        for cut in [*(chunks or []), len(data)]:
            s.sendall(data[prev:cut])
            prev = cut
            if chunks:
                time.sleep(0.002)
        return _read(s, lambda _: False, timeout, None if expect_close else quiet)


def read_until(sock: socket.socket, done: bytes | Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """Read from ``sock`` until ``done(data)`` is true, the peer closes, or ``timeout`` passes.

    ``done`` may be the expected bytes (then: until that many bytes arrived)."""
    if isinstance(done, bytes):
        want = len(done)
        return _read(sock, lambda data: len(data) >= want, timeout, None)
    return _read(sock, done, timeout, None)


def _read(sock: socket.socket, done: Callable[[bytes], bool], timeout: float, quiet: float | None) -> bytes:
    """The read loop behind both: stop on ``done``, EOF, ``timeout``, or ``quiet`` seconds of silence."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data) and time.monotonic() < deadline:
        left = max(0.01, deadline - time.monotonic())
        sock.settimeout(min(quiet, left) if quiet is not None else left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            if quiet is not None:
                break
            continue
        except ConnectionResetError:  # the peer closed with bytes of ours unread: a close, for us
            break
        if not chunk:
            break
        data += chunk
    return data


USERS_ACL = """\
# test users (fixture credentials, not secrets)
user default off
user alice on >alice-pw ~cache:* ~session:* &events:* +@all -@dangerous -flushall -flushdb
user bob on >bob-pw %R~report:* +get +mget +ping +hello
user admin on >admin-pw ~* &* +@all
user nopassuser on nopass ~* +@read
user disabled off >dis-pw ~* +@all
"""


# -- random ACL rules and requests: the differential tests' (tests/acl) and the plans' (tests/policy) --------
KEYS = ["a", "ab", "b", "a:1", "b:2", "x", "abc", "a*", "[a]", "k\\"]
# "*" and "**" give %R~*, %W~*, %RW~* (ordinary patterns, unlike the ~* flag); "" gives the empty pattern.
PATTERNS = ["a*", "b*", "a?", "[ab]*", "*1", "x", "a[^b]*", "*:*", "a\\*", "[a-c]?", "k\\\\", "?", "*", "**", "",
            "\u00e9*", "[a-\u00e9]"]  # fmt: skip
CHANNELS = ["c1", "c2", "news.*", "n*", "x", "", "**"]
# Names no ACL pattern can contain but keys and channels can: empty, NUL, CR/LF, bytes >= 0x80.
EDGE_NAMES = [b"", b"\x00", b"a\x00", b"a\x00b", b"\x00a", b"c1\x00", b"\r\n", b"a\r\n", b"\n", b"\r", b"\xff",
              b"\x80a", b"a\xe9", b"\xc3\xa9", b"a:1\xff"]  # fmt: skip
HUGE = b"a:" + b"\x00\r\n\xff" * (1 << 18)  # a 1 MB name
KEY_NAMES = [k.encode() for k in KEYS] + EDGE_NAMES
CHANNEL_NAMES = [c.encode() for c in CHANNELS] + EDGE_NAMES


def random_rules(rng: random.Random, table: CommandTable, allow_invalid: bool) -> list[str]:
    cmds = [c.name for c in table.commands.values()]
    subs = [s.name for c in table.commands.values() for s in c.subcommands.values()]
    rules: list[str] = ["on"]

    def selector_rule() -> str:
        k = rng.random()
        if k < 0.22:
            return rng.choice(["~", "%R~", "%W~", "%RW~"]) + rng.choice(PATTERNS)
        if k < 0.30:
            return "&" + rng.choice(CHANNELS)
        if k < 0.50:
            return rng.choice("+-") + "@" + rng.choice(table.categories)
        if k < 0.72:
            return rng.choice("+-") + rng.choice(cmds)
        if k < 0.80:
            return rng.choice("+-") + rng.choice(subs)
        if k < 0.83:
            return "+" + rng.choice(["select|0", "select|1", "get|a", "debug|object"])
        return rng.choice(["allkeys", "resetkeys", "allchannels", "resetchannels", "+@all", "-@all", "~*", "&*"])

    for _ in range(rng.randint(1, 9)):
        if rng.random() < 0.12:
            rules.append("(" + " ".join(selector_rule() for _ in range(rng.randint(1, 4))) + ")")
        else:
            rules.append(selector_rule())
    if allow_invalid and rng.random() < 0.3:
        rules.insert(rng.randrange(len(rules) + 1), rng.choice([
            "+@nosuch", "+nosuch", "-select|1", "%X~a", "%R~", "~", "#abc", "<nope", "!" + "0" * 64, "bogus",
            "+config|nosuch", "+config|get|x", "+get|", "~a b",
        ]))  # fmt: skip
    return rules


def random_argv(rng: random.Random, table: CommandTable, name: str) -> list[bytes]:
    cmd = table.get(name)
    assert cmd is not None
    argv = [b.encode() for b in name.split("|")]
    want = abs(cmd.arity) if cmd.arity > 0 else abs(cmd.arity) + rng.randint(0, 4)
    while len(argv) < want:
        r = rng.random()
        if r < 0.0004:
            argv.append(HUGE)  # rare: matching a 1 MB name costs our matcher ~0.2 s per leading-* pattern
        elif r < 0.55:
            argv.append(rng.choice(KEY_NAMES))
        elif r < 0.75:
            argv.append(str(rng.randint(0, 3)).encode())
        elif r < 0.85:
            argv.append(rng.choice(CHANNEL_NAMES))
        else:
            argv.append(rng.choice([b"STORE", b"GET", b"BY", b"STREAMS", b"KEYS", b"LIMIT", b"WITHSCORES"]))
    return argv


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A stream of ``base`` with up to three bytes inserted, deleted or changed (for the fuzz tests)."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 2))
        i = draw(st.integers(0, len(data)))
        if op == 0:
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
        elif op == 1 and i < len(data):
            del data[i]
        elif i < len(data):
            data[i] = draw(st.integers(0, 255))
    return bytes(data)
