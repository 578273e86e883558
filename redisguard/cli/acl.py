"""`redisguard acl suggest | diff | test`: least privilege from real traffic, and policy tests as code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from redisguard.acl import User, UsersFileError, load_users, render_users
from redisguard.commands.table import CommandTable
from redisguard.observe.least_privilege import breakage, load_cases, run_tests, suggest_file, unified_diff
from redisguard.observe.profile import TrafficProfile


def _die(msg: str) -> int:
    print(f"redisguard: {msg}", file=sys.stderr)
    return 2


def _profile(path: str) -> TrafficProfile:
    try:
        return TrafficProfile.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise SystemExit(_die(f"{path}: {e}")) from None


def _users(path: str, table: CommandTable) -> dict[str, User]:
    try:
        return load_users(path, table)
    except UsersFileError as e:
        raise SystemExit(_die(str(e))) from None


def cmd_suggest(args: argparse.Namespace) -> int:
    table = CommandTable.snapshot()
    current = _users(args.users, table) if args.users else None
    try:
        text = suggest_file(_profile(args.profile), current)
    except ValueError as e:
        return _die(str(e))
    if args.diff:
        if current is None:
            return _die("--diff needs --users (the current users file)")
        sys.stdout.write(unified_diff(Path(args.users).read_text(), text, args.users, "suggested"))
    else:
        sys.stdout.write(text)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    table = CommandTable.snapshot()
    old, new = _users(args.old, table), _users(args.new, table)
    sys.stdout.write(unified_diff(render_users(old), render_users(new), args.old, args.new))
    if not args.against:
        return 0
    breaks = breakage(_profile(args.against), new, table)
    for b in breaks:
        print(f"would deny: user {b.user}: {b.what}: {b.error}")
    print(f"{len(breaks)} observed command(s) the new policy would deny" if breaks
          else "the new policy allows everything observed")  # fmt: skip
    return 1 if breaks else 0


def cmd_test(args: argparse.Namespace) -> int:
    table = CommandTable.snapshot()
    try:
        users_file, cases = load_cases(Path(args.file))
    except (OSError, ValueError) as e:
        return _die(str(e))
    path = args.users or (str(users_file) if users_file else "")
    if not path:
        return _die("no users file: give --users or users_file = ... in the test file")
    failed = 0
    for case, got, error in run_tests(cases, _users(path, table), table):
        ok = got == case.expect
        failed += not ok
        detail = "" if ok else f"  (expected {case.expect}, got {got}{': ' + error if error else ''})"
        print(f"{'PASS' if ok else 'FAIL'} {case.user}: {case.command}{detail}")
    print(f"{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


def add_commands(asub: argparse._SubParsersAction[argparse.ArgumentParser],
                 command: Callable[..., argparse.ArgumentParser]) -> None:  # fmt: skip
    a = command(asub, "suggest", "print, per user, the tightest ACL rules that allow all traffic in a profile "
                "(the users-file format)")  # fmt: skip
    a.add_argument("--profile", required=True, help="the traffic profile ([profile] file)")
    a.add_argument("--users", default="", help="the current users file (keeps passwords; needed by --diff)")
    a.add_argument("--diff", action="store_true", help="print a unified diff against --users instead")
    a.set_defaults(func=cmd_suggest)
    a = command(asub, "diff", "compare two users files; with --against, list the observed traffic the new one "
                "would deny (exit 1 if any)")  # fmt: skip
    a.add_argument("old", help="the users file in force")
    a.add_argument("new", help="the users file you mean to put in force")
    a.add_argument("--against", default="", help="a traffic profile to check the new users file against")
    a.set_defaults(func=cmd_diff)
    a = command(asub, "test", "run policy expectations (a TOML file of [[case]] user/command/expect) against a "
                "users file (exit 1 on any failure)")  # fmt: skip
    a.add_argument("file", help="the TOML file of [[case]] tables")
    a.add_argument("--users", default="", help="the users file (default: users_file in the test file)")
    a.set_defaults(func=cmd_test)
