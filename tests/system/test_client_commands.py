"""CLIENT LIST / INFO / KILL through redisguard name the clients, their addresses and their redisguard
users as Redis would for the same clients connected directly — in both upstream identity modes — and
never the proxy's own upstream sockets, the service user, the mirror users or Redis's own port.

Each test runs the same clients against a redis-server with the same users (``reference``) and through
redisguard in front of another (``upstream``), and compares what each answers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER, ProxyProc, RedisProc, read_until, start_proxy, start_redis

USERS = """\
user default off
user admin on >admin-pw ~* &* +@all
user alice on >alice-pw ~* +@read +@connection
user bob on >bob-pw ~* +@read +@connection -client|kill -client|list
"""


def _as_service(port: int) -> redis.Redis:
    return redis.Redis(port=port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, socket_timeout=10)


@pytest.fixture(scope="module")
def reference() -> Iterator[RedisProc]:
    """A redis-server enforcing USERS itself: what clients see talking to Redis directly."""
    r = start_redis()
    for line in USERS.splitlines():
        _as_service(r.port).execute_command("ACL", "SETUSER", *line.split()[1:])
    yield r
    r.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RedisProc]:
    r = start_redis()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=["service", "mirror"])
def proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Path,
          upstream: RedisProc) -> Iterator[ProxyProc]:  # fmt: skip
    d = tmp_path_factory.mktemp(request.param)
    (d / "users.acl").write_text(USERS)
    # a health check every 0.2 s: its connections are the proxy's own, never a client's to see or kill
    p = start_proxy(d, certs, d / "users.acl", upstream.port,
                    upstream_extra=f'identity = "{request.param}"\nhealth_check_interval = 0.2')  # fmt: skip
    yield p
    p.stop()


class Client:
    """One raw connection, logged in: its own address as the server should show it."""

    def __init__(self, port: int, user: str, resp: int = 2) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addr = "%s:%d" % self.sock.getsockname()[:2]
        self.laddr = f"127.0.0.1:{port}"
        hello = self.call("HELLO", str(resp), "AUTH", user, f"{user}-pw")
        assert hello[:1] in (b"*", b"%"), hello

    def call(self, *args: str) -> bytes:
        self.sock.sendall(encode_command([a.encode() for a in args]))
        return read_until(self.sock, _whole, 10)

    def closed(self) -> bool:
        self.sock.sendall(b"PING\r\n")
        return read_until(self.sock, _whole, 10) == b""

    def close(self) -> None:
        self.sock.close()


def _whole(data: bytes) -> bool:
    import hiredis

    r = hiredis.Reader(protocolError=ValueError, replyError=ValueError)
    r.setmaxbuf(0)
    r.feed(data)
    try:
        return r.gets() is not False
    except ValueError:
        return True


def _text(reply: bytes) -> str:
    """A CLIENT LIST/INFO reply's text: a bulk string (RESP2) or a verbatim one (RESP3, ``txt:``)."""
    head, _, rest = reply.partition(b"\r\n")
    assert head[:1] in (b"$", b"="), reply
    body = rest[: int(head[1:])]
    assert rest[int(head[1:]) :] == b"\r\n"
    return (body[4:] if head[:1] == b"=" else body).decode()


def rows(reply: bytes) -> list[dict[str, str]]:
    return [dict(f.split("=", 1) for f in line.split(" ")) for line in _text(reply).splitlines()]


def shown(reply: bytes) -> set[tuple[str, str, str]]:
    return {(r["user"], r["addr"], r["laddr"]) for r in rows(reply)}


@pytest.fixture
def both(reference: RedisProc, proxy: ProxyProc) -> Iterator[dict[str, dict[str, Client]]]:
    """The same clients (admin, alice, bob twice) on Redis directly and through redisguard."""
    made: dict[str, dict[str, Client]] = {}
    for side, port in (("redis", reference.port), ("proxy", proxy.plain_port)):
        made[side] = {name: Client(port, name.rstrip("2")) for name in ("admin", "alice", "bob", "bob2")}
        made[side]["alice"].call("PING")  # through the proxy: a client has an upstream connection once it sends one
        made[side]["bob"].call("PING")
        made[side]["bob2"].call("PING")
    yield made
    for clients in made.values():
        for c in clients.values():
            c.close()


def expected(clients: dict[str, Client]) -> set[tuple[str, str, str]]:
    return {(name.rstrip("2"), c.addr, c.laddr) for name, c in clients.items()}


