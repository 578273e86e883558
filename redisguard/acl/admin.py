"""ACL administration as Redis 7.0 does it: ``ACL SETUSER``, ``DELUSER``, ``LOG``, ``SAVE``, ``LOAD``.

Theory of operation. The users a session sees are never changed in place: sessions hold them (and
the per-load :class:`~redisguard.acl.replies.ACLReplies` built from them). :func:`setuser` and
:func:`deluser` take the current users and return a NEW dict (or ``None`` and an error reply); the
caller swaps it in together with a fresh ``ACLReplies``. A changed user is a fresh :class:`User` (a
deep copy of the old one, ``ACLCopyUser``, with the new rules applied), so its ``describe()`` and
``fingerprint`` are computed anew; untouched users are the same objects, fingerprints unchanged.

Byte-exact with redis-server 7.0.15 (acl.c ``aclCommand``), checked against a real one in
tests/acl/test_admin_*.py:

- ``ACL SETUSER name [rule ...]``: the name may not contain a blank or NUL (``-ERR Usernames can't
  contain spaces or null characters``) but may be empty or any other bytes; the rules are merged
  (``ACLMergeSelectorArguments``: ``(`` ... ``)`` spread over arguments re-joined with one space; a new
  ``(`` argument starts over) and applied to a copy of the user (a new user starts ``off``,
  ``resetchannels``, ``-@all``), all or nothing. Errors are ``Error in ACL SETUSER modifier '<rule>':
  <reason>``, the rule printed as a C string (it ends at a NUL) and CR/LF turned into spaces, as
  ``addReplyErrorFormat`` does.
- ``ACL DELUSER name [name ...]``: ``:<deleted>``; any name that is ``default`` as a C string fails the
  whole command with ``-ERR The 'default' user cannot be removed`` and nothing is deleted.
- ``ACL LOG [count | RESET]``: :class:`ACLLog`, Redis 7.0's entries (7 fields; the entry-id and
  timestamp fields came with Redis 7.2).
- ``ACL SAVE`` / ``ACL LOAD``: :func:`acl_save` / :func:`acl_load` (the only I/O here: the file).

Argument bytes are decoded with ``surrogateescape`` (user names, patterns, passwords): any byte string
Redis accepts round-trips unchanged through ``ACL LIST``/``GETUSER``/``SAVE``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from redisguard.commands.table import CommandTable
from redisguard.protocol.resp import cstr, error_format

from .user import ACLError, User, merge_selector_args
from .users_file import UsersFileError, parse_users_bytes, read_users_file

__all__ = [
    "ACLLog",
    "LogEntry",
    "acl_load",
    "acl_save",
    "deluser",
    "render_acl_file",
    "save_users_file",
    "setuser",
]

OK = b"+OK\r\n"
ERR_NO_ACLFILE = (
    b"-ERR This Redis instance is not configured to use an ACL file. You may want to specify users via the "
    b"ACL SETUSER command and then issue a CONFIG REWRITE (assuming you have a Redis configuration file set) "
    b"in order to store users in the Redis configuration.\r\n"
)
ERR_SAVE = b"-ERR There was an error trying to save the ACLs. Please check the server logs for more information\r\n"
ERR_USERNAME = b"-ERR Usernames can't contain spaces or null characters\r\n"
ERR_DELETE_DEFAULT = b"-ERR The 'default' user cannot be removed\r\n"
ERR_NOT_INTEGER = b"-ERR value is not an integer or out of range\r\n"

_BLANKS = b" \t\n\v\f\r\x00"  # ACLStringHasSpaces: isspace() (C locale) or NUL


def _str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


# -- ACL SETUSER ------------------------------------------------------------------------------------
def setuser(users: Mapping[str, User], table: CommandTable, argv: Sequence[bytes]) -> tuple[dict[str, User] | None, bytes]:
    """``ACL SETUSER <name> [rule ...]`` (``argv``: the arguments after SETUSER).

    Returns ``(new_users, b"+OK\\r\\n")``, ``new_users`` a new dict in which only ``<name>`` is a new
    object, or ``(None, error_reply)``. Neither ``users`` nor any User in it is touched."""
    if not argv:
        return None, b"-ERR wrong number of arguments for 'acl|setuser' command\r\n"
    raw_name = bytes(argv[0])
    if any(c in _BLANKS for c in raw_name):
        return None, ERR_USERNAME
    name = _str(raw_name)
    rules = [_str(bytes(a)) for a in argv[1:]]
    try:
        merged = merge_selector_args(rules)
    except ACLError:
        # The argument that opened the selector left open: the last one opening one (a new "(" starts over).
        start = next(a for a in reversed(rules) if a.startswith("(") and not a.endswith(")"))
        return None, error_format(b"Unmatched parenthesis in acl selector starting at '%s'." % cstr(_bytes(start)))
    old = users.get(name)
    user = old.copy() if old is not None else User(name, table)
    user.implicit = False  # set explicitly now: ACL SAVE writes it
    for rule in merged:
        try:
            user.apply(rule)
        except ACLError as e:
            msg = b"Error in ACL SETUSER modifier '%s': %s" % (cstr(_bytes(rule)), _bytes(str(e)))
            return None, error_format(msg)
    new = dict(users)
    new[name] = user
    return new, OK


# -- ACL DELUSER ------------------------------------------------------------------------------------
def deluser(users: Mapping[str, User], argv: Sequence[bytes]) -> tuple[dict[str, User] | None, bytes, list[str]]:
    """``ACL DELUSER <name> [name ...]``: ``(new_users, b":<n>\\r\\n", deleted_names)``, or
    ``(None, error_reply, [])`` when one of the names is ``default`` (then nothing is deleted).

    The caller disconnects the clients authenticated as a deleted user (Redis does)."""
    if not argv:
        return None, b"-ERR wrong number of arguments for 'acl|deluser' command\r\n", []
    if any(cstr(bytes(a)) == b"default" for a in argv):  # strcmp: "default\0x" is "default" too
        return None, ERR_DELETE_DEFAULT, []
    new = dict(users)
    deleted: list[str] = []
    for a in argv:
        name = _str(bytes(a))
        if new.pop(name, None) is not None:
            deleted.append(name)
    return new, b":%d\r\n" % len(deleted), deleted


# -- ACL LOG ----------------------------------------------------------------------------------------
Reason = Literal["command", "key", "channel", "auth"]
Context = Literal["toplevel", "multi", "lua"]
GROUPING_MS = 60_000  # ACL_LOG_GROUPING_MAX_TIME_DELTA
GROUPING_SCAN = 10  # addACLLogEntry looks for a match among the 10 newest entries only


@dataclass(eq=False, slots=True)
class LogEntry:
    count: int
    reason: str
    context: str
    object: bytes
    username: bytes
    ctime_ms: int  # last update, in ms (mstime())
    client_info: bytes

    def render(self, resp: int, now_ms: int) -> bytes:
        age = b"%.17g" % ((now_ms - self.ctime_ms) / 1000)  # addReplyDouble (7.0): %.17g
        pairs = [
            (b"count", b":%d\r\n" % self.count),
            (b"reason", _bulk(self.reason.encode())),
            (b"context", _bulk(self.context.encode())),
            (b"object", _bulk(self.object)),
            (b"username", _bulk(self.username)),
            (b"age-seconds", b",%s\r\n" % age if resp == 3 else _bulk(age)),
            (b"client-info", _bulk(self.client_info)),
        ]
        head = b"%%%d\r\n" % len(pairs) if resp == 3 else b"*%d\r\n" % (2 * len(pairs))
        return head + b"".join(_bulk(k) + v for k, v in pairs)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _as_bytes(x: bytes | str) -> bytes:
    return _bytes(x) if isinstance(x, str) else bytes(x)


def _parse_long(arg: bytes) -> int | None:
    """string2ll as getLongFromObjectOrReply uses it: no blanks, no '+', no leading zeros, 64 bits."""
    digits = arg[1:] if arg[:1] == b"-" else arg
    if arg == b"0":
        return 0
    if not digits or not digits.isdigit() or digits[:1] == b"0":
        return None
    value = int(arg)
    return value if -(2**63) <= value < 2**63 else None


class ACLLog:
    """Redis 7.0's ACL LOG: newest first, at most ``max_len`` entries (``acllog-max-len``, 128).

    A denial like one of the 10 newest entries (same reason, context, object and username, and last
    updated within 60 s) bumps that entry's count, takes the new client info and time and moves it to
    the head; otherwise a new entry goes to the head and the oldest beyond ``max_len`` are dropped.
    ``now`` is wall-clock seconds (``time.time()``), kept in whole milliseconds as Redis does.

    What to pass (as Redis fills it): ``object`` is the command's full name (``get``, ``client|kill``)
    for "command", the key or channel argument for "key"/"channel", and for "auth" the command name AS
    THE CLIENT SENT IT (``AUTH``, ``auth``, ``hello``) with ``username`` the name tried (else the
    session's user). ``client_info`` is a CLIENT INFO-like line the caller builds."""

    def __init__(self, max_len: int = 128) -> None:
        self.max_len = max_len
        self.entries: deque[LogEntry] = deque()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, reason: Reason, context: Context, object: bytes | str, username: bytes | str,
            client_info: bytes | str, now: float) -> LogEntry:  # fmt: skip
        entry = LogEntry(1, reason, context, _as_bytes(object), _as_bytes(username), int(now * 1000), _as_bytes(client_info))
        for i, cur in enumerate(self.entries):
            if i >= GROUPING_SCAN:
                break
            if (
                cur.reason == entry.reason and cur.context == entry.context
                and abs(cur.ctime_ms - entry.ctime_ms) <= GROUPING_MS
                and cur.object == entry.object and cur.username == entry.username
            ):  # fmt: skip
                del self.entries[i]
                self.entries.appendleft(cur)
                cur.client_info = entry.client_info
                cur.ctime_ms = entry.ctime_ms
                cur.count += 1
                return cur
        self.entries.appendleft(entry)
        while len(self.entries) > self.max_len:
            self.entries.pop()
        return entry

    def reset(self) -> None:
        self.entries.clear()

    def reply(self, argv: Sequence[bytes], resp: int, now: float, subcommand: bytes = b"LOG") -> bytes:
        """``ACL LOG [count | RESET]`` (``argv``: the arguments after LOG; ``subcommand``: LOG as the
        client typed it, for the wrong-number-of-arguments error)."""
        count = 10
        if len(argv) > 1:
            msg = b"unknown subcommand or wrong number of arguments for '%s'. Try ACL HELP." % cstr(subcommand)[:128]
            return error_format(msg)
        if argv:
            arg = bytes(argv[0])
            if cstr(arg).lower() == b"reset":  # strcasecmp: a C string
                self.reset()
                return OK
            parsed = _parse_long(arg)
            if parsed is None:
                return ERR_NOT_INTEGER
            count = max(parsed, 0)
        count = min(count, len(self.entries))
        now_ms = int(now * 1000)
        out = [b"*%d\r\n" % count]
        for i, e in enumerate(self.entries):
            if i >= count:
                break
            out.append(e.render(resp, now_ms))
        return b"".join(out)


