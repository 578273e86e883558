"""``redisguard serve | check-config | certs init | acl check | acl hash | demo``."""

from __future__ import annotations

import argparse
import getpass
import sys
from dataclasses import replace
from pathlib import Path

from .acl import ACLError, UsersFileError, hash_password, load_users, missing_default_message
from .commands import CommandTable
from .config import ConfigError, load_config
from .policy import Policy, decide

SCRIPTING = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "script", "function", "module")


def _die(msg: str, code: int = 2) -> int:
    print(f"redisguard: {msg}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from .audit import configure_logging
    from .server import run

    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _die(str(e))
    configure_logging(config.log.format, config.log.level)
    try:
        import uvloop

        uvloop.run(run(config))
    except (UsersFileError, ACLError, ValueError, OSError) as e:
        return _die(str(e))
    except KeyboardInterrupt:
        pass
    return 0


def config_warnings(config_path: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a config and its users file."""
    errors: list[str] = []
    warnings: list[str] = []
    try:
        config = load_config(config_path)
    except ConfigError as e:
        return [str(e)], []
    table = CommandTable.snapshot()
    for c in config.acl.disabled_commands:
        if table.get(c) is None:
            warnings.append(f"acl.disabled_commands: {c!r} is not a Redis 7.0 command")
    try:
        users = load_users(config.acl.users_file, table)
    except UsersFileError as e:
        return [str(e)], warnings
    for lst in config.listeners:
        if lst.tls is not None:
            for f in (lst.tls.cert_file, lst.tls.key_file, lst.tls.ca_file):
                if f is not None and not Path(f).exists():
                    errors.append(f"listener {lst.name!r}: file not found: {f} (run: redisguard certs init)")
    d = users["default"]
    if d.implicit:
        warnings.append(missing_default_message(str(config.acl.users_file)) + " (a reload refuses such a file)")
    if d.enabled and d.nopass:
        warnings.append(
            "users file: the 'default' user is on with nopass: any client that connects can run what "
            "it allows without AUTH (add 'user default off' to require authentication)"
        )
    for u in users.values():
        for sel in u.selectors:
            if sel.allkeys and sel.allchannels:
                continue
            risky = [c for c in SCRIPTING if (sel.allcommands or c in sel.allowed)]
            if risky:
                warnings.append(
                    f"user {u.name!r} has key or channel restrictions but may run "
                    f"{', '.join(c.upper() for c in risky)}: scripts run as the proxy's upstream user, "
                    "so redisguard cannot enforce those patterns inside them (deny @scripting for this user, "
                    "or restrict the upstream user too)"
                )
                break
    return errors, warnings


def cmd_check_config(args: argparse.Namespace) -> int:
    errors, warnings = config_warnings(args.config)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"{args.config}: OK")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from .certs import init_dev_certs

    written = init_dev_certs(args.dir, args.san, args.client_name, force=args.force)
    if not written:
        print(f"{args.dir}: dev certificates already exist (use --force to replace them)")
    for p in written:
        print(f"wrote {p}")
    return 0


def cmd_acl_check(args: argparse.Namespace) -> int:
    table = CommandTable.snapshot()
    acl = None
    if args.config:  # the proxy's own verdict: its users file, disabled and protected commands
        try:
            acl = load_config(args.config).acl
        except ConfigError as e:
            return _die(str(e))
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
    policy = Policy(table, users)
    if acl is not None:
        # ("upstream" is read from Redis at start; offline it counts as "no", Redis's default)
        policy = replace(policy, disabled=frozenset(acl.disabled_commands), enable_debug_command=acl.enable_debug_command,
                         enable_module_command=acl.enable_module_command)  # fmt: skip
    verdict = decide(policy, user, argv, auth_required=False, local=args.local)
    if verdict.error is None:
        print(f"allowed: user {user.name!r} may run {verdict.name}")
        return 0
    reason = {"unknown_command": "unknown"}.get(verdict.reason, verdict.reason)
    print(f"denied ({reason}): {verdict.error.decode('utf-8', 'replace').strip()[1:]}")
    return 1


def cmd_acl_hash(args: argparse.Namespace) -> int:
    pw = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not pw:
        return _die("empty password")
    print("#" + hash_password(pw.encode()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="redisguard", description="TLS + ACL proxy in front of Redis")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", "-c", default="config/redisguard.toml")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("check-config", help="validate a config and its users file")
    s.add_argument("--config", "-c", default="config/redisguard.toml")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("certs", help="development certificates")
    csub = s.add_subparsers(dest="certs_command", required=True)
    c = csub.add_parser("init", help="create a dev CA, server and client certificate")
    c.add_argument("--dir", default="certs")
    c.add_argument("--san", action="append", default=[], help="extra server name or IP (repeatable)")
    c.add_argument("--client-name", default="alice")
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=cmd_certs_init)

    s = sub.add_parser("acl", help="policy tools")
    asub = s.add_subparsers(dest="acl_command", required=True)
    a = asub.add_parser("check", help="would this user be allowed this command?")
    a.add_argument("--users", default="", help="the users file (default: the config's, else config/users.acl)")
    a.add_argument("--config", "-c", default="", help="take disabled and protected commands from this config, "
                   "to print exactly the proxy's verdict")  # fmt: skip
    a.add_argument("--local", action="store_true", help="as a loopback/unix-socket client (protected commands)")
    a.add_argument("--user", required=True)
    a.add_argument("argv", nargs=argparse.REMAINDER)
    a.set_defaults(func=cmd_acl_check)
    a = asub.add_parser("hash", help="read a password on stdin, print its #<sha256> rule")
    a.set_defaults(func=cmd_acl_hash)

    s = sub.add_parser("demo", help="redis-server + redisguard + a scripted session")
    s.add_argument("--dir", default="run/demo")
    s.set_defaults(func=cmd_demo)

    args = p.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
