"""What check-config finds in a config beyond its files and addresses (cli/preflight.py): the upstream
identity as ``serve`` would resolve it and what it means for scripts, and login rules that name nobody."""

from __future__ import annotations

from typing import Any

from redisguard.commands.table import CommandTable
from redisguard.config.model import Config
from redisguard.policy.decide import Policy


def identity_findings(config: Config, users: dict[str, Any], table: CommandTable, ask_redis: bool
                      ) -> tuple[list[str], list[str], str]:  # fmt: skip
    """check-config: (errors, warnings, the identity line). The identity as ``serve`` would resolve it
    (asking Redis, unless ``ask_redis`` is off), why ``serve`` would refuse it, and in service identity
    the users whose scripts are refused (or, opted in, run with the service user's wider rights)."""
    import asyncio

    from redisguard.config.model import mirror_prefix_conflict
    from redisguard.policy.decide import SCRIPT_COMMANDS, covers, refused_commands, script_callable
    from redisguard.upstream.service import Resolution, resolve

    up = config.upstream
    if ask_redis:
        r = asyncio.run(resolve(config, table))
    else:
        r = Resolution(config, "configured" if up.identity != "auto" else
                       "auto: decided at start-up by asking Redis (not asked: --offline or --skip-bind)")  # fmt: skip
    note = f"upstream identity: {r.identity if up.identity != 'auto' or ask_redis else 'auto'} ({r.why})"
    if r.identity == "mirror":  # (configured "mirror" was checked when parsed; "auto" may resolve to it)
        conflict = mirror_prefix_conflict(up)
        return ([f"[upstream] mirror_prefix: {conflict}"] if conflict else []), [], note
    who = up.username or "default"
    policy = Policy(table, users, frozenset(config.acl.disabled_commands))
    refused, scriptable = refused_commands(policy), script_callable(table)
    narrower = [u.name for u in users.values() if any(s.allowed & SCRIPT_COMMANDS for s in u.selectors)
                and not covers(u, r.service, refused, scriptable)]  # fmt: skip
    if not narrower or (up.identity == "auto" and not ask_redis):  # (unresolved: may well be mirror)
        return list(r.problems), [], note
    names = ", ".join(map(repr, narrower[:10])) + (f" and {len(narrower) - 10} more" if len(narrower) > 10 else "")
    unknown = ("" if r.service is not None else f" (its rights could not be read, {r.unread}: counted as every right; "
               f"ACL SETUSER {who} +acl|getuser lets it read them)" if r.unread else
               " (its rights unknown here: counted as every right)")  # fmt: skip
    if up.service_scripts == "allow":
        warning = (f'[upstream] service_scripts = "allow": scripts of {names} run with the rights of the service user '
                   f"{who!r}{unknown}, which are wider than theirs: redisguard cannot enforce their rules inside "
                   'scripts (use [upstream] identity = "mirror")')  # fmt: skip
    else:
        warning = (f"scripts (EVAL, EVALSHA, FCALL, FUNCTION LOAD/RESTORE) are refused for {names}: in service identity "
                   f"they would run with the rights of the service user {who!r}{unknown}, which are wider than theirs "
                   '(use [upstream] identity = "mirror" to let them run scripts with their own rights)')  # fmt: skip
    return list(r.problems), [warning], note


def login_warnings(config: Config, users: dict[str, Any]) -> list[str]:
    """[acl] cert_only and user_sources that name nobody, and certificate-only users with no way in."""
    from redisguard.policy.decide import LoginRules

    out = [f"acl.user_sources: no user {name!r} in the users file" for name, _ in config.acl.user_sources if name not in users]
    cert_login = any(lst.cert_user for lst in config.listeners)
    for pattern in config.acl.cert_only:
        rule = LoginRules(cert_only=(pattern.encode("utf-8", "surrogateescape"),))
        matched = [u for u in users if rule.refusal(u, "", "password") == "cert_only"]
        if not matched:
            out.append(f"acl.cert_only: {pattern!r} matches no user in the users file")
        elif not cert_login:
            out.append(f"acl.cert_only: {', '.join(map(repr, matched[:5]))} may log in only with a client certificate, "
                       "but no tls listener has cert_user set: they cannot log in at all")  # fmt: skip
    return out
