"""``redisguard audit-upstream``: the upstream Redis's hardening checklist, item by item.

redisguard only protects Redis if nothing else can reach it and its own service user cannot do more
than the proxy's users need. This connects as the configured upstream user (plus once without AUTH,
as a stranger would) and reports each item as pass / warn / fail with the fix; an item the upstream
user may not look at (CONFIG GET, ACL GETUSER or ACL DRYRUN denied) is ``unknown``, never a crash.
Any fail makes the command exit 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import sys
from dataclasses import asdict, dataclass
from typing import Any

import hiredis

from redisguard.config.model import Config
from redisguard.config.parse import _is_loopback
from redisguard.upstream import cluster
from redisguard.upstream.client import upstream_replies

PASS, WARN, FAIL, UNKNOWN = "pass", "warn", "fail", "unknown"

# Commands an attacker with the service user's rights would want; DRYRUN'd as the upstream user.
DANGEROUS = (["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "SET", "dir", "/tmp"], ["KEYS", "*"], ["DEBUG", "SLEEP", "0"],
             ["SHUTDOWN"], ["MODULE", "LOAD", "/tmp/x.so"], ["ACL", "SETUSER", "x"])  # fmt: skip
# Commands hardening guides rename or disable (rename-command NAME ""): present under their own names?
RENAMED = ("flushall", "flushdb", "config", "keys", "debug", "shutdown", "module")
# Passwords people leave in place; tried once each as AUTH default <pw>, never printed.
WEAK = ("foobared", "redis", "password", "default", "123456", "admin", "changeme")
SUPPORTED = (7, 2)  # older minor versions are past their upstream end of life


@dataclass
class Check:
    id: str
    status: str
    detail: str
    fix: str = ""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _config(reply: Any) -> str | None:
    """CONFIG GET's value, or None if the reply was an error (not permitted) or empty."""
    if isinstance(reply, list) and len(reply) == 2:
        return _text(reply[1])
    return None


def _denied(reply: Any, what: str, user: str) -> Check | None:
    if isinstance(reply, hiredis.ReplyError):
        return Check("", UNKNOWN, f"the upstream user {user!r} may not run {what} ({_text(str(reply)).split(' ', 1)[0]})",
                     "run audit-upstream with a config whose [upstream] user may, or check this by hand")  # fmt: skip
    return None


def check_version(info: Any) -> Check:
    if isinstance(info, hiredis.ReplyError):
        return Check("version", UNKNOWN, f"INFO server refused: {info}", "grant the upstream user +info")
    version = next((line.split(":", 1)[1].strip() for line in _text(info).splitlines() if line.startswith("redis_version:")), "")
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return Check("version", UNKNOWN, f"cannot read the version ({version!r})")
    if parts < (7, 0):
        return Check("version", FAIL, f"Redis {version}: older than 7.0 (no ACL selectors; redisguard's ACL language "
                     "is Redis 7's) and out of support", "upgrade Redis to 7.2 or later")  # fmt: skip
    if parts < SUPPORTED:
        return Check("version", WARN, f"Redis {version}: this minor version no longer gets upstream security fixes",
                     "upgrade Redis to 7.2 or later")  # fmt: skip
    return Check("version", PASS, f"Redis {version}")


def check_bind(bind: Any, port: Any, user: str) -> Check:
    if (c := _denied(bind, "CONFIG GET", user)) is not None:
        return Check("bind", c.status, c.detail, c.fix)
    port_s = _config(port) or "?"
    if port_s == "0":
        return Check("bind", PASS, "TCP is off (port 0): Redis is reachable on its unix socket only")
    addrs = (_config(bind) or "").split()
    if not addrs:
        addrs = ["*"]  # no bind: every interface
    exposed = [a for a in addrs if not _is_loopback(a.lstrip("-"))]
    if exposed:
        return Check("bind", FAIL, f"Redis listens on {' '.join(addrs)} port {port_s}: {', '.join(exposed)} is beyond "
                     "loopback, so clients can reach Redis without going through redisguard",
                     "in redis.conf: bind 127.0.0.1 -::1 (or port 0 and a unixsocket shared with redisguard)")  # fmt: skip
    return Check("bind", PASS, f"Redis listens on {' '.join(addrs)} port {port_s} (loopback only)")


