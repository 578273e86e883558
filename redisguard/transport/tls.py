"""TLS contexts from config, and the identity a client certificate carries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509

from redisguard.config.model import ListenerConfig, UpstreamConfig
from redisguard.files.problems import file_problem
from redisguard.files.versions import FileChanged, FileUnreadable, read_now


class TLSConfigError(ValueError):
    pass


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# The context each listener was last built as, and from what (its settings, its files' digests). Built
# again only when one of those changes: a reload that changes no certificate keeps the context, and with
# it the session-ticket key (clients resume across the reload); and the workers, forked after the
# supervisor built it, share it, so one ticket key serves the instance and a session resumes whichever
# worker accepts the connection (OpenSSL makes the key when the context is made; Python cannot set it).
_built: dict[str, tuple[tuple[object, ...], ssl.SSLContext]] = {}


def server_context(listener: ListenerConfig, files: Mapping[Path, bytes] | None = None) -> ssl.SSLContext:
    """The context for a ``tls`` listener: its TLS policy, certificate, and client certificates
    (CA, CRL) as configured. Called at start and by every reload, so a new CRL is read with the certs.
    Built from ``files`` (path -> bytes, as the reload read and checked them), else from the files as
    they are now (:func:`read_listener_files`); OpenSSL never re-reads a path on its own. The same
    context as last time when neither the listener's settings nor its files changed (see ``_built``)."""
    files = read_listener_files(listener) if files is None else files
    key = (repr(listener), *(hashlib.sha256(files[path]).digest() for path, _, _ in listener_files(listener)))
    last = _built.get(listener.name)
    if last is not None and last[0] == key:
        return last[1]
    ctx = _build_server_context(listener, files)
    _built[listener.name] = (key, ctx)
    return ctx


def _build_server_context(listener: ListenerConfig, files: Mapping[Path, bytes]) -> ssl.SSLContext:
    """A new context for the listener, from ``files``.

    What Python's ssl can set: the minimum version, the TLS 1.2 cipher string, one ECDH group, and
    session tickets (off: ``OP_NO_TICKET`` for TLS 1.2 and no TLS 1.3 tickets). TLS 1.3 suites are
    only validated (config.py); OCSP stapling is not supported (see docs/security.md)."""
    assert listener.tls is not None
    pol = listener.tls_policy
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[pol.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    where = f"listener {listener.name!r}"
    try:
        if pol.ciphers:
            ctx.set_ciphers(pol.ciphers)
        for curve in pol.ecdh_curves:  # (config.py allows one)
            ctx.set_ecdh_curve(curve)
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"{where}: ciphers / ecdh_curves: {e}") from None
    if not pol.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 (and stateful-only tickets in TLS 1.3) ...
        ctx.num_tickets = 0  # ... and no TLS 1.3 NewSessionTicket at all
    with loadable(files[listener.tls.cert_file], files[listener.tls.key_file]) as (cert, key):
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise TLSConfigError(
                f"{where}: cannot load {listener.tls.cert_file} / {listener.tls.key_file}: {e.reason or e}"
                " (do the certificate and key match? are they PEM?)"
            ) from None
    if listener.client_auth != "none":
        assert listener.tls.ca_file is not None
        with loadable(files[listener.tls.ca_file]) as (ca,):
            try:
                ctx.load_verify_locations(cafile=ca)
            except ssl.SSLError as e:
                raise TLSConfigError(f"{where}: cannot load client CA {listener.tls.ca_file}: {e.reason or e} "
                                     "(is it PEM?)") from None  # fmt: skip
        ctx.verify_mode = ssl.CERT_REQUIRED if listener.client_auth == "required" else ssl.CERT_OPTIONAL
        if listener.tls.crl_file is not None:
            _load_crl(ctx, listener.tls.crl_file, files[listener.tls.crl_file], where)
    return ctx


def _load_crl(ctx: ssl.SSLContext, path: Path, data: bytes, where: str) -> None:
    """Client certificates are checked against the CRL (the leaf only: VERIFY_CRL_CHECK_LEAF). OpenSSL
    then needs a CRL from the client certificate's issuer, current (not past its nextUpdate), or every
    client certificate of that CA is refused; check-config and a reload read it here first."""
    with loadable(data) as (crl,):
        try:
            ctx.load_verify_locations(cafile=crl)
        except ssl.SSLError as e:
            raise TLSConfigError(f"{where}: cannot load crl_file {path}: {e.reason or e} (is it a PEM CRL?)") from None
    if not any(b"-----BEGIN X509 CRL-----" in line for line in data.splitlines()):
        raise TLSConfigError(f"{where}: crl_file {path} holds no PEM CRL (-----BEGIN X509 CRL-----)")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def listener_files(listener: ListenerConfig) -> list[tuple[Path, str, str]]:
    """(path, role, config key) of each file a TLS listener's context is built from."""
    assert listener.tls is not None
    t = listener.tls
    out = [(t.cert_file, "certificate", ""), (t.key_file, "key", "")]
    if t.ca_file is not None:  # (read even without client_auth: its expiry is exported)
        out.append((t.ca_file, "client CA", ""))
    if t.crl_file is not None:
        out.append((t.crl_file, "CRL", "crl_file: "))
    return out


