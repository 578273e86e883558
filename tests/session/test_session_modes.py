"""A session's modes, sans-IO: CLIENT REPLY SKIP/OFF, MULTI/EXEC (and the users' rules changed before
EXEC), subscribed, MONITOR, and the replies of each in order."""

from __future__ import annotations

from redisguard.acl import parse_users
from redisguard.commands.table import CommandTable
from redisguard.policy.decide import Policy, Shared
from redisguard.protocol.resp import encode_command
from redisguard.session.machine import Mode, Session
from tests.session.conftest import TABLE, forwarded, session


def test_client_reply_skip_then_a_refusal_keeps_replies_in_place() -> None:
    """SKIP, then a request the proxy refuses itself: Redis never sees either, so the next replies are
    not shifted (a reply going to the wrong request would leak app:2 to the GET of app:1)."""
    s = session("alice")
    s.client_data(b"CLIENT REPLY SKIP\r\nGET victim:key\r\nGET app:1\r\nGET app:2\r\n")
    assert forwarded(s) == [[b"GET", b"app:1"], [b"GET", b"app:2"]]
    s.upstream_data(b"$2\r\nv1\r\n$2\r\nv2\r\n")
    assert b"".join(s.to_client) == b"$2\r\nv1\r\n$2\r\nv2\r\n"


def test_client_reply_skip_swallows_the_forwarded_reply() -> None:
    s = session("alice")
    s.client_data(b"CLIENT REPLY SKIP\r\nGET app:1\r\nGET app:2\r\n")
    assert forwarded(s) == [[b"GET", b"app:1"], [b"GET", b"app:2"]]  # SKIP itself stays here
    s.upstream_data(b"$2\r\nv1\r\n$2\r\nv2\r\n")
    assert b"".join(s.to_client) == b"$2\r\nv2\r\n"


def test_exec_after_the_users_rules_changed_discards_the_transaction() -> None:
    """Redis checks every queued command again at EXEC; a revocation in between must not let them run."""
    s = session("alice")
    s.client_data(b"MULTI\r\nGET app:1\r\nSET app:1 x\r\n")
    s.upstream_data(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n")
    revoked = parse_users("user default off\nuser alice on >alice-pw ~other:* +@all -@dangerous\n", TABLE)
    s.shared.swap(s.policy.with_users(revoked), {"alice"}, [])
    assert s.rebind(revoked, {"alice"}, []) == ""
    s.to_upstream.clear()
    s.client_data(b"EXEC\r\n")
    # the queued GET/SET never run: a request Redis refuses at queue time marks the transaction, and
    # Redis aborts it at EXEC (as MONITOR would show it without the proxy)
    assert forwarded(s) == [[b"GET"], [b"EXEC"]]
    s.upstream_data(b"-ERR wrong number of arguments for 'get' command\r\n"
                    b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert s.to_client[-1].startswith(b"-EXECABORT Transaction discarded because of: NOPERM ACLs rules changed")


def mode_of(s: Session) -> Mode:
    return s.mode  # (read afresh each time: the mode changes under the type checker's feet)


def test_modes_follow_the_commands() -> None:
    s = session("alice")
    assert mode_of(s) is Mode.NORMAL
    s.client_data(b"MULTI\r\n")
    assert mode_of(s) is Mode.MULTI
    s.client_data(b"DISCARD\r\n")
    assert mode_of(s) is Mode.NORMAL
    s.client_data(b"SUBSCRIBE news\r\n")
    assert mode_of(s) is Mode.SUBSCRIBED and not s.idle
    s.upstream_data(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n")
    s.client_data(b"UNSUBSCRIBE news\r\n")
    assert mode_of(s) is Mode.NORMAL
    s.client_data(b"QUIT\r\n")
    assert mode_of(s) is Mode.CLOSING
    m = session("alice")
    m.client_data(b"MONITOR\r\n")
    m.upstream_data(b"+OK\r\n")
    assert m.mode is Mode.MONITOR and not m.idle


def test_reply_off_aborted_exec_with_subscribe_keeps_replies_in_order(table: CommandTable) -> None:
    """Under CLIENT REPLY OFF nothing would say whether EXEC ran (a WATCH can abort it): SUBSCRIBE inside
    MULTI after WATCH is refused then, so the proxy never guesses the subscription state."""
    users = parse_users("user default off\nuser app on >pw ~* &* +@all\n", table, require_default=True)
    s = Session(Shared(Policy(table, users)), "test", "10.0.0.1:5000")
    s.client_data(encode_command([b"AUTH", b"app", b"pw"]))
    assert s.data_for_client() == b"+OK\r\n"
    s.client_data(encode_command([b"WATCH", b"k"]))
    s.upstream_data(b"+OK\r\n")
    assert s.data_for_client() == b"+OK\r\n"
    for argv in ([b"CLIENT", b"REPLY", b"OFF"], [b"MULTI"], [b"SUBSCRIBE", b"ch"], [b"EXEC"]):
        s.client_data(encode_command(argv))
    sent = s.data_for_upstream()
    # refused; the EXEC aborted upstream too (a request Redis refuses at queue time, then EXEC: no replies under OFF)
    assert b"SUBSCRIBE" not in sent and sent.endswith(encode_command([b"GET"]) + encode_command([b"EXEC"]))
    assert not s.subscribed and not s.paused
    s.client_data(encode_command([b"CLIENT", b"REPLY", b"ON"]))
    assert b"REPLY" in s.data_for_upstream()  # Redis must see it, else replies stay off for good
    s.upstream_data(b"+OK\r\n")
    assert s.data_for_client() == b"+OK\r\n"
    s.client_data(encode_command([b"GET", b"k"]))
    s.upstream_data(b"$1\r\nv\r\n")
    assert s.data_for_client() == b"$1\r\nv\r\n"


def test_exec_with_subscribe_holds_the_pipeline_until_its_reply(table: CommandTable) -> None:
    """Whether EXEC ran (WATCH can abort it) decides whether a RESP2 client is subscribed, which decides
    what comes next: requests behind such an EXEC are decided only once its reply is in."""
    users = parse_users("user default off\nuser app on >pw ~* &* +@all\n", table, require_default=True)
    for reply, subscribed in ((b"*-1\r\n", False), (b"*1\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", True)):
        s = Session(Shared(Policy(table, users)), "test", "10.0.0.1:5000")
        s.client_data(encode_command([b"AUTH", b"app", b"pw"]))
        s.data_for_client()
        s.client_data(b"".join(encode_command(a) for a in ([b"MULTI"], [b"SUBSCRIBE", b"ch"], [b"EXEC"], [b"GET", b"k"])))
        assert b"GET" not in s.data_for_upstream() and s.paused  # held behind EXEC
        s.upstream_data(b"+OK\r\n+QUEUED\r\n" + reply)
        assert s.subscribed == subscribed and not s.paused
        s.resume()  # what the transport does when the session is no longer held
        if subscribed:  # RESP2 subscribed context: Redis would refuse GET, so does the proxy
            assert b"GET" not in s.data_for_upstream()
            assert s.data_for_client().endswith(b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / "
                                                b"(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n")
        else:
            assert s.data_for_upstream() == encode_command([b"GET", b"k"])
