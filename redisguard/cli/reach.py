"""Can redisguard reach its Redis as configured? ``check-config`` (unless ``--offline``) and ``serve``.

The same connection every client's upstream connection and every start-up question make
(:mod:`redisguard.upstream.client`): connect (TLS if ``[upstream] tls``), AUTH as the service user, COMMAND
INFO (and ACL CAT, INFO server: the command table ``serve`` reads at start, if ``fetch_command_table``),
and in mirror identity whether the service user may manage the mirror users (ACL SETUSER, DELUSER,
USERS). Each failure is one line that names the fix. ``check-config`` fails on them; ``serve`` logs them
as warnings and starts anyway (Redis may come up later: its health check and clients wait for it).
``redisguard audit-upstream`` goes further: the hardening checklist of that Redis.
"""

from __future__ import annotations

import asyncio
import errno
import ssl

from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.upstream.client import UpstreamReplyError, fetch_command_table, upstream_request
from redisguard.upstream.service import MIRROR_COMMANDS, UNREACHABLE, may_run

AUDIT_HINT = "run redisguard audit-upstream for a full audit of that Redis"


def reach_problem(config: Config, e: BaseException) -> str:
    """One line for why the upstream could not be reached or logged in to, naming the fix."""
    up = config.upstream
    where, who = f"upstream {up.where}", up.username or "default"
    if isinstance(e, UpstreamReplyError):
        code = e.reply.split(" ", 1)[0]
        if "without any password configured" in e.reply:
            return (f"upstream: Redis at {up.where} has no password for {who!r}, but one is configured: remove [upstream] "
                    "password_file / password_env, or give the Redis user a password")  # fmt: skip
        if code == "WRONGPASS" or (code == "ERR" and "invalid password" in e.reply):
            return (f"upstream: the service user {who!r} was refused ({code}): check [upstream] username/password_file "
                    "(or password_env) against the Redis ACL user")  # fmt: skip
        if code == "NOAUTH":
            return (f"upstream: Redis at {up.where} requires a password and none is configured: set [upstream] "
                    "username and password_file")  # fmt: skip
        if code == "LOADING":
            return f"{where}: Redis is loading its dataset — try again in a moment"
        return f"upstream: Redis refused the service user {who!r}'s request ({e.reply})"
    if isinstance(e, ssl.SSLError):
        reason = getattr(e, "reason", None) or str(e)
        return (f"{where}: TLS handshake failed ({reason}) — check [upstream] tls_ca_file, tls_server_name and "
                "tls_cert_file/tls_key_file against Redis's tls-port and certificates")  # fmt: skip
    if isinstance(e, TimeoutError):
        return (f"{where}: no answer within {up.connect_timeout:g} s — is the address right, is a firewall in between, "
                "or is Redis blocked? ([upstream] address, connect_timeout)")  # fmt: skip
    if isinstance(e, ConnectionRefusedError):
        return f"{where}: connection refused — is Redis running? ([upstream] address)"
    if isinstance(e, FileNotFoundError):
        return f"{where}: no such socket — is Redis running, with unixsocket at that path? ([upstream] address)"
    if isinstance(e, PermissionError):
        return f"{where}: permission denied — may this user open Redis's unix socket? (unixsocketperm in redis.conf)"
    if isinstance(e, OSError) and e.errno is None:  # (ours: Redis closed the connection without a reply)
        tls = ("a TLS port? set [upstream] tls = true" if not up.tls else "a plain-text port? check [upstream] tls")
        return f"{where}: Redis closed the connection before answering — is it {tls}; or maxclients reached?"
    if isinstance(e, OSError) and e.errno == errno.ECONNRESET:
        return f"{where}: connection reset by Redis — check [upstream] tls and proxy_protocol against that port"
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    return f"{where}: cannot connect ({reason}) — check [upstream] address"


async def _reach(config: Config) -> list[str]:
    up = config.upstream
    who = up.username or "default"
    try:
        if up.fetch_command_table:  # COMMAND INFO, ACL CAT, INFO server: what serve reads at start
            table = await fetch_command_table(config)
        else:
            await upstream_request(config, [[b"PING"]], up.connect_timeout * 5)
            table = CommandTable.snapshot()
        if up.identity != "mirror":  # ("auto" resolves to mirror only when these are granted)
            return []
        ok = await may_run(config, table, MIRROR_COMMANDS)
    except UpstreamReplyError as e:
        if e.reply.startswith("NOPERM"):
            what = "COMMAND INFO, ACL CAT and INFO server" if up.fetch_command_table else "PING"
            fix = f"ACL SETUSER {who} +command|info +acl|cat +info" if up.fetch_command_table else f"ACL SETUSER {who} +ping"
            return [f"upstream: the service user {who!r} may not run {what} ({e.reply}): {fix}"
                    + (", or set [upstream] fetch_command_table = false" if up.fetch_command_table else "")]  # fmt: skip
        return [reach_problem(config, e)]
    except UNREACHABLE as e:
        return [reach_problem(config, e)]
    names = [n.replace("|", " ").upper() for n, yes in zip(MIRROR_COMMANDS, ok or [False] * 3, strict=True) if not yes]
    if not names:
        return []
    extra = " (nor MULTI/DISCARD, with which redisguard asks)" if ok is None else ""
    return [f'upstream: [upstream] identity = "mirror" needs the service user {who!r} to manage Redis ACL users, but '
            f"it may not run {', '.join(names)}{extra}: ACL SETUSER {who} "
            + " ".join("+" + n for n in MIRROR_COMMANDS) + (" +multi +discard" if ok is None else "")
            + " (and in Redis's ACL file), or use identity = \"service\""]  # fmt: skip


def reach_upstream(config: Config) -> list[str]:
    """One line per reason redisguard could not work with its Redis as configured (empty: it can)."""
    return asyncio.run(_reach(config))


def warn_at_start(config: Config) -> None:
    """``serve``: each reason, logged as a warning (not fatal: Redis may come up later, and clients, the
    health check and /readyz wait for it)."""
    from redisguard.observe.audit import get_logger

    for problem in reach_upstream(config):
        get_logger("redisguard").warning("upstream_check_failed", error=problem, detail=AUDIT_HINT)