@pytest.mark.parametrize("resp", [2, 3])
def test_client_list_names_the_clients_as_redis_does(both: dict[str, dict[str, Client]], resp: int) -> None:
    for side in ("redis", "proxy"):
        admin = both[side]["admin"]
        if resp == 3:
            admin.call("HELLO", "3")
        listed = admin.call("CLIENT", "LIST")
        assert listed[:1] == (b"=" if resp == 3 else b"$")
        # Redis lists exactly these (its service connection is gone); the proxy only its own clients,
        # never its health check, its command-table or mirror connections, nor the service user
        assert shown(listed) == expected(both[side]), side
        assert [list(r) for r in rows(listed)] == [list(r) for r in rows(both["redis"]["admin"].call("CLIENT", "LIST"))]
        by_type = admin.call("CLIENT", "LIST", "TYPE", "normal")
        assert shown(by_type) == expected(both[side])
        assert shown(admin.call("CLIENT", "LIST", "TYPE", "master")) == set()
    assert b"user=svc" not in listed and b"user=rg:" not in listed


@pytest.mark.parametrize("resp", [2, 3])
def test_client_info_is_the_clients_own_row(both: dict[str, dict[str, Client]], resp: int) -> None:
    for side in ("redis", "proxy"):
        bob = both[side]["bob"]
        if resp == 3:
            bob.call("HELLO", "3")
        info = bob.call("CLIENT", "INFO")
        assert info[:1] == (b"=" if resp == 3 else b"$")
        assert shown(info) == {("bob", bob.addr, bob.laddr)}, side


def test_client_list_needs_its_right_as_in_redis(both: dict[str, dict[str, Client]]) -> None:
    answers = [both[side]["bob"].call("CLIENT", "LIST") for side in ("redis", "proxy")]
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"-NOPERM")
    kills = [both[side]["bob"].call("CLIENT", "KILL", "USER", "alice") for side in ("redis", "proxy")]
    assert kills[0] == kills[1]
    assert not both["proxy"]["alice"].closed()


def test_client_kill_user_kills_that_users_clients(both: dict[str, dict[str, Client]]) -> None:
    for side in ("redis", "proxy"):
        c = both[side]
        assert c["alice"].call("CLIENT", "KILL", "USER", "bob") == b":2\r\n", side
        assert c["bob"].closed() and c["bob2"].closed()
        assert not c["admin"].closed()
        # SKIPME yes (the default): the caller survives its own user's kill
        assert c["alice"].call("CLIENT", "KILL", "USER", "alice") == b":0\r\n"
        assert c["admin"].call("CLIENT", "KILL", "USER", "alice", "SKIPME", "no") == b":1\r\n"
        assert c["alice"].closed()


def test_client_kill_service_user_is_not_a_client(both: dict[str, dict[str, Client]], proxy: ProxyProc) -> None:
    """svc (the service user) and rg:* (mirror users) are not redisguard users: no such user, no kill."""
    c = both["proxy"]
    assert c["admin"].call("CLIENT", "KILL", "USER", UPSTREAM_USER) == b"-ERR No such user 'svc'\r\n"
    assert c["admin"].call("CLIENT", "KILL", "USER", "rg:bob") == b"-ERR No such user 'rg:bob'\r\n"
    assert not c["alice"].closed() and not c["bob"].closed()


def test_client_kill_by_address_and_type(both: dict[str, dict[str, Client]]) -> None:
    for side in ("redis", "proxy"):
        c = both[side]
        assert c["admin"].call("CLIENT", "KILL", c["bob"].addr) == b"+OK\r\n"
        assert c["bob"].closed()
        assert c["admin"].call("CLIENT", "KILL", "ADDR", c["bob2"].addr, "LADDR", c["bob2"].laddr) == b":1\r\n"
        assert c["bob2"].closed()
        assert c["admin"].call("CLIENT", "KILL", "TYPE", "normal") == b":1\r\n", side  # alice; not itself
        assert c["alice"].closed() and not c["admin"].closed()


def test_proxy_connections_cannot_be_killed(both: dict[str, dict[str, Client]], upstream: RedisProc) -> None:
    """A connection straight to Redis (and the proxy's own) is behind the proxy: not listed, not killable,
    by address or by ID."""
    direct = _as_service(upstream.port)
    direct_id, direct_addr = direct.client_id(), str(direct.client_info()["addr"])
    admin = both["proxy"]["admin"]
    assert direct_addr not in _text(admin.call("CLIENT", "LIST"))
    assert admin.call("CLIENT", "KILL", "ADDR", direct_addr) == b":0\r\n"
    assert admin.call("CLIENT", "KILL", direct_addr) == b"-ERR No such client\r\n"
    assert admin.call("CLIENT", "KILL", "ID", str(direct_id)) == b":0\r\n"
    assert admin.call("CLIENT", "KILL", "LADDR", f"127.0.0.1:{upstream.port}") == b":0\r\n"
    assert direct.ping() is True
    # ... while a proxied client's ID (the upstream's, as CLIENT ID says) kills it
    bob = both["proxy"]["bob"]
    bob_id = bob.call("CLIENT", "ID").strip()[1:].decode()
    assert admin.call("CLIENT", "KILL", "ID", bob_id) == b":1\r\n"
    assert bob.closed()