def check_protected_mode(reply: Any, user: str) -> Check:
    if (c := _denied(reply, "CONFIG GET", user)) is not None:
        return Check("protected-mode", c.status, c.detail, c.fix)
    if _config(reply) == "no":
        return Check("protected-mode", WARN, "protected-mode is off: if Redis is ever bound beyond loopback with an "
                     "open default user, it answers anyone", "in redis.conf: protected-mode yes")  # fmt: skip
    return Check("protected-mode", PASS, "protected-mode is on")


def check_default_user(getuser: Any, stranger: list[Any], user: str) -> Check:
    """``stranger``: replies to PING and AUTH default <weak>... sent without logging in."""
    fix_off = "ACL SETUSER default off (and `user default off` in the ACL file or redis.conf), then ACL SAVE"
    if stranger and stranger[0] == b"PONG":
        return Check("default-user", FAIL, "a client that connects without AUTH can run commands: the 'default' user "
                     "is on with nopass", fix_off)  # fmt: skip
    if any(r == b"OK" for r in stranger[1:]):
        return Check("default-user", FAIL, "the 'default' user is on with a well-known weak password", fix_off)
    if isinstance(getuser, list):
        fields = dict(zip(getuser[::2], getuser[1::2], strict=False))
        flags = {_text(f) for f in fields.get(b"flags", [])}
        if "on" in flags:
            return Check("default-user", WARN, "the 'default' user is on (with a password): anyone who reaches Redis "
                         "can try passwords against it", "if only redisguard connects: " + fix_off)  # fmt: skip
        return Check("default-user", PASS, "the 'default' user is off")
    if stranger and _text(str(stranger[0])).startswith("NOAUTH"):
        return Check("default-user", WARN, f"clients must AUTH, but whether 'default' is on could not be read "
                     f"(the upstream user {user!r} may not run ACL GETUSER)", "check: ACL GETUSER default")  # fmt: skip
    return Check("default-user", UNKNOWN, "could not tell whether the 'default' user is open", "check: ACL GETUSER default")


