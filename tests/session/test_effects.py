"""What a session needs from outside comes out as an effect value, and nothing is answered or changed
until it is carried out: bytes in, bytes and effects out."""

from __future__ import annotations

from redisguard.acl.users_file import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared
from redisguard.policy.guards import AuthThrottle
from redisguard.protocol.resp import encode_command
from redisguard.session.effects import ChangeUsers, Offload, Sleep, apply_users_change, carry_out
from redisguard.session.machine import Session

USERS = "user default off\nuser admin on >pw ~* &* +@all\nuser bob on >bob-pw ~* +get\n"


def session(table: CommandTable, **shared: object) -> Session:
    s = Session(Shared(Policy(table, parse_users(USERS, table, require_default=True)), **shared), "t", "10.0.0.1:1")  # type: ignore[arg-type]
    s.client_data(encode_command([b"AUTH", b"admin", b"pw"]))
    assert s.data_for_client() == b"+OK\r\n"
    return s


def test_acl_setuser_is_answered_only_once_in_force(table: CommandTable) -> None:
    s = session(table)
    s.client_data(encode_command([b"ACL", b"SETUSER", b"bob", b"+set"]) + encode_command([b"PING"]))
    assert isinstance(s.effect, Offload) and s.paused  # the rules are built off the loop
    s.offloaded(*s.decide_offloaded(s.effect.argv))
    effect = s.effect
    assert isinstance(effect, ChangeUsers) and effect.command == "setuser" and list(effect.args) == [b"bob", b"+set"]
    assert s.paused and not s.to_client and not s.to_upstream  # no reply, and PING waits behind it
    assert "set" not in s.shared.policy.users["bob"].root.allowed  # nothing changed yet
    reply, changed = apply_users_change(s.shared, effect)
    assert reply == b"+OK\r\n" and changed == {"bob"} and "set" in s.shared.policy.users["bob"].root.allowed
    s.acknowledged(reply)
    assert s.data_for_client() == b"+OK\r\n" and s.effect is None and not s.paused
    assert s.data_for_upstream().endswith(encode_command([b"PING"]))


def test_acl_load_is_one_effect_read_in_its_turn(table: CommandTable) -> None:
    s = session(table)
    s.client_data(encode_command([b"ACL", b"LOAD"]))
    carry_out(s)  # Offload, then ChangeUsers("load"): no users file here
    from redisguard.acl.admin import ERR_NO_ACLFILE

    assert s.data_for_client() == ERR_NO_ACLFILE  # (Redis's answer without an aclfile)


def test_a_throttled_auth_sleeps_then_is_checked(table: CommandTable) -> None:
    throttle = AuthThrottle(1.0)  # one failure a minute per source, then each AUTH waits
    s = session(table, throttle=throttle)
    for _ in range(3):
        throttle.failed(s.core.state.source, "bob")
    s.client_data(encode_command([b"AUTH", b"bob", b"bob-pw"]))
    assert isinstance(s.effect, Sleep) and s.effect.seconds > 0 and not s.to_client
    carry_out(s)
    assert s.data_for_client() == b"+OK\r\n" and s.user.name == "bob"
