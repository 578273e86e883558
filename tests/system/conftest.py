"""Fixtures and helpers of the families of system tests, a section a family: the fidelity tests'
(test_fidelity_*.py), PROXY headers built byte by byte (test_proxy_protocol_*.py, test_lifecycle.py),
the users files of the file-stability tests (test_file_stability_*.py), and the scripts-and-identity
tests' users, upstream and proxies (test_scripts_identity_*.py)."""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import (
    UPSTREAM_PASSWORD,
    UPSTREAM_USER,
    ProxyProc,
    RedisProc,
    free_port,
    raw_exchange,
    read_until,
    start_proxy,
    start_redis,
)  # fmt: skip

# -- fidelity (test_fidelity_*.py): a Redis that enforces POLICY itself, redisguard before the shared one ----
# The policy, loaded into the mirror Redis (as ACL rules) and into redisguard (as its users file).
POLICY = [
    "user default off",
    "user alice on >alice-pw ~cache:* &events:* +@all -@dangerous -flushall",
    "user mon on >mon-pw ~* &* +@all",
    "user noexec on >n-pw ~* &* +@all -exec",
    "user sorter on >s-pw ~cache:* +@all",
]


@pytest.fixture(scope="module")
def mirror() -> Iterator[RedisProc]:
    """A Redis that enforces POLICY itself: the oracle for what a restricted client must see."""
    extra = []
    for line in POLICY:
        extra += ["--user", line.split(" ", 1)[1]]
    r = start_redis(extra=extra)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc) -> Iterator[ProxyProc]:
    d = tmp_path_factory.mktemp("fidelity")
    users = d / "users.acl"
    users.write_text("\n".join(POLICY) + "\n")
    p = start_proxy(d, certs, users, redis_server.port, disabled="[]")
    yield p
    p.stop()


def _group(pattern: bytes, data: bytes) -> bytes:
    """The first group of ``pattern`` in ``data``, which must match."""
    m = re.search(pattern, data)
    assert m is not None, (pattern, data[:200])
    return m.group(1)


