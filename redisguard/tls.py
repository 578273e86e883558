"""TLS contexts from config, and the identity a client certificate carries."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from .config import ListenerConfig, UpstreamConfig
from .paths import file_problem


class TLSConfigError(ValueError):
    pass


_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """The context for a ``tls`` listener: its TLS policy, certificate, and client certificates
    (CA, CRL) as configured. Called at start and by every reload, so a new CRL is read with the certs.

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
    try:
        ctx.load_cert_chain(listener.tls.cert_file, listener.tls.key_file)
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"{where}: cannot load {listener.tls.cert_file} / {listener.tls.key_file}: {e.reason or e}"
            " (do the certificate and key match? are they PEM?)"
        ) from None
    except OSError as e:  # (ssl gives no file name: find which one)
        problems = [p for p in (file_problem(listener.tls.cert_file, "certificate"),
                                file_problem(listener.tls.key_file, "key")) if p]  # fmt: skip
        raise TLSConfigError(f"{where}: {'; '.join(problems) or e}") from None
    if listener.client_auth != "none":
        try:
            ctx.load_verify_locations(cafile=listener.tls.ca_file)
        except ssl.SSLError as e:
            raise TLSConfigError(f"{where}: cannot load client CA {listener.tls.ca_file}: {e.reason or e} (is it PEM?)") from None
        except OSError as e:
            assert listener.tls.ca_file is not None
            raise TLSConfigError(f"{where}: {file_problem(listener.tls.ca_file, 'client CA') or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if listener.client_auth == "required" else ssl.CERT_OPTIONAL
        if listener.tls.crl_file is not None:
            _load_crl(ctx, listener.tls.crl_file, where)
    return ctx


def _load_crl(ctx: ssl.SSLContext, path: Path, where: str) -> None:
    """Client certificates are checked against the CRL (the leaf only: VERIFY_CRL_CHECK_LEAF). OpenSSL
    then needs a CRL from the client certificate's issuer, current (not past its nextUpdate), or every
    client certificate of that CA is refused; check-config and a reload read it here first."""
    try:
        ctx.load_verify_locations(cafile=str(path))
    except ssl.SSLError as e:
        raise TLSConfigError(f"{where}: cannot load crl_file {path}: {e.reason or e} (is it a PEM CRL?)") from None
    except OSError as e:
        raise TLSConfigError(f"{where}: crl_file: {file_problem(path, 'CRL') or e}") from None
    if not any(b"-----BEGIN X509 CRL-----" in line for line in path.read_bytes().splitlines()):
        raise TLSConfigError(f"{where}: crl_file {path} holds no PEM CRL (-----BEGIN X509 CRL-----)")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


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
