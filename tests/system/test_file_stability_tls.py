"""A certificate is served only with its key, as the pair a reload checked (issue 21 §3): the TLS
context is built from the bytes read, not from the paths; live, a certificate replaced before its key
(probed by TLS handshakes, as fast as they can) is served only with it."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import stat
import threading
import time
from pathlib import Path

import pytest

from redisguard.cli.certs import init_dev_certs
from redisguard.config.model import ListenerConfig, TLSFiles
from redisguard.transport import tls
from tests.helpers import RedisProc, scrape, start_proxy
from tests.system.conftest import OLD, WATCH, rewrite_in_place


@pytest.mark.parametrize("memfd", [True, False])
def test_loadable_paths_hold_exactly_the_bytes_and_vanish(monkeypatch: pytest.MonkeyPatch, memfd: bool) -> None:
    """ssl loads only from paths: memfds (nothing on disk), or a private 0700 directory removed at once."""
    monkeypatch.setattr(tls, "_MEMFD", [memfd])
    with tls.loadable(b"cert\n", b"key\n") as paths:
        assert [Path(p).read_bytes() for p in paths] == [b"cert\n", b"key\n"]
        if not memfd:
            d = Path(paths[0]).parent
            assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(Path(paths[1]).stat().st_mode) == 0o600
    assert all(not Path(p).exists() for p in paths)


def test_server_context_is_built_from_the_bytes_given_not_the_path(tmp_path: Path) -> None:
    """What the reload checked is what is loaded: the files on disk no longer matter."""
    init_dev_certs(tmp_path / "a")
    init_dev_certs(tmp_path / "b")
    live = TLSFiles(tmp_path / "live.pem", tmp_path / "live.key")
    lst = ListenerConfig("tls", "tls", "127.0.0.1", 0, tls=live)
    files = {live.cert_file: (tmp_path / "a/server.pem").read_bytes(), live.key_file: (tmp_path / "a/server.key").read_bytes()}
    (tmp_path / "live.pem").write_bytes((tmp_path / "b/server.pem").read_bytes())  # another pair on disk
    (tmp_path / "live.key").write_bytes((tmp_path / "b/server.key").read_bytes())
    assert served(tls.server_context(lst, files)) == fingerprint(tmp_path / "a/server.pem")
    assert served(tls.server_context(lst)) == fingerprint(tmp_path / "b/server.pem")  # (None: what is there now)


def fingerprint(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


def served(ctx: ssl.SSLContext) -> str:
    """The certificate a server context presents, by an in-memory handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s, c = ctx.wrap_bio(bios[0], bios[1], server_side=True), client.wrap_bio(bios[2], bios[3])
    for _ in range(10):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


class CertProbe:
    """TLS handshakes as fast as it can: the certificate each one was served (consecutive repeats
    merged), and any handshake that failed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        while not self.stopping.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                        ctx.wrap_socket(raw) as s:  # fmt: skip
                    der = s.getpeercert(binary_form=True)
                    assert der is not None
                    fp = hashlib.sha256(der).hexdigest()
            except (OSError, ssl.SSLError) as e:
                self.errors.append(repr(e))
                continue
            if not self.seen or self.seen[-1] != fp:
                self.seen.append(fp)


def test_a_certificate_replaced_before_its_key_is_served_only_with_it(tmp_path: Path, own_redis: RedisProc) -> None:
    """cert written in place, the key 1 s later: the old pair is served until both are stable, then the
    new one; no reload ever tries (and fails on) the new certificate with the old key."""
    own, new = tmp_path / "certs", tmp_path / "new"
    init_dev_certs(own)
    init_dev_certs(new)
    old = fingerprint(own / "server.pem")
    users = tmp_path / "users.acl"
    users.write_text(OLD)
    p = start_proxy(tmp_path, own, users, own_redis.port, extra=WATCH)
    probe = CertProbe(p.tls_port)
    try:
        time.sleep(1)
        rewrite_in_place(own / "server.pem", (new / "server.pem").read_bytes(), pause=0)
        time.sleep(1.0)
        rewrite_in_place(own / "server.key", (new / "server.key").read_bytes(), pause=0)
        deadline = time.monotonic() + 40
        while probe.seen[-1:] != [fingerprint(new / "server.pem")]:
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.05)
        time.sleep(0.5)
        probe.stopping.set()
        probe.thread.join(15)
        assert probe.errors == []
        assert probe.seen == [old, fingerprint(new / "server.pem")]
        m = scrape(p.metrics_port)
        assert m['redisguard_config_reload_total{result="success"}'] == 1
        assert m.get('redisguard_config_reload_total{result="failure"}', 0) == 0
        assert "config_reload_failed" not in p.log.read_text()
    finally:
        probe.stopping.set()
        p.stop()
