"""A reload (ACL LOAD, SIGHUP: both put the new users in force through the same path) frees the users it
replaced, and the policy that held them: nothing the old users were used for keeps them alive. The
reload freezes what is alive into gc's permanent generation, so anything of the old policy caught in a
reference cycle would never be freed: 10,000 users' worth of memory per reload."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from redisguard.acl import load_users
from redisguard.commands.table import CommandTable
from redisguard.observe.metrics import Metrics
from redisguard.policy.decide import Policy, Shared, decide
from redisguard.runtime.reload import Reloader
from redisguard.session.machine import Session

USERS = "user default off\nuser app on >pw ~app:* +@all\nuser ops on >pw ~* &* +@all (~x:* +get)\n"


def test_old_users_and_policy_are_freed_after_a_reload(tmp_path: Path, table: CommandTable) -> None:
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    shared = Shared(Policy(table, load_users(users, table), users_file=str(users)))
    shared.observer.users = {}  # type: ignore[attr-defined]
    ctx = SimpleNamespace(metrics=Metrics(), clients=set(), executor=concurrent.futures.ThreadPoolExecutor(1))
    reloader = Reloader(None, table, shared, ctx, lambda c: None)  # type: ignore[arg-type]
    # What serving requests leaves behind: the users' fast-path plans, their scripts verdicts, decisions,
    # and the ACL replies.
    policy = shared.policy
    for name in ("app", "ops"):
        user = policy.users[name]
        assert policy.plan(user, Session.special).allowed([b"GET", b"app:1"]) is not None
        policy.may_script(user)
        assert decide(policy, user, [b"GET", b"app:1"], False).error is None
    shared.replies().acl_list()
    old: list[weakref.ref[Any]] = [
        weakref.ref(policy), weakref.ref(policy.users["app"]), weakref.ref(policy.users["ops"].selectors[1])]
    del policy, user

    async def reloads() -> None:
        for i in range(2):  # every user changed (an unchanged line would be read as the same user)
            users.write_text(USERS.replace(">pw", f">pw{i}"))
            assert await reloader.acl_load() == b"+OK\r\n"

    asyncio.run(reloads())
    ctx.executor.shutdown()
    gc.collect()
    assert [r() for r in old] == [None, None, None]
    assert shared.policy.users["app"].describe() == "on #" + shared.policy.users["app"].passwords[0] + \
        " ~app:* resetchannels +@all"  # fmt: skip


def test_a_reload_reads_an_unchanged_line_as_the_same_user(tmp_path: Path, table: CommandTable) -> None:
    """Users never change, so a line read before over the same command table is that user again: a
    reload allocates only for the lines that changed (and frees only the users they replace)."""
    users = tmp_path / "users.acl"
    users.write_text(USERS)
    first = load_users(users, table)
    users.write_text(USERS.replace("user app on >pw", "user app on >other"))
    second = load_users(users, table)
    assert second["ops"] is first["ops"] and second["default"] is first["default"]
    assert second["app"] is not first["app"] and second["app"].fingerprint != first["app"].fingerprint
    other = CommandTable.snapshot()  # another command table: every user read again against it
    assert load_users(users, other)["ops"] is not first["ops"]
    ops = weakref.ref(first["ops"])
    del first, second
    gc.collect()
    assert ops() is None  # (remembered only while it lives)