def check_upstream_user(dryruns: list[Any], user: str) -> Check:
    # (an error other than NOPERM is a command Redis does not have under that name: renamed, so not runnable)
    denied = next((r for r in dryruns if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOPERM")), None)
    if denied is not None:
        return Check("upstream-user", UNKNOWN, f"cannot check what {user!r} may run: ACL DRYRUN refused ({denied})",
                     f"grant it +acl|dryrun, or check by hand: ACL GETUSER {user}")  # fmt: skip
    allowed = [" ".join(cmd[:1]) for cmd, r in zip(DANGEROUS, dryruns, strict=True) if r == b"OK"]
    if allowed:
        minus = " ".join(f"-{c.lower()}" for c in allowed)
        return Check("upstream-user", WARN, f"the upstream user {user!r} may run {', '.join(allowed)}: scripts and any "
                     "command redisguard lets through run with these rights",
                     f"ACL SETUSER {user} {minus} (keep only what redisguard's users need)")  # fmt: skip
    return Check("upstream-user", PASS, f"the upstream user {user!r} may run none of "
                 f"{', '.join(c[0] for c in DANGEROUS)}")  # fmt: skip


def check_named_commands(info: Any, debug: Any, module: Any, user: str) -> Check:
    if (c := _denied(info, "COMMAND INFO", user)) is not None:
        return Check("dangerous-commands", c.status, c.detail, c.fix)
    present = [name.upper() for name, r in zip(RENAMED, info, strict=True) if r is not None]
    enabled = {k: _config(v) for k, v in (("enable-debug-command", debug), ("enable-module-command", module))}
    on = [k for k, v in enabled.items() if v == "yes"]
    if on:
        return Check("dangerous-commands", FAIL, f"{' and '.join(on)} is yes: any user allowed DEBUG / MODULE LOAD can "
                     "run them (MODULE LOAD runs native code inside Redis)",
                     " ".join(f"{k} no" for k in on) + " in redis.conf")  # fmt: skip
    if present:
        local = [k for k, v in enabled.items() if v == "local"]
        extra = f"; {' and '.join(local)} is local, and every proxied client is local to Redis" if local else ""
        return Check("dangerous-commands", WARN, f"{', '.join(present)} are available under their own names{extra}",
                     'deny them to every Redis user but an admin (ACL), or rename-command NAME "" in redis.conf')  # fmt: skip
    return Check("dangerous-commands", PASS, f"{', '.join(n.upper() for n in RENAMED)} are renamed or disabled")


def check_dir(reply: Any, local: bool, user: str) -> Check:
    if (c := _denied(reply, "CONFIG GET", user)) is not None:
        return Check("persistence-dir", c.status, c.detail, c.fix)
    path = _config(reply)
    if not path:
        return Check("persistence-dir", UNKNOWN, "CONFIG GET dir gave no directory")
    if not local:
        return Check("persistence-dir", UNKNOWN, f"{path} is on the Redis host, not here",
                     f"on that host: chmod o-w,g-w {path}")  # fmt: skip
    try:
        st = os.stat(path)
    except OSError as e:
        return Check("persistence-dir", UNKNOWN, f"cannot stat {path}: {e.strerror}")
    mode = stat.S_IMODE(st.st_mode)
    fix = f"chmod 0750 {path} (owned by the redis user)"
    if mode & stat.S_IWOTH:
        return Check("persistence-dir", FAIL, f"{path} (mode {mode:04o}) is writable by every user: anyone on the host "
                     "can replace the RDB/AOF files Redis loads", fix)  # fmt: skip
    if mode & stat.S_IWGRP:
        return Check("persistence-dir", WARN, f"{path} (mode {mode:04o}) is writable by its group", fix)
    return Check("persistence-dir", PASS, f"{path} (mode {mode:04o}) is writable by its owner only")


async def audit(config: Config) -> list[Check]:
    up = config.upstream
    user = up.username or "default"
    dry = [["ACL", "DRYRUN", user, *cmd] for cmd in DANGEROUS]
    ask = [["INFO", "server"], ["CONFIG", "GET", "bind"], ["CONFIG", "GET", "port"], ["CONFIG", "GET", "protected-mode"],
           ["ACL", "GETUSER", "default"], ["CONFIG", "GET", "dir"], ["CONFIG", "GET", "enable-debug-command"],
           ["CONFIG", "GET", "enable-module-command"], ["COMMAND", "INFO", *RENAMED], *dry,
           *map(list, cluster.QUERIES)]  # fmt: skip
    timeout = up.connect_timeout * 5
    r = await upstream_replies(config, [[a.encode() for a in c] for c in ask], timeout)
    stranger = await upstream_replies(config, [[b"PING"], *([b"AUTH", b"default", w.encode()] for w in WEAK)], timeout,
                                      login=False)  # fmt: skip
    info, bind, port, pmode, getuser, pdir, debug, module, cmdinfo = r[:9]
    local = up.path is not None or _is_loopback(up.host)
    return [
        check_version(info),
        check_bind(bind, port, user),
        check_protected_mode(pmode, user),
        check_default_user(getuser, stranger, user),
        check_upstream_user(r[9:9 + len(dry)], user),
        check_named_commands(cmdinfo, debug, module, user),
        check_dir(pdir, local, user),
        *(Check(f.id, f.status, f.detail, f.fix) for f in cluster.findings(config, r[9 + len(dry):])),
    ]


def main(config: Config, as_json: bool = False) -> int:
    up = config.upstream
    try:
        checks = asyncio.run(audit(config))
    except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as e:
        print(f"redisguard: cannot audit the upstream Redis at {up.where} as {up.username or 'default'!r}: "
              f"{e or type(e).__name__}", file=sys.stderr)  # fmt: skip
        return 2
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"upstream": up.where, "user": up.username or "default", "ok": not failed,
                          "checks": [asdict(c) for c in checks]}, indent=2))  # fmt: skip
    else:
        print(f"upstream Redis at {up.where}, as {up.username or 'default'!r}:")
        for c in checks:
            print(f"  {c.status.upper():8} {c.id:19} {c.detail}")
            if c.fix and c.status != PASS:
                print(f"  {'':8} {'':19} fix: {c.fix}")
        counts = {s: sum(c.status == s for c in checks) for s in (FAIL, WARN, UNKNOWN, PASS)}
        print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if failed else 0

