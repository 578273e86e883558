"""Users files in Redis's ACL file format (acl.c ``ACLLoadFromFile`` / ``ACLSaveToFile``).

Every file Redis accepts loads here: one ``user <name> <rule> ...`` per line, split on single spaces,
selector tokens re-joined, blank lines skipped, any error rejects the whole file. As an extension
(for a file people edit by hand) whole-line ``#`` comments are allowed; Redis itself would reject
them. Errors carry ``file:line`` like Redis's.

A file without a ``user default`` line gets Redis's built-in default user, ``on nopass ~* &* +@all``:
anyone who connects may run anything. Redis does that, so we read such files the same way, but
``require_default=True`` (what a reload should use) refuses them, so that emptying or truncating the
file cannot silently open the proxy.

Loading is pure (it reads the file and the command table, and builds new objects only), so it may run
in a worker thread, e.g. ``await asyncio.to_thread(load_users, path, table, require_default=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from pathlib import Path

from redisguard.commands.table import CommandTable
from redisguard.files.versions import FileChanged, FileUnreadable, read_now

from .selector import E_ENOENT, CommandsKey, Selector
from .user import ACLError, User, default_user, merge_selector_args

_SPACES = frozenset(" \t\r\n\v\f\0")

# The user each (table, line) was read as, for as long as that user lives (in force, or held by a
# session). A User never changes (a change of rights makes a new one), so a reload that finds the same
# line over the same command table takes the same user: a reload of 10,000 users of which one changed
# builds one, not 10,000, and the allocator is not left fragmented by a whole table read and freed
# each time (issue 22: RSS across reloads). Keyed by the line's SHA-256, not the line: a `>password`
# rule is not kept in memory for as long as its user lives.
_read_before: weakref.WeakValueDictionary[tuple[CommandTable, bytes], User] = weakref.WeakValueDictionary()


# What Redis 7.0 (acl.c ACLLoadFromFile) appends to the errors of a users file ACL LOAD refused.
REDIS_LOAD_REFUSED = "WARNING: ACL errors detected, no change to the previously active ACL rules was performed"


class UsersFileError(ValueError):
    """A users file refused: ``str(e)`` names every problem as ``path:line: ...`` (for operators:
    check-config, serve, acl); ``redis`` is the same problems in Redis's own words, where they differ
    (ACL LOAD's reply, byte for byte as Redis's), or None when it could not be read at all."""

    def __init__(self, message: str, redis: str | None = None) -> None:
        super().__init__(message)
        self.redis = redis


def missing_default_message(filename: str) -> str:
    """The one-line error (or warning) for a users file without a ``user default`` line."""
    return (
        f"{filename}: no 'user default' line, so 'default' would be Redis's built-in "
        "'on nopass ~* &* +@all' and any client could run anything without AUTH; add "
        "`user default off` (or `user default on nopass ...` to keep it open) explicitly"
    )


def parse_users(text: str, table: CommandTable, filename: str = "users.acl", *, require_default: bool = False) -> dict[str, User]:
    """The users of a users file's text; ``UsersFileError`` naming every problem if any.

    Without a ``user default`` line, ``default`` is Redis's built-in open user (marked
    ``implicit``), or, with ``require_default``, the file is an error."""
    users: dict[str, User] = {}
    first: dict[str, int] = {}  # the line each user was first defined on
    errors: list[str] = []
    redis: dict[int, str] = {}  # errors[i] in Redis's words, where they differ (Redis says WARNING, no file)
    command_sets: dict[CommandsKey, Selector] = {}  # each distinct command set once (Selector.share_commands)
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip(" \t\r\n")
        if not line or line.startswith("#"):
            continue
        argv = line.split(" ")
        if argv[0] != "user" or len(argv) < 2:
            errors.append(f"{filename}:{lineno} should start with user keyword followed by the username.")
            continue
        name = argv[1]
        if any(c in _SPACES for c in name):  # "" is a valid name (ACL SETUSER "" makes one)
            errors.append(f"{filename}:{lineno}: username '{name}' contains invalid characters.")
            continue
        if name in first:
            redis[len(errors)] = f"WARNING: Duplicate user '{name}' found on line {lineno}."
            errors.append(f"{filename}:{lineno}: duplicate user '{name}' (first defined on line {first[name]}).")
            continue
        first[name] = lineno
        seen = (table, hashlib.sha256(line.encode("utf-8", "surrogatepass")).digest())
        before = _read_before.get(seen)
        if before is not None:
            users[name] = before
            continue
        user = users[name] = User(name, table)
        fine = len(errors)
        try:
            rules = merge_selector_args(argv[2:])
        except ACLError as e:
            errors.append(f"{filename}:{lineno}: {e}")
            continue
        syntax_error = False
        for rule in rules:
            rule = rule.strip("\t\r\n")
            if not rule:
                continue
            try:
                user.apply(rule)
            except ACLError as e:
                if str(e) == E_ENOENT:
                    errors.append(f"{filename}:{lineno}: Error in applying operation '{rule}': {e}.")
                    continue
                # Redis's ACLLoadFromFile names the rule only of an unknown command or category, and says
                # only a line's first other error (it may be what makes the later ones fail).
                redis[len(errors)] = "" if syntax_error else f"{filename}:{lineno}: {e}."
                errors.append(f"{filename}:{lineno}: {e}. (rule '{rule}')")
                syntax_error = True
        for sel in user.selectors:
            sel.share_commands(command_sets)
        if len(errors) == fine:
            _read_before[seen] = user
    if require_default and "default" not in users:
        errors.append(missing_default_message(filename))
    if errors:
        said = " ".join(filter(None, (redis.get(i, e) for i, e in enumerate(errors))))
        raise UsersFileError(" ".join(errors), f"{said} {REDIS_LOAD_REFUSED}")
    if "default" not in users:
        users["default"] = default_user(table, implicit=True)
    return users


def parse_users_bytes(data: bytes, table: CommandTable, filename: str = "users.acl", *,
                      require_default: bool = False) -> dict[str, User]:  # fmt: skip
    """:func:`parse_users` of a users file's bytes as read (a reload parses exactly what it checked)."""
    # Bytes, as Redis reads it: any byte in a name or pattern round-trips (what ACL SAVE wrote, ACL
    # LOAD reads), and lines end at LF only (no universal newlines: a lone CR is not a line break).
    return parse_users(data.decode("utf-8", "surrogateescape"), table, filename, require_default=require_default)


def load_users(path: str | os.PathLike[str], table: CommandTable, *, require_default: bool = False) -> dict[str, User]:
    """Read and parse a users file (see :func:`parse_users`); safe to run in a worker thread.

    Read once and re-read (file_versions.read_now): a file that changes meanwhile is being written and
    is refused rather than parsed half-written."""
    return parse_users_bytes(read_users_file(path), table, str(path), require_default=require_default)


def read_users_file(path: str | os.PathLike[str]) -> bytes:
    """A users file's bytes, read once and re-read (UsersFileError if it cannot be read or changed)."""
    p = Path(path)
    try:
        return read_now([p])[p]
    except FileUnreadable as e:
        raise UsersFileError(f"cannot read users file {p}: {e.error.strerror}") from None
    except FileChanged as e:
        raise UsersFileError(f"users file {e}") from None


def render_users(users: dict[str, User]) -> str:
    """The file ``ACL SAVE`` would write: ``user <name> <ACL LIST rules>`` per line."""
    return "".join(f"user {u.name} {u.describe()}\n" for u in users.values())


def save_users(path: str | os.PathLike[str], users: dict[str, User]) -> None:
    """Atomic write, 0600: the file holds password hashes."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render_users(users))
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