def _flush(port: int) -> None:
    c = redis.Redis(port=port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    pipe = c.pipeline(transaction=False)  # (FLUSHDB in each: the service user has -flushall, see start_redis)
    for db in range(16):
        pipe.execute_command("SELECT", db).execute_command("FLUSHDB")
    pipe.execute()
    c.close()


def exchange(port: int, data: bytes, chunks: list[int] | None = None, quiet: float = 0.4, limit: float = 20) -> bytes:
    return raw_exchange(port, data, timeout=limit, quiet=quiet, chunks=chunks)


_ID = re.compile(rb"(\$2\r\nid\r\n:)\d+")


def same_as_redis(mirror: RedisProc, guarded: ProxyProc, script: bytes, redis_server: RedisProc, **kw: Any) -> bytes:
    _flush(mirror.port)
    _flush(redis_server.port)
    want = exchange(mirror.port, script, **kw)
    _flush(redis_server.port)
    got = exchange(guarded.plain_port, script, **kw)
    assert _ID.sub(rb"\1N", got) == _ID.sub(rb"\1N", want)
    return got


def cmds(*argvs: list[bytes] | str) -> bytes:
    return b"".join(a.encode() if isinstance(a, str) else encode_command(a) for a in argvs)


LOGIN = [b"AUTH", b"alice", b"alice-pw"]


# -- PROXY protocol (test_proxy_protocol_*.py, test_lifecycle.py): headers, TLS after one --------------------
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PING = b"*1\r\n$4\r\nPING\r\n"


def auth(user: str, pw: str) -> bytes:
    return b"*3\r\n$4\r\nAUTH\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (user.encode(), pw.encode()))


def v1(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 6380) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 6380, local: bool = False) -> bytes:
    if local:
        return SIG + b"\x20\x00\x00\x00"
    if ":" in src:
        body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst or "::1")
        fam = 0x21
    else:
        body = socket.inet_aton(src) + socket.inet_aton(dst)
        fam = 0x11
    body += struct.pack("!HH", sport, dport) + b"\x04\x00\x03abc"  # and a TLV (NOOP), skipped
    return SIG + bytes((0x21, fam)) + struct.pack("!H", len(body)) + body


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class TLSOverRaw:
    """A TLS client over a raw socket through memory BIOs, so the PROXY header goes first in cleartext
    (in the same segment as the ClientHello when ``together``)."""

    def __init__(self, port: int, cafile: Path, header: bytes, together: bool = True, source: str = "127.0.0.1") -> None:
        self.sock = connect(port, source)
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.check_hostname = False
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out)
        if not together:
            self.sock.sendall(header)
            time.sleep(0.05)
            header = b""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(header + self.out.read())
                header = b""
                self._pull()
        self.sock.sendall(self.out.read())

    def _pull(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed")
        self.inc.write(chunk)

    def call(self, data: bytes, want: int) -> bytes:
        self.obj.write(data)
        self.sock.sendall(self.out.read())
        got = b""
        while got.count(b"\r\n") < want:
            try:
                got += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._pull()
        return got

    def close(self) -> None:
        self.sock.close()


def tcp_call(port: int, data: bytes, want: int, source: str = "127.0.0.1") -> bytes:
    with connect(port, source) as s:
        s.sendall(data)
        return read_until(s, lambda b: b.count(b"\r\n") >= want, timeout=5)


# -- file stability (test_file_stability_*.py): users files, the watch, writing them the wrong way -----------
INTERVAL, SETTLE = 0.5, 2.0  # a writer's pause in the live tests is 0.8-1 s: inside the settle, longer than an interval
WATCH = f"[server]\nreload_interval = {INTERVAL}\nreload_settle = {SETTLE}\n"
APP = "user app on >app-pw ~* &* +@all -@dangerous"
KEEP = "user keep on >keep-pw ~* &* +@all -@dangerous"
OLD = f"user default off\n{APP}\n{KEEP}\n"


def swap(d: Path, version: str) -> None:
    """Kubernetes' atomic writer: ..data -> the new version directory, by rename over the old symlink."""
    os.symlink(version, d / "..data_tmp")
    os.rename(d / "..data_tmp", d / "..data")


def rewrite_in_place(path: Path, *steps: bytes, pause: float) -> None:
    """The wrong way: truncate and write the same inode, in steps with a pause between."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        for i, step in enumerate(steps):
            if i:
                time.sleep(pause)
            os.write(fd, step)
    finally:
        os.close(fd)


# -- scripts and identity (test_scripts_identity_*.py): users, refusals, the module's upstream ---------------
USERS = """\
user default off
user wide on >wide-pw ~* &* +@all
user nodanger on >nodanger-pw ~* &* +@all -@dangerous -flushall
user narrow on >narrow-pw ~u:* +@all -@dangerous
"""
LIB = ("#!lua name=lib\nredis.register_function{function_name='rd', callback=function(keys) return redis.call('GET', keys[1]) "
       "end, flags={'no-writes'}}\nredis.register_function{function_name='sec', callback=function() return "
       "redis.call('GET', 'sec:1') end, flags={'no-writes'}}")
CMD_REFUSED = "The user executing the script can't run this command or subcommand"  # Redis 7.0, from inside a script


REFUSED = "scripts run with the rights of the proxy's service user"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "redisguard", *args], capture_output=True, text=True, timeout=90)


def check_config(p: ProxyProc, *args: str) -> subprocess.CompletedProcess[str]:
    """check-config on a copy of ``p``'s config with other free ports (``p`` holds its own)."""
    text = p.config.read_text()
    for port in (p.tls_port, p.plain_port, p.metrics_port):
        text = text.replace(f'"127.0.0.1:{port}"', f'"127.0.0.1:{free_port()}"')
    copy = p.config.with_name("check.toml")
    copy.write_text(text)
    return cli("check-config", "-c", str(copy), *args)


def client(p: ProxyProc, user: str) -> redis.Redis:
    return redis.Redis(port=p.plain_port, username=user, password=f"{user}-pw", decode_responses=True, socket_timeout=10)


@pytest.fixture(scope="module")
def upstream(own_redis: RedisProc) -> redis.Redis:
    r = redis.Redis(port=own_redis.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, decode_responses=True)
    r.set("sec:1", "secret")
    r.set("u:1", "mine")
    return r


def _proxy(factory: pytest.TempPathFactory, certs: Path, redis_port: int, name: str, **kw: str) -> ProxyProc:
    d = factory.mktemp(name)
    users = d / "users.acl"
    users.write_text(USERS)
    return start_proxy(d, certs, users, redis_port, None, None, **kw)
