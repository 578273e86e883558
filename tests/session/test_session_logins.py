"""A session's logins and users, sans-IO: the AUTH throttle (it waits, then checks; it keeps no
client-chosen names), a certificate's login, the user changed or deleted under the session, and an
audited user's ACL SETUSER."""

from __future__ import annotations

from redisguard.acl import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared
from redisguard.policy.guards import AuthThrottle
from redisguard.protocol.resp import encode_command
from redisguard.session.effects import Sleep, carry_out
from redisguard.session.machine import Session
from tests.session.conftest import TABLE, USERS, forwarded, session


def throttled_session() -> Session:
    """A client whose address has failed bob's password 3 times (per_minute=4: the next AUTH waits)."""
    s = session(None, AuthThrottle(per_minute=4, clock=lambda: 0.0))
    for i in range(3):
        s.client_data(encode_command([b"AUTH", b"bob", b"wrong%d" % i]))
        while s.paused:
            s.resume()
    assert s.to_client.count(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n") == 3
    s.to_client.clear()
    return s


def test_throttled_auth_waits_then_is_checked() -> None:
    s = throttled_session()
    s.client_data(encode_command([b"AUTH", b"bob", b"bob-pw"]) + encode_command([b"GET", b"report:1"]))
    assert s.paused and isinstance(s.effect, Sleep) and s.effect.seconds > 0  # waits, nothing decided
    assert not s.to_client and not s.to_upstream
    s.resume()
    assert s.to_client == [b"+OK\r\n"] and forwarded(s) == [[b"GET", b"report:1"]]


def test_throttle_holds_no_client_chosen_names() -> None:
    s = session(None, AuthThrottle(per_minute=4))
    for i in range(200):
        s.client_data(encode_command([b"AUTH", b"%d" % i + b"u" * 16000, b"x"]))
        while s.paused:
            s.resume()
    assert len(s.shared.throttle._pairs) == 1  # every unknown name shares one key per source


def test_throttled_auth_then_a_big_request_in_the_same_write() -> None:
    """The requests behind a throttled AUTH wait unparsed: they get the limits in force after the AUTH."""
    s = throttled_session()
    mget = [b"MGET", *[b"report:%d" % i for i in range(2000)]]
    s.client_data(encode_command([b"AUTH", b"bob", b"bob-pw"]))
    assert s.paused
    s.client_data(encode_command(mget))  # what the transport has already read, while paused
    s.resume()
    while s.paused:
        carry_out(s)
    assert s.to_client == [b"+OK\r\n"] and forwarded(s) == [mget]


def test_certificate_login_and_rebind_without_sockets() -> None:
    s = session(None)
    assert not s.login_certificate("nobody") and not s.authenticated
    assert s.login_certificate("bob") and s.authenticated and s.user.name == "bob"
    s.client_data(encode_command([b"GET", b"report:1"]))
    assert forwarded(s) == [[b"GET", b"report:1"]]
    # ACL SETUSER of another user: untouched; of bob: moved to the new rules; reload with bob changed: gone
    new = parse_users("user default off\nuser bob on >bob-pw %R~other:* +get\n", TABLE)
    assert s.rebind(new, {"alice"}, []) == "" and s.user is USERS["bob"]
    assert s.rebind(new, {"bob"}, []) == "" and s.user is new["bob"]
    assert s.rebind(USERS, None, []) == "user changed by reload"
    assert s.rebind(new, {"bob"}, ["bob"]) == "user deleted" or s.rebind({}, None, []) == "user deleted"


def test_deleted_users_session_decides_nothing_more() -> None:
    s = session("alice")
    s.kill()
    s.client_data(b"GET app:1\r\n")
    assert not s.to_upstream


def test_audited_user_cannot_change_other_users(table: CommandTable) -> None:
    users = parse_users("user default off\nuser legacy-app on >pw ~app:* +get\n"
                        "user prod-admin on >admin-pw ~* +@all\n", table, require_default=True)
    shared = Shared(Policy(table, users, audit_users=(b"legacy-*",)))
    s = Session(shared, "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"legacy-app", b"pw"]))
    s.client_data(encode_command([b"ACL", b"SETUSER", b"prod-admin", b"resetpass", b">pwned"]))
    carry_out(s)  # what the proxy does off the loop and everywhere, in-line here
    assert shared.policy.users["prod-admin"].check_password(b"admin-pw")
    assert not shared.policy.users["prod-admin"].check_password(b"pwned")
