"""acl suggest: the rules it writes from a traffic profile (unit tests; system/test_least_privilege.py runs it end to end)."""

from __future__ import annotations

from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.observe.least_privilege import suggest_file
from redisguard.observe.profile import TrafficProfile


def test_suggest_cannot_be_injected_through_key_names(table: CommandTable) -> None:
    get = table.get("get")
    assert get is not None
    for evil in (b"zz +@all allkeys", b"zz\nuser intruder on nopass +@all allkeys"):
        prof = TrafficProfile()
        for key in (b"cache:1", evil):
            prof.record("app", get, [b"GET", key], [(1, 1)], [])
        try:
            users = parse_users("user default off\n" + suggest_file(prof, None), table, require_default=True)
        except Exception:
            continue  # refusing to produce/load such a file is fine too
        assert set(users) == {"default", "app"}
        assert not users["app"].root.allcommands and not users["app"].root.allkeys
        assert "flushall" not in users["app"].root.allowed
