"""ACL SAVE and LOAD in redisguard.acl.admin against a real redis-server 7.0: the file written as Redis
writes it (its mode and owner kept), read back to the same users; Redis's errors."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard.acl.admin import acl_load, acl_save, render_acl_file, save_users_file
from redisguard.commands.table import CommandTable
from tests.acl.conftest import INITIAL, SETUSER_CASES, Pair, Raw, canon_rules, initial_users
from tests.helpers import RedisProc, free_port, redis_server_binary


def start_redis_aclfile(aclfile: Path) -> RedisProc:
    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--aclfile", str(aclfile)]  # fmt: skip
    r = RedisProc(port, args)
    r.start()
    return r


def test_save_matches_redis_acl_save(tmp_path: Path, table: CommandTable) -> None:
    theirs, ours = tmp_path / "redis.acl", tmp_path / "ours.acl"
    theirs.write_text(INITIAL)
    ours.write_text(INITIAL)
    os.chmod(ours, 0o640)
    r = start_redis_aclfile(theirs)
    try:
        c = Raw(r.port)
        pair = Pair(c, table)
        for case in SETUSER_CASES:
            if any(isinstance(a, bytes) or any(ch in a for ch in "\udce9\udcff\udcfe") for a in case):
                continue  # our users file is UTF-8 text (see the report): no such names or patterns
            pair.setuser(*case)
        assert c("ACL", "SAVE") == b"+OK\r\n"
        assert acl_save(ours, pair.users) == (b"+OK\r\n", None)
        want, got = theirs.read_bytes(), ours.read_bytes()
        assert got == render_acl_file(pair.users)
        assert [canon_rules(x) for x in got.decode().splitlines()] == [canon_rules(x) for x in want.decode().splitlines()]
        assert stat.S_IMODE(os.stat(ours).st_mode) == 0o640  # the original file's mode kept
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
        # what was saved loads back to the same users
        loaded, reply = acl_load(ours, table)
        assert reply == b"+OK\r\n" and loaded is not None
        assert {n: u.fingerprint for n, u in loaded.items()} == {n: u.fingerprint for n, u in pair.users.items()}
        assert c("ACL", "LOAD") == b"+OK\r\n"
        c.close()
    finally:
        r.stop()


def test_save_errors_and_new_file(tmp_path: Path, table: CommandTable, raw: Raw) -> None:
    users = initial_users(table)
    assert acl_save(None, users)[0] == raw("ACL", "SAVE")  # not configured: Redis's text
    assert acl_load(None, table)[1] == raw("ACL", "LOAD")
    fresh = tmp_path / "new.acl"
    save_users_file(fresh, users)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
    assert fresh.read_bytes() == b"user default on nopass ~* &* +@all\nuser svc on #%s ~* &* +@all -flushall\n" % (
        users["svc"].passwords[0].encode()
    )
    reply, err = acl_save(tmp_path / "no-such-dir" / "users.acl", users)
    assert reply == b"-ERR There was an error trying to save the ACLs. Please check the server logs for more information\r\n"
    assert isinstance(err, OSError)
    bad = tmp_path / "bad.acl"
    bad.write_text("user default on\nuser x bogus\n")
    loaded, reply = acl_load(bad, table)
    assert loaded is None and reply.startswith(b"-ERR ") and reply.count(b"\r\n") == 1 and b"bad.acl:2: Syntax error." in reply


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_save_keeps_owner_as_root(tmp_path: Path, table: CommandTable) -> None:
    p = tmp_path / "users.acl"
    p.write_text(INITIAL)
    os.chown(p, 1234, 1235)
    save_users_file(p, initial_users(table))
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 1235)


def redis_loads(path: Path, texts: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """Each text, written to ``path`` (a real redis-server's aclfile), with Redis's reply to ACL LOAD."""
    path.write_text(INITIAL)
    r = start_redis_aclfile(path)
    try:
        c = Raw(r.port)
        for text in texts:
            path.write_text(text)
            yield text, c("ACL", "LOAD")
        c.close()
    finally:
        r.stop()


def test_load_refusing_a_duplicate_user_replies_as_redis(tmp_path: Path, table: CommandTable) -> None:
    """ACL LOAD's reply is Redis's, byte for byte; the operators' message (check-config, serve, acl)
    names ``path:line`` as every other users-file error does, and says neither WARNING nor Redis's suffix."""
    from redisguard.acl import UsersFileError, load_users

    acl = tmp_path / "users.acl"
    for text, theirs in redis_loads(acl, (
            "user default on nopass ~* &* +@all\nuser app on >x ~* +@all\nuser app on >y ~* +@all\n",
            "user default on nopass ~* &* +@all\nuser app on\nusr x\nuser app off\nuser app on\n")):  # fmt: skip
        assert theirs.startswith(b"-ERR WARNING: Duplicate user 'app' found on line 3. ") or b"line 4" in theirs
        assert acl_load(acl, table)[1] == theirs
        with pytest.raises(UsersFileError) as e:
            load_users(acl, table)
        assert "WARNING" not in str(e.value) and f"{acl}:" in str(e.value)
        assert f"{acl}:{3 if 'usr' not in text else 4}: duplicate user 'app' (first defined on line 2)." in str(e.value)


def test_load_refusing_bad_rules_replies_as_redis(tmp_path: Path, table: CommandTable) -> None:
    """An unknown command or category named with its rule each time, of a line's other errors only the
    first, the file refused as a whole: ACL LOAD's reply byte for byte (Redis's ACLLoadFromFile)."""
    acl = tmp_path / "users.acl"
    for _, theirs in redis_loads(acl, (
            "user default on nopass ~* &* +@all\nuser bob on >x +nosuchcmd ~k -alsono\nuser carol on +nono\n",
            "user default on nopass ~* &* +@all\nuser bob on %Q~k +get\nuser carol on resetpass <nohash\n"
            "user dan on ~a allkeys ~b bogus +nosuch\n")):  # fmt: skip
        assert theirs.startswith(b"-ERR /")
        assert acl_load(acl, table)[1] == theirs
