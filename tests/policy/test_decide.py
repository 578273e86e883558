"""The one decision, alone: Redis's order (unknown → arity → protected → NOAUTH → ACL command, keys,
channels) and its error strings, from users in Redis's ACL syntax."""

from __future__ import annotations

import pytest

from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import NOAUTH, Policy, decide

USERS = """user default off
user app on >pw ~app:* &news:* +@read +@write +@pubsub -flushall
user script on >pw ~app:* +@all
"""


@pytest.fixture(scope="module")
def policy(table: CommandTable) -> Policy:
    return Policy(table, parse_users(USERS, table, require_default=True), disabled=frozenset({"keys"}))


def test_unknown_and_disabled_commands_answer_as_redis_does(policy: Policy) -> None:
    app = policy.users["app"]
    v = decide(policy, app, [b"NOSUCH", b"a"], False)
    assert (v.reason, v.error) == ("unknown_command", b"-ERR unknown command 'NOSUCH', with args beginning with: 'a' \r\n")
    v = decide(policy, app, [b"KEYS", b"*"], False)  # [acl] disabled_commands: as unknown, for everyone
    assert v.reason == "disabled" and v.error is not None and v.error.startswith(b"-ERR unknown command 'KEYS'")


def test_arity_comes_before_authentication(policy: Policy) -> None:
    default = policy.default_user
    v = decide(policy, default, [b"GET"], True)
    assert (v.reason, v.error) == ("arity", b"-ERR wrong number of arguments for 'get' command\r\n")
    v = decide(policy, default, [b"GET", b"k"], True)
    assert (v.reason, v.error) == ("noauth", NOAUTH)
    assert decide(policy, default, [b"AUTH", b"app", b"pw"], True).error is None  # no_auth commands run


def test_command_then_keys_then_channels(policy: Policy) -> None:
    app = policy.users["app"]
    v = decide(policy, app, [b"FLUSHALL"], False)
    assert v.reason == "command" and v.error == b"-NOPERM this user has no permissions to run the 'flushall' command\r\n"
    v = decide(policy, app, [b"MSET", b"app:1", b"v", b"other", b"v"], False)
    assert (v.reason, v.index) == ("key", 3)
    assert v.error == b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n"
    v = decide(policy, app, [b"PUBLISH", b"sports", b"m"], False)
    assert v.reason == "channel"
    assert decide(policy, app, [b"GET", b"app:1"], False).error is None
    assert decide(policy, app, [b"SUBSCRIBE", b"news:1"], False).error is None


def test_scripts_of_narrower_users_are_refused_in_service_identity(policy: Policy) -> None:
    script = policy.users["script"]
    v = decide(policy, script, [b"EVAL", b"return 1", b"0"], False)
    assert v.reason == "script" and v.error is not None and b"scripts run with the rights of the proxy's service user" in v.error
