"""The session tests' users and sessions, sans-IO: a Session logged in as bob or alice, and what it
forwarded, parsed as Redis parses it."""

from __future__ import annotations

from redisguard.acl import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared
from redisguard.policy.guards import AuthThrottle
from redisguard.protocol.resp import encode_command
from redisguard.session.machine import Session
from tests.redis_model import redis_parse

TABLE = CommandTable.snapshot()
USERS = parse_users(
    "user default off\n"
    "user bob on >bob-pw %R~report:* +get +mget +ping +client|reply +echo\n"
    "user alice on >alice-pw ~app:* &news +@all -@dangerous +monitor\n",
    TABLE,
)


def session(user: str | None = "bob", throttle: AuthThrottle | None = None) -> Session:
    s = Session(Shared(Policy(TABLE, USERS), throttle=throttle), "test", "10.0.0.1:5000")
    if user:
        s.client_data(encode_command([b"AUTH", user.encode(), user.encode() + b"-pw"]))
        assert s.to_client == [b"+OK\r\n"]
        s.to_client.clear()
    return s


def forwarded(s: Session) -> list[list[bytes]]:
    reqs, err = redis_parse(b"".join(s.to_upstream))
    assert err is None
    return reqs