# -- ACL SAVE / ACL LOAD ----------------------------------------------------------------------------
def render_acl_file(users: Mapping[str, User]) -> bytes:
    """ACLSaveToFile's text: ``user <name> <ACL LIST rules>\\n`` per user, names in byte order (rax)."""
    lines = sorted((_bytes(n), u) for n, u in users.items())
    return b"".join(b"user %s %s\n" % (n, _bytes(u.describe())) for n, u in lines)


def save_users_file(path: str | os.PathLike[str], users: Mapping[str, User]) -> None:
    """Write the users as ACL SAVE does, atomically: a temporary file in the same directory, written
    and fsync'ed, given the original file's mode (0600 for a new file: it holds password hashes) and,
    when running as root, its owner; renamed over ``path``, then the directory fsync'ed.
    Raises OSError (the temporary file removed)."""
    p = Path(path)
    data = render_acl_file(users)
    try:
        st: os.stat_result | None = os.stat(p)
    except FileNotFoundError:
        st = None
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o600
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".tmp-")
    try:
        try:
            os.fchmod(fd, mode)
            if st is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(fd, st.st_uid, st.st_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def acl_save(path: str | os.PathLike[str] | None, users: Mapping[str, User]) -> tuple[bytes, OSError | None]:
    """``ACL SAVE``: the reply, and the OSError to log when it failed (Redis logs it, the client gets
    only "Please check the server logs")."""
    if path is None or str(path) == "":
        return ERR_NO_ACLFILE, None
    try:
        save_users_file(path, users)
    except OSError as e:
        return ERR_SAVE, e
    return OK, None


def acl_load(path: str | os.PathLike[str] | None, table: CommandTable, *, require_default: bool = True,
             data: bytes | None = None) -> tuple[dict[str, User] | None, bytes]:  # fmt: skip
    """``ACL LOAD``: ``(users, +OK)`` or ``(None, -ERR <why>)``; all or nothing, like Redis.

    Reads the file (blocking: run it in a worker thread). ``require_default`` (redisguard's reload
    policy, not Redis's) refuses a file without a ``user default`` line. Texts are users_file's.
    ``data``: the file's bytes as already read (with workers, read once for all of them)."""
    if path is None or str(path) == "":
        return None, ERR_NO_ACLFILE
    try:
        data = read_users_file(path) if data is None else data
        users = parse_users_bytes(data, table, str(path), require_default=require_default)
    except UsersFileError as e:  # in Redis's words where redisguard's differ (a duplicate user)
        return None, error_format(_bytes(e.redis if e.redis is not None else str(e)))
    return users, OK
