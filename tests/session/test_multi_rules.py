"""EXEC checks the queued commands again whenever the policy changed since MULTI, even when the client's
User is the very object of MULTI (a reload reads an unchanged line as the same user): Redis's EXEC
re-checks every queued command against the rules in force."""

from __future__ import annotations

from dataclasses import replace

from redisguard.acl import admin, parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared
from redisguard.protocol.resp import encode_command
from redisguard.session.machine import Session
from redisguard.session.transactions import EXECABORT_ACL

# What the proxy sends Redis to make it abort the transaction at EXEC (a queued GET of wrong arity).
ABORTED = encode_command([b"GET"]) + encode_command([b"EXEC"])


def alice(table: CommandTable, text: str) -> Session:
    s = Session(Shared(Policy(table, parse_users(text, table, require_default=True))), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"alice", b"pw"]))
    assert s.data_for_client() == b"+OK\r\n"
    return s


def exec_(s: Session) -> bytes:
    s.data_for_upstream()
    s.data_for_client()
    s.client_data(b"EXEC\r\n")
    return s.data_for_upstream()


def test_granted_revoked_then_reloaded_back_to_the_multi_user(table: CommandTable) -> None:
    text = "user default off\nuser alice on >pw ~* &* +@all -flushall\n"
    s = alice(table, text)

    def setuser(*rules: bytes) -> None:
        new, reply = admin.setuser(s.policy.users, table, [b"alice", *rules])
        assert reply == b"+OK\r\n" and new is not None
        s.shared.swap(s.policy.with_users(new), {"alice"}, [])
        assert s.rebind(new, {"alice"}, []) == ""

    s.client_data(b"MULTI\r\n")
    s.upstream_data(b"+OK\r\n")
    setuser(b"+flushall")
    s.client_data(b"FLUSHALL\r\n")  # queued while allowed
    s.upstream_data(b"+QUEUED\r\n")
    setuser(b"-flushall")
    reloaded = parse_users(text, table, require_default=True)  # ACL LOAD / SIGHUP, the file unchanged
    assert reloaded["alice"] is s.state.multi_user  # the very User of MULTI is back
    s.shared.swap(s.policy.with_users(reloaded), None, ())
    assert s.rebind(reloaded, None, ()) == ""
    assert exec_(s) == ABORTED
    s.upstream_data(b"-ERR wrong number of arguments for 'get' command\r\n-EXECABORT Transaction discarded\r\n")
    assert s.data_for_client() == EXECABORT_ACL


def test_a_live_disabled_commands_change_reaches_an_open_transaction(table: CommandTable) -> None:
    text = "user default off\nuser alice on >pw ~* &* +@all\n"
    s = alice(table, text)
    s.client_data(b"MULTI\r\nFLUSHALL\r\n")
    s.upstream_data(b"+OK\r\n+QUEUED\r\n")
    reloaded = parse_users(text, table, require_default=True)
    assert reloaded["alice"] is s.user
    s.shared.swap(replace(s.policy, users=reloaded, disabled=frozenset({"flushall"})), None, ())
    assert s.rebind(reloaded, None, ()) == ""
    assert exec_(s) == ABORTED


def test_nothing_changed_exec_runs_and_the_multi_user_is_let_go(table: CommandTable) -> None:
    s = alice(table, "user default off\nuser alice on >pw ~* &* +@all\n")
    s.client_data(b"MULTI\r\nINCR n\r\n")
    s.upstream_data(b"+OK\r\n+QUEUED\r\n")
    assert exec_(s) == encode_command([b"EXEC"])
    assert s.state.multi_user is None  # (not kept past the transaction)