KILL_ERRORS = [
    ["ID", "0"], ["ID", "x"], ["TYPE", "bogus"], ["SKIPME", "maybe"], ["ID", "5", "TYPE"], ["FOO", "bar"],
    ["TYPE", "bogus", "USER", "nobody"], ["USER", "nobody", "TYPE", "bogus"], ["USER", "nobody"],
    ["ID", "999999"], ["ADDR", "10.1.2.3:4"], ["1.2.3.4:5"], ["USER", "alice", "MAXAGE", "1"], ["USER", "alice", "TYPE"],
    ["USER", "nobody", "TYPE"], ["SKIPME", "no", "ID"],
    ["USER", "no\r\nbody"], ["USER", "no\x00body"], ["USER", "\r\nx\r\n"],  # (as Redis prints them in an error)
    ["TYPE", "pubsub"], ["TYPE", "master"], ["TYPE", "replica"], ["SKIPME", "no", "FOO", "x"],
    ["SKIPME", "no", "SKIPME", "x"], ["SKIPME", "nope", "SKIPME", "no"], ["type", "NORMAL", "skipme", "YES", "id", "-1"],
]  # fmt: skip


def test_client_kill_answers_as_redis(both: dict[str, dict[str, Client]]) -> None:
    for args in KILL_ERRORS:
        answers = [both[side]["admin"].call("CLIENT", "KILL", *args) for side in ("redis", "proxy")]
        assert answers[0] == answers[1], args
    assert all(not c.closed() for c in both["proxy"].values())


def test_client_commands_refused_inside_multi(both: dict[str, dict[str, Client]]) -> None:
    admin = both["proxy"]["admin"]
    assert admin.call("MULTI") == b"+OK\r\n"
    assert admin.call("CLIENT", "LIST") == b"-ERR redisguard: CLIENT LIST inside MULTI is not supported\r\n"
    assert admin.call("EXEC").startswith(b"-EXECABORT")


def test_rewritten_replies_keep_their_place(both: dict[str, dict[str, Client]]) -> None:
    """In a pipeline, behind CLIENT REPLY SKIP and OFF: each reply reaches the request that asked for it."""
    for side in ("redis", "proxy"):
        alice = both[side]["alice"]
        alice.sock.sendall(b"PING\r\nCLIENT INFO\r\nECHO x\r\nCLIENT REPLY SKIP\r\nCLIENT LIST\r\nCLIENT KILL USER bob\r\n"
                           b"CLIENT REPLY OFF\r\nCLIENT INFO\r\nCLIENT REPLY ON\r\nPING\r\n")  # fmt: skip
        out = read_until(alice.sock, lambda d: d.endswith(b"+OK\r\n+PONG\r\n") or b"-ERR" in d, 10)
        head, rest = out.split(b"\r\n", 1)
        assert head == b"+PONG", side
        info_len = int(rest.split(b"\r\n", 1)[0][1:])
        info, after = rest.split(b"\r\n", 1)[1][:info_len], rest.split(b"\r\n", 1)[1][info_len:]
        assert f"addr={alice.addr} laddr={alice.laddr} ".encode() in info and b" user=alice " in info, side
        assert after == b"\r\n$1\r\nx\r\n:2\r\n+OK\r\n+PONG\r\n", side


def test_client_info_names_the_user_it_had_when_it_asked(both: dict[str, dict[str, Client]]) -> None:
    for side in ("redis", "proxy"):
        c = both[side]["alice"]
        c.sock.sendall(b"CLIENT INFO\r\nAUTH admin admin-pw\r\nCLIENT INFO\r\nAUTH bob bob-pw\r\nCLIENT LIST\r\n")
        out = read_until(c.sock, lambda d: d.count(b"\n\r\n") == 2 and d.endswith(b"\r\n") and b"NOPERM" in d, 10)
        assert _users(out) == ["alice", "admin"], (side, out)  # and bob's CLIENT LIST: refused, as in Redis


def _users(out: bytes) -> list[str]:
    return [part.split(b" ")[0].decode() for part in out.split(b" user=")[1:]]


def test_client_kill_may_kill_the_caller_last(both: dict[str, dict[str, Client]]) -> None:
    for side in ("redis", "proxy"):
        c = both[side]
        c["admin"].sock.sendall(b"CLIENT KILL TYPE normal SKIPME no\r\n")
        assert read_until(c["admin"].sock, b":4\r\n", 10) == b":4\r\n", side  # answered, then closed
        assert all(x.closed() for x in c.values()), side
