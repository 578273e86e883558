"""``redisguard serve | check-config | audit-upstream | firewall | certs init | acl check | acl hash | demo``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from redisguard import __version__, fast
from redisguard.acl import ACLError, UsersFileError, hash_password, load_users, missing_default_message
from redisguard.cli import acl as cli_acl
from redisguard.cli.findings import identity_findings, login_warnings
from redisguard.cli.preflight import preflight, proxy_protocol_warnings, root_warning
from redisguard.cli.usage import manual
from redisguard.commands.table import CommandTable
from redisguard.config.load import load_config
from redisguard.config.model import Config, ConfigError
from redisguard.policy.decide import Policy, decide
from redisguard.transport.tls import OPENSSL

if TYPE_CHECKING:
    from redisguard.upstream.service import Resolution

# -c/--config when not given: $REDISGUARD_CONFIG, else the packaged location (the container image's too).
SYSTEM_CONFIG = "/etc/redisguard/redisguard.toml"


def _die(msg: str, code: int = 2) -> int:
    print(f"redisguard: {msg}", file=sys.stderr)
    return code


def default_config() -> str:
    return os.environ.get("REDISGUARD_CONFIG") or SYSTEM_CONFIG


def _load(path: str) -> Config:
    """The config, or a ConfigError that says how to point at one when the file is missing."""
    if not Path(path).exists():
        raise ConfigError(f"config file not found: {path} (pass -c/--config PATH or set REDISGUARD_CONFIG)")
    return load_config(path, tls=OPENSSL)


def cmd_serve(args: argparse.Namespace) -> int:
    from redisguard.observe.audit import configure_logging
    from redisguard.runtime.server import run

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _die(str(e))
    problems = preflight(config, takeover=args.takeover)
    if problems:
        for problem in problems:
            print(f"redisguard: {problem}", file=sys.stderr)
        return 2
    configure_logging(config.log.format, config.log.level)
    if warning := root_warning():
        from redisguard.observe.audit import get_logger

        get_logger("redisguard").warning("running_as_root", detail=warning)
    for warning in proxy_protocol_warnings(config):
        from redisguard.observe.audit import get_logger

        get_logger("redisguard").warning("proxy_sources_too_wide", detail=warning)
    from redisguard.cli.reach import warn_at_start

    warn_at_start(config)  # what check-config says of its Redis, as warnings: Redis may come later
    resolution = _resolve_identity(config)
    if resolution.problems:
        for problem in resolution.problems:
            print(f"redisguard: {problem}", file=sys.stderr)
        return 2
    config = resolution.config  # the identity every worker uses, decided once here, before any fork
    if config.server.workers > 1:
        from redisguard.runtime.supervisor import serve

        try:
            return serve(config)
        except OSError as e:
            return _die(str(e))
    try:
        import uvloop

        uvloop.run(run(config))
    except (UsersFileError, ACLError, ValueError, OSError) as e:
        return _die(str(e))
    except KeyboardInterrupt:
        pass
    return 0


def _resolve_identity(config: Config) -> Resolution:
    """[upstream] identity as Redis answers it (upstream.service.resolve), logged; with the shipped command table."""
    import asyncio

    from redisguard.observe.audit import get_logger
    from redisguard.upstream.service import resolve

    resolution = asyncio.run(resolve(config, CommandTable.snapshot()))
    get_logger("redisguard").info("upstream_identity", identity=resolution.identity, why=resolution.why)
    return resolution


def config_warnings(config_path: str, bind: bool = True, notes: list[str] | None = None, offline: bool = False
                    ) -> tuple[list[str], list[str]]:  # fmt: skip
    """(errors, warnings) for a config, its users file and certificates, and (``bind``) its addresses and
    (unless ``offline``) its Redis; ``notes`` gets what is worth knowing besides (the upstream identity)."""
    warnings: list[str] = []
    try:
        config = _load(config_path)
    except ConfigError as e:
        return [str(e)], []
    errors = preflight(config, bind=bind)
    bind = bind and not offline  # (from here on: whether to ask Redis)
    if bind:  # a config for this host: can it reach its Redis? is that a cluster node announcing this sidecar?
        from redisguard.cli.reach import reach_upstream

        errors += reach_upstream(config)
        from redisguard.upstream.cluster import config_check

        cluster_errors, cluster_warnings = config_check(config)
        errors += cluster_errors
        warnings += cluster_warnings
    if warning := root_warning():
        warnings.append(warning)
    warnings += proxy_protocol_warnings(config)
    if any(e.startswith("acl.users_file:") for e in errors):
        return errors, warnings
    table = CommandTable.snapshot()
    for c in config.acl.disabled_commands:
        if table.get(c) is None:
            warnings.append(f"acl.disabled_commands: {c!r} is not a Redis 7.0 command")
    try:
        users = load_users(config.acl.users_file, table)
    except UsersFileError as e:
        return [*errors, str(e)], warnings
    d = users["default"]
    if d.implicit:
        warnings.append(missing_default_message(str(config.acl.users_file)) + " (a reload refuses such a file)")
    if d.enabled and d.nopass:
        warnings.append(
            "users file: the 'default' user is on with nopass: any client that connects can run what "
            "it allows without AUTH (add 'user default off' to require authentication)"
        )
    warnings += login_warnings(config, users)
    problems, script_warnings, note = identity_findings(config, users, table, ask_redis=bind)
    if notes is not None:
        notes.append(note)
    return errors + problems, warnings + script_warnings


def cmd_check_config(args: argparse.Namespace) -> int:
    notes: list[str] = []
    errors, warnings = config_warnings(args.config, bind=not args.skip_bind, notes=notes, offline=args.offline)
    if args.peer and not errors:
        from redisguard.cli.peers import compare, config_digest

        digest = config_digest(_load(args.config))
        notes.append(f"policy digest: {digest} (redisguard_policy_info)")
        peer_errors, peer_notes = compare(digest, args.peer)
        errors, notes = errors + peer_errors, notes + peer_notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)  # (stdout stays the one OK line scripts read)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if any(e.startswith("upstream") for e in errors):
        from redisguard.cli.reach import AUDIT_HINT

        print(f"note: {AUDIT_HINT}; --offline skips reaching Redis", file=sys.stderr)
    if errors:
        return 1
    print(f"{args.config}: OK")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from redisguard.cli.certs import init_dev_certs

    written = init_dev_certs(args.dir, args.san, args.client_name, force=args.force)
    if not written:
        print(f"{args.dir}: dev certificates already exist (use --force to replace them)")
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_acl_check(args: argparse.Namespace) -> int:
    table = CommandTable.snapshot()
    acl, scripts = None, "refuse"
    if args.config:  # the proxy's own verdict: its users file, disabled and protected commands
        try:
            config = _load(args.config)
        except ConfigError as e:
            return _die(str(e))
        acl, scripts = config.acl, "allow" if config.upstream.identity == "mirror" else "refuse"
    users_path = args.users or (acl.users_file if acl else "config/users.acl")
    try:
        users = load_users(users_path, table)
    except UsersFileError as e:
        return _die(str(e))
    user = users.get(args.user)
    if user is None:
        return _die(f"no user {args.user!r} in {users_path}")
    argv = [a.encode() for a in args.argv]
    if not argv:
        return _die("give the command after --, e.g. -- SET cache:1 x")
    policy = Policy(table, users, service_scripts=scripts)  # (service identity: the service user's rights unknown)
    if acl is not None:
        # ("upstream" is read from Redis at start; offline it counts as "no", Redis's default)
        policy = replace(policy, disabled=frozenset(acl.disabled_commands), enable_debug_command=acl.enable_debug_command,
                         enable_module_command=acl.enable_module_command)  # fmt: skip
    verdict = decide(policy, user, argv, auth_required=False, local=args.local)
    off = "" if user.enabled else f"; but user {user.name!r} is off: it cannot log in (AUTH fails) until its rules say on"
    if verdict.error is None:
        print(f"allowed: user {user.name!r} may run {verdict.name}{off}")
        return 0
    reason = {"unknown_command": "unknown"}.get(verdict.reason, verdict.reason)
    print(f"denied ({reason}): {verdict.error.decode('utf-8', 'replace').strip()[1:]}{off}")
    return 1


def cmd_acl_hash(args: argparse.Namespace) -> int:
    pw = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not pw:
        return _die("empty password")
    print("#" + hash_password(pw.encode()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from redisguard.cli.demo import main as demo_main

    return demo_main(args)


def cmd_audit_upstream(args: argparse.Namespace) -> int:
    from redisguard.cli.posture import main as posture_main

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _die(str(e))
    return posture_main(config, as_json=args.json)


def cmd_firewall(args: argparse.Namespace) -> int:
    from redisguard.cli.firewall import rules

    try:
        config = _load(args.config)
    except ConfigError as e:
        return _die(str(e))
    print(rules(config, args.format), end="")
    return 0


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=default_config(),
                   help="the TOML config (default: $REDISGUARD_CONFIG, else %(default)s)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="redisguard")
    manual(p, "a TLS + ACL proxy in front of Redis")
    p.add_argument("--version", action="version", version=f"redisguard {__version__}, fast path: {fast.KERNEL}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str) -> argparse.ArgumentParser:
        """A subcommand whose one-line help is also the first line of its --help, its manual (usage.py) after."""
        s = parent.add_parser(name, help=text)
        manual(s, text)
        return s

    s = command(sub, "serve", "run the proxy (SIGHUP reloads users and certificates, SIGTERM drains and stops)")
    _config_option(s)
    s.add_argument("--takeover", action="store_true", help="start alongside a running redisguard of this user on "
                   "the same ports, sharing new connections until it is stopped (a restart with no refused connection)")
    s.set_defaults(func=cmd_serve)

    s = command(sub, "check-config", "validate a config without starting: its users file, certificates and keys, "
                "that every listener and the metrics port can be bound, and that Redis answers as the service user "
                "(connect, TLS, AUTH, COMMAND INFO, in mirror identity the ACL rights it needs)")  # fmt: skip
    _config_option(s)
    s.add_argument("--skip-bind", action="store_true", help="do not test-bind addresses nor ask Redis (a config for "
                   "another host)")  # fmt: skip
    s.add_argument("--offline", action="store_true", help="do not reach Redis (it is not up yet)")
    s.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a peer sidecar's metrics address: fail unless it enforces this config's policy (repeatable)")
    s.set_defaults(func=cmd_check_config)

    s = command(sub, "audit-upstream", "connect to Redis as the configured upstream user and report its hardening "
                "checklist item by item (exit 1 on any failure)")  # fmt: skip
    _config_option(s)
    s.add_argument("--json", action="store_true", help="one JSON document instead of text")
    s.set_defaults(func=cmd_audit_upstream)

    s = command(sub, "firewall", "print firewall rules: listener ports only from their allowed_sources, the Redis "
                "port loopback-only")  # fmt: skip
    _config_option(s)
    s.add_argument("--format", choices=("nftables", "iptables"), default="nftables", help="rule syntax (default: %(default)s)")
    s.set_defaults(func=cmd_firewall)

    s = command(sub, "certs", "development certificates")
    csub = s.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    c = command(csub, "init", "create a dev CA, a server and a client certificate (keys mode 0600)")
    c.add_argument("--dir", default="certs", help="where to write them, made if missing (default: %(default)s)")
    c.add_argument("--san", action="append", default=[], help="extra server name or IP (repeatable)")
    c.add_argument("--client-name", default="alice", help="the client certificate's CN, and its SPIFFE ID "
                   "spiffe://redisguard.dev/NAME (default: %(default)s)")  # fmt: skip
    c.add_argument("--force", action="store_true", help="replace certificates and keys that already exist")
    c.set_defaults(func=cmd_certs_init)

    s = command(sub, "acl", "users-file tools: check a command, hash a password, suggest, diff and test rules")
    asub = s.add_subparsers(dest="acl_command", required=True, metavar="COMMAND")
    a = command(asub, "check", "would this user be allowed this command? (exit 0 allowed, 1 denied)")
    a.add_argument("--users", default="", help="the users file (default: the config's, else config/users.acl)")
    a.add_argument("--config", "-c", default="", help="take disabled and protected commands from this config, "
                   "to print exactly the proxy's verdict")  # fmt: skip
    a.add_argument("--local", action="store_true", help="as a loopback/unix-socket client (protected commands)")
    a.add_argument("--user", required=True, help="the user (as in AUTH user password) whose rules decide")
    a.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]", help="the command, after --")
    a.set_defaults(func=cmd_acl_check)
    a = command(asub, "hash", "read a password on stdin, print its #<sha256> rule for the users file")
    a.set_defaults(func=cmd_acl_hash)
    cli_acl.add_commands(asub, command)

    s = command(sub, "demo", "start redis-server and redisguard on free loopback ports and run a scripted session")
    s.add_argument("--dir", default="run/demo", help="where the demo writes its config, certificates and logs "
                   "(default: %(default)s)")  # fmt: skip
    s.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