def read_listener_files(listener: ListenerConfig) -> dict[Path, bytes]:
    """The listener's certificate files as they are now, each read once and re-read (file_versions.read_now)."""
    out: dict[Path, bytes] = {}
    problems = []
    for path, role, key in listener_files(listener):
        try:
            out.update(read_now([path]))
        except FileUnreadable as e:
            problems.append(key + (file_problem(path, role) or str(e)))
        except FileChanged as e:
            problems.append(key + str(e))
    if problems:
        raise TLSConfigError(f"listener {listener.name!r}: {'; '.join(problems)}")
    return out


def _memfd_works() -> bool:
    """Can OpenSSL open a memfd through /proc/self/fd (Linux, /proc mounted, a dumpable process)?"""
    try:
        fd = os.memfd_create("redisguard-probe", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return False
    try:
        with open(f"/proc/self/fd/{fd}", "rb"):
            return True
    except OSError:
        return False
    finally:
        os.close(fd)


_MEMFD: list[bool] = []  # (probed once)


@contextlib.contextmanager
def loadable(*blobs: bytes) -> Iterator[list[str]]:
    """Paths that hold exactly ``blobs``, for ssl's loaders (they take only paths): anonymous memory files
    (memfd: on no filesystem, works with a read-only root), else files in a private 0700 temporary
    directory. Gone when the block ends: keys are never left behind."""
    if not _MEMFD:
        _MEMFD.append(_memfd_works())
    if _MEMFD[0]:
        fds: list[int] = []
        try:
            for blob in blobs:
                fds.append(os.memfd_create("redisguard-tls", os.MFD_CLOEXEC))
                _write_all(fds[-1], blob)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="redisguard-tls-") as d:  # mkdtemp: mode 0700
        paths = [os.path.join(d, str(i)) for i in range(len(blobs))]
        for path, blob in zip(paths, blobs, strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, blob)
            finally:
                os.close(fd)
        yield paths


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def upstream_context(up: UpstreamConfig) -> ssl.SSLContext | None:
    """For upstream-TLS mode: verify the remote Redis against tls_ca_file (or the system CAs)."""
    if not up.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(up.tls_ca_file) if up.tls_ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if up.tls_cert_file and up.tls_key_file:
        ctx.load_cert_chain(up.tls_cert_file, up.tls_key_file)
    return ctx


def peer_identity(cert: dict[str, Any] | None, kind: str) -> str:
    """The name a verified client certificate gives for ``kind`` (cn, san_dns, san_uri), or ""."""
    if not cert:
        return ""
    if kind == "cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return ""
    want = {"san_dns": "DNS", "san_uri": "URI"}[kind]
    for key, value in cert.get("subjectAltName", ()):
        if key == want:
            return str(value)
    return ""


def certificate_identity(transport: asyncio.BaseTransport, lst: ListenerConfig) -> str:
    """The name a verified client certificate gives (per the listener's cert_user), or ""."""
    if lst.type != "tls":
        return ""
    sslobj = transport.get_extra_info("ssl_object")
    cert = sslobj.getpeercert() if sslobj is not None else None
    return peer_identity(cert, lst.cert_user or "cn") if cert else ""


def not_after(path: str | os.PathLike[str], data: bytes | None = None) -> float:
    """Expiry of the first certificate in a PEM file (``data``: its bytes as already read), as a Unix timestamp."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes() if data is None else data)
    return cert.not_valid_after_utc.timestamp()


class OpenSSLSupport:
    """This process's OpenSSL, as the config checks it (config.parse.TLSSupport)."""

    def ciphers_ok(self, ciphers: str) -> bool:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            return False
        return True

    def tls13_suites(self) -> tuple[str, ...]:
        """The TLS 1.3 suites a server context offers: OpenSSL's defaults, or what OpenSSL's own config
        (OPENSSL_CONF, ``Ciphersuites =``) sets for the process. Python's ssl cannot change them."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        return tuple(c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3")

    def curve_ok(self, name: str) -> bool:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ecdh_curve(name)
        except (ValueError, TypeError):
            return False
        return True


OPENSSL = OpenSSLSupport()
