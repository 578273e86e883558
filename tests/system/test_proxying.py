"""End to end: redis-py and redis-cli through real TLS into redisguard into a real redis-server."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, RedisProc, TLSClient, raw_exchange, start_proxy, start_redis

NOPERM_KEY = "this user has no permissions to access one of the keys used as arguments"
WRONGPASS = "invalid username-password pair or user is disabled."


def test_allowed_command_reaches_redis(tls_client: TLSClient, direct: redis.Redis) -> None:
    c = tls_client()
    assert c.set("cache:e2e", "v1") is True
    assert c.get("cache:e2e") == b"v1"
    assert direct.get("cache:e2e") == b"v1"


def test_denied_key_and_command(tls_client: TLSClient, direct: redis.Redis) -> None:
    c = tls_client()
    with pytest.raises(redis.exceptions.NoPermissionError, match=NOPERM_KEY):
        c.set("other:key", "x")
    assert direct.get("other:key") is None
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the 'client|kill' command"):
        c.execute_command("CLIENT", "KILL", "ID", "999999")


def test_disabled_command_answers_as_unknown(tls_client: TLSClient, direct: redis.Redis) -> None:
    admin = tls_client("admin", "admin-pw")
    direct.set("cache:survives", "1")
    with pytest.raises(redis.ResponseError, match="^unknown command 'FLUSHALL', with args beginning with: $"):
        admin.flushall()
    with pytest.raises(redis.ResponseError, match="^unknown command 'CONFIG', with args beginning with: 'GET' 'x' $"):
        admin.execute_command("CONFIG", "GET", "x")
    assert direct.get("cache:survives") == b"1"


def test_auth_forms(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"".join(encode_command(a) for a in [
        [b"GET", b"cache:x"],
        [b"AUTH", b"alice", b"wrong"],
        [b"AUTH", b"nobody", b"alice-pw"],
        [b"AUTH", b"disabled", b"dis-pw"],
        [b"AUTH", b"alice-pw"],                      # one-arg form: user "default", which is off
        [b"AUTH", b"a", b"b", b"c"],
        [b"HELLO", b"3"],
        [b"AUTH", b"alice", b"alice-pw"],
        [b"GET", b"cache:never-set"],
    ]))  # fmt: skip
    assert out == (
        b"-NOAUTH Authentication required.\r\n"
        + b"-WRONGPASS invalid username-password pair or user is disabled.\r\n" * 4
        + b"-ERR syntax error\r\n"
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH "
        b"<user> <pass> option can be used to authenticate the client and select the RESP protocol version "
        b"at the same time\r\n"
        b"+OK\r\n"
        b"$-1\r\n"
    )


def test_auth_errors_match_real_redis(redis_server: RedisProc, proxy: ProxyProc) -> None:
    """The same unauthenticated conversation against Redis (default user off) and the proxy."""
    r = start_redis(extra=["--user", "default off", "--user", "alice on >alice-pw ~cache:* +@all"])
    try:
        script = b"".join(encode_command(a) for a in [
            [b"PING"], [b"AUTH", b"alice", b"nope"], [b"HELLO", b"3"], [b"HELLO", b"4"], [b"HELLO", b"x"],
            [b"HELLO", b"2", b"FOO"], [b"AUTH", b"x", b"y", b"z"], [b"GET"], [b"NOSUCHCMD", b"a"],
            [b"HELLO", b"2", b"AUTH", b"alice", b"bad"], [b"AUTH", b"alice", b"alice-pw"], [b"GET", b"cache:q"],
            [b"GET", b"nokey:q"], [b"CLIENT", b"NOSUCH"],
        ])  # fmt: skip
        want = raw_exchange(r.port, script)
        got = raw_exchange(proxy.plain_port, script)
        assert got.replace(b"'nokey:q'", b"") == want.replace(b"'nokey:q'", b"") or got == want
        assert got.count(b"\r\n") == want.count(b"\r\n")
    finally:
        r.stop()


def test_hello3_auth_setname(tls_client: TLSClient, proxy: ProxyProc) -> None:
    c = tls_client(protocol=3)
    assert c.ping() is True
    out = raw_exchange(
        proxy.plain_port,
        encode_command([b"HELLO", b"3", b"AUTH", b"alice", b"alice-pw", b"SETNAME", b"app1"])
        + encode_command([b"CLIENT", b"GETNAME"]),
    )
    assert out.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in out
    assert out.endswith(b"$4\r\napp1\r\n")


def test_pipeline_1000_mixed_in_order(tls_client: TLSClient) -> None:
    c = tls_client()
    p = c.pipeline(transaction=False)
    expected: list[object] = []
    for i in range(1000):
        kind = i % 4
        if kind == 0:
            p.set(f"cache:p{i}", i)
            expected.append(True)
        elif kind == 1:
            p.get(f"secret:p{i}")
            expected.append("NOPERM")
        elif kind == 2:
            p.get(f"cache:p{i - 2}")
            expected.append(str(i - 2).encode())
        else:
            p.execute_command("FLUSHALL")
            expected.append("unknown")
    got = p.execute(raise_on_error=False)
    assert len(got) == 1000
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if e == "NOPERM":
            assert isinstance(g, redis.exceptions.NoPermissionError), i
        elif e == "unknown":
            assert isinstance(g, redis.ResponseError) and "unknown command 'FLUSHALL'" in str(g), i
        else:
            assert g == e, (i, g, e)


def test_pipeline_order_raw_bytes(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"".join(encode_command(a) for a in [
        [b"AUTH", b"alice", b"alice-pw"], [b"SET", b"cache:a", b"1"], [b"FLUSHALL"], [b"GET", b"cache:a"],
        [b"GET", b"x:1"], [b"GET", b"cache:a"],
    ]))  # fmt: skip
    assert out == (
        b"+OK\r\n+OK\r\n-ERR unknown command 'FLUSHALL', with args beginning with: \r\n$1\r\n1\r\n"
        b"-NOPERM " + NOPERM_KEY.encode() + b"\r\n$1\r\n1\r\n"
    )


def test_multi_with_denied_command_aborts(tls_client: TLSClient, direct: redis.Redis) -> None:
    direct.delete("cache:tx")
    c = tls_client()
    p = c.pipeline(transaction=True)
    p.set("cache:tx", "1")
    p.set("forbidden:tx", "2")
    p.get("cache:tx")
    with pytest.raises(redis.exceptions.NoPermissionError, match="Command # 2 .SET forbidden:tx 2."):
        p.execute()
    assert direct.get("cache:tx") is None
    p = c.pipeline(transaction=True)
    p.set("cache:tx", "1")
    p.get("cache:tx")
    assert p.execute() == [True, b"1"]


def test_inline_commands(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b'AUTH alice alice-pw\r\nSET cache:inline "a b"\r\nGET cache:inline\r\nPING\r\n')
    assert out == b"+OK\r\n+OK\r\n$3\r\na b\r\n+PONG\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"*abc\r\n",
        b"*1\r\n$-5\r\n",
        b'SET "a\r\n',
        b"*1\r\n$99999999999\r\n",
        b"*2\r\n$3\r\nGET\r\n:1\r\n",
    ],
)
def test_malformed_resp_matches_redis_and_closes(redis_server: RedisProc, proxy: ProxyProc, data: bytes) -> None:
    # Authenticate first on both so that the post-auth limits apply, as with a real client.
    r = start_redis(extra=["--user", "default off", "--user", "alice on >alice-pw ~cache:* +@all"])
    try:
        login = encode_command([b"AUTH", b"alice", b"alice-pw"])
        want = raw_exchange(r.port, login + data, expect_close=True)
        got = raw_exchange(proxy.plain_port, login + data, expect_close=True)
        assert got == want
        assert b"Protocol error" in got
    finally:
        r.stop()
    # the proxy is unaffected
    assert raw_exchange(proxy.plain_port, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"


def test_unauthenticated_big_request_refused(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"*20\r\n", expect_close=True)
    assert out == b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    out = raw_exchange(proxy.plain_port, b"*2\r\n$3\r\nGET\r\n$100000\r\n", expect_close=True)
    assert out == b"-ERR Protocol error: unauthenticated bulk length\r\n"


def test_plaintext_on_tls_port_is_closed(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.tls_port, b"PING\r\n", expect_close=True)
    assert out == b""
    text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics").read().decode()
    assert 'redisguard_tls_handshake_failures_total{listener="tls"' in text
    # still serving
    assert raw_exchange(proxy.plain_port, b"PING\r\n") == b"-NOAUTH Authentication required.\r\n"


def test_a_stalled_tls_handshake_times_out_as_such(proxy: ProxyProc) -> None:
    """A ClientHello that stops after its first byte: closed at handshake_timeout, counted as a timeout
    (uvloop reports its own handshake timeout as a connection abort)."""
    def timeouts() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics").read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('redisguard_tls_handshake_failures_total{listener="tls",reason="timeout"}'))  # fmt: skip

    before = timeouts()
    assert raw_exchange(proxy.tls_port, b"\x16", expect_close=True, timeout=10) == b""
    deadline = time.monotonic() + 5  # uvloop closes the socket first, and tells the proxy at its next turn
    while timeouts() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert timeouts() == before + 1


def test_tls_client_on_plain_port_is_closed(proxy: ProxyProc, certs: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost").sendall(b"PING\r\n")


def test_silent_client_is_closed(proxy: ProxyProc) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=10) as s:
        assert s.recv(100) == b""  # closed by auth_timeout (3 s in the test config)
    assert 2.0 < time.monotonic() - start < 9.0
    with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10) as s:
        assert s.recv(100) == b""  # TLS handshake_timeout


def test_client_certificate_login(proxy: ProxyProc, certs: Path) -> None:
    c = redis.Redis(
        host="127.0.0.1", port=proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
        ssl_certfile=str(certs / "client.pem"), ssl_keyfile=str(certs / "client.key"),
    )  # fmt: skip
    assert c.execute_command("ACL", "WHOAMI") == b"alice"
    assert c.set("cache:cert", "1") is True
    with pytest.raises(redis.exceptions.NoPermissionError):
        c.get("nope:1")
    # logged in by its certificate, an idle pooled connection is not closed by auth_timeout (3 s here)
    time.sleep(3.5)
    assert c.get("cache:cert") == b"1"
    assert c.connection_pool._created_connections == 1  # the same connection, not a reconnect
    c.close()


def test_redis_cli_over_tls(proxy: ProxyProc, certs: Path) -> None:
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli is required (apt-get install redis-tools)"
    base = [cli, "--tls", "--cacert", str(certs / "ca.pem"), "-p", str(proxy.tls_port), "--user", "alice",
            "--pass", "alice-pw", "--no-auth-warning"]  # fmt: skip
    assert subprocess.run([*base, "SET", "cache:cli", "hi"], capture_output=True, text=True).stdout.strip() == "OK"
    assert subprocess.run([*base, "GET", "cache:cli"], capture_output=True, text=True).stdout.strip() == "hi"
    out = subprocess.run([*base, "GET", "secret"], capture_output=True, text=True).stdout.strip()
    assert out == "NOPERM " + NOPERM_KEY


def test_200_concurrent_tls_clients(proxy: ProxyProc, certs: Path) -> None:
    def one(i: int) -> bytes | str | None:
        c = redis.Redis(host="127.0.0.1", port=proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                        username="alice", password="alice-pw", socket_timeout=30)  # fmt: skip
        try:
            c.set(f"cache:c{i}", i)
            return c.get(f"cache:c{i}")
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(200) as ex:
        results = list(ex.map(one, range(200)))
    assert results == [str(i).encode() for i in range(200)]


def test_upstream_down_and_back(tmp_path: Path, certs: Path, users_file: Path) -> None:
    r = start_redis()
    p = start_proxy(tmp_path, certs, users_file, r.port)
    try:

        def client() -> redis.Redis:
            return redis.Redis(host="127.0.0.1", port=p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                               username="alice", password="alice-pw", socket_timeout=5)  # fmt: skip

        assert client().set("cache:up", "1") is True
        r.stop()
        out = raw_exchange(p.plain_port, b"AUTH alice alice-pw\r\nPING\r\n", expect_close=True)
        # AUTH is the proxy's; PING is the first request that needs Redis
        # ... and names no address behind the proxy (the proxy's log does)
        assert out == b"+OK\r\n-ERR redisguard: upstream Redis is unavailable\r\n"
        assert str(r.port).encode() not in out
        ready = urllib.request.Request(f"http://127.0.0.1:{p.metrics_port}/readyz")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(ready)
        assert e.value.code == 503
        r.start()
        assert client().ping() is True
        assert p.proc.poll() is None
    finally:
        p.stop()
        r.stop()


def test_upstream_bad_credentials_is_a_clear_error(tmp_path: Path, certs: Path, users_file: Path) -> None:
    r = start_redis()
    p = start_proxy(tmp_path, certs, users_file, r.port)
    (tmp_path / "upstream.pw").write_text("wrong")  # not re-read; test the live AUTHCHECK path instead:
    try:
        # revoke the service user's password on the real Redis: new upstream connections fail AUTH
        admin = redis.Redis(port=r.port, username="svc", password="svc-test-password")
        admin.execute_command("ACL", "SETUSER", "svc", "resetpass", ">other")
        admin.close()
        out = raw_exchange(p.plain_port, b"AUTH alice alice-pw\r\nPING\r\n", expect_close=True)
        assert out == b"+OK\r\n-ERR redisguard: upstream authentication failed; check [upstream] username and password\r\n"
        # counted, and audit-logged (rate-limited), so a rotated password shows up without a client's help
        body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
        assert "redisguard_upstream_auth_failures_total 1.0" in body
        assert "upstream_auth_failed" in p.log.read_text()
    finally:
        p.stop()
        r.stop()


def test_unauthenticated_clients_cost_redis_no_connection(proxy: ProxyProc, direct: redis.Redis) -> None:
    before = len(direct.client_list())
    idle = [socket.create_connection(("127.0.0.1", proxy.plain_port)) for _ in range(20)]
    for s in idle:
        s.sendall(b"PING\r\nAUTH alice wrong\r\n")
    time.sleep(0.3)
    assert len(direct.client_list()) == before  # refused and unauthenticated: no upstream connection
    idle[0].sendall(b"AUTH alice alice-pw\r\nPING\r\n")
    time.sleep(0.3)
    assert len(direct.client_list()) == before + 1
    for s in idle:
        s.close()


def test_quit_closes_after_replies(proxy: ProxyProc) -> None:
    out = raw_exchange(proxy.plain_port, b"AUTH alice alice-pw\r\nPING\r\nQUIT\r\nPING\r\n", expect_close=True)
    assert out == b"+OK\r\n+PONG\r\n+OK\r\n"


def test_multi_exec_bytes_match_redis(proxy: ProxyProc) -> None:
    """MULTI / allowed / denied / EXEC, and a denied EXEC, byte for byte as Redis with the same ACL."""
    r = start_redis(extra=["--user", "default off", "--user", "alice on >alice-pw ~cache:* +@all",
                           "--user", "noexec on >n-pw ~* +@all -exec"])  # fmt: skip
    script = b"".join(encode_command(a) for a in [
        [b"AUTH", b"alice", b"alice-pw"], [b"MULTI"], [b"SET", b"cache:m", b"1"], [b"GET", b"zz"],
        [b"NOSUCH"], [b"EXEC"], [b"GET", b"cache:m"], [b"EXEC"], [b"DISCARD"], [b"MULTI"], [b"MULTI"],
        [b"GET", b"cache:m"], [b"EXEC"],
    ])  # fmt: skip
    try:
        want = raw_exchange(r.port, script)
        got = raw_exchange(proxy.plain_port, script)
        assert got == want
        assert b"-EXECABORT Transaction discarded because of previous errors." in got
    finally:
        r.stop()


def test_unix_socket_listener(tmp_path: Path, certs: Path, users_file: Path, redis_server: RedisProc) -> None:
    sock = tmp_path / "rg.sock"
    extra = f'[[listener]]\nname = "sock"\ntype = "unix"\npath = "{sock}"\nsocket_mode = "600"\n'
    p = start_proxy(tmp_path, certs, users_file, redis_server.port, extra=extra)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        c = redis.Redis(unix_socket_path=str(sock), username="alice", password="alice-pw")
        assert c.set("cache:unix", "1") is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("nope")
        c.close()
    finally:
        p.stop()
    assert not sock.exists()  # removed on shutdown


@pytest.mark.parametrize("mode", ["unix", "tls"])
def test_upstream_over_unix_socket_and_tls(tmp_path: Path, certs: Path, users_file: Path, mode: str) -> None:
    """[upstream] path = unix socket (the sidecar setup), and tls = true (wrapping a remote Redis)."""
    from tests.helpers import free_port

    sock = tmp_path / "redis.sock"
    tls_port = free_port()
    extra = {
        "unix": ["--unixsocket", str(sock), "--unixsocketperm", "700"],
        "tls": ["--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.pem"), "--tls-key-file",
                str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.pem"), "--tls-auth-clients", "no"],
    }[mode]  # fmt: skip
    r = start_redis(extra=extra)
    tls_upstream = f'tls = true\ntls_ca_file = "{certs / "ca.pem"}"\ntls_server_name = "localhost"\n'
    upstream_extra = tls_upstream if mode == "tls" else ""
    p = start_proxy(tmp_path, certs, users_file, tls_port if mode == "tls" else r.port, upstream_extra=upstream_extra)
    if mode == "unix":  # point the upstream at the socket instead of host:port
        cfg = p.config.read_text().replace(f'address = "127.0.0.1:{r.port}"', f'path = "{sock}"')
        p.stop()
        p.config.write_text(cfg)
        p = start_proxy_from(p)
    try:
        c = redis.Redis(host="127.0.0.1", port=p.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
                        username="alice", password="alice-pw")  # fmt: skip
        assert c.set("cache:via", mode) is True
        assert c.get("cache:via") == mode.encode()
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("other")
        c.close()
        assert "command_table_fallback" not in p.log.read_text()  # COMMAND INFO came over that path too
    finally:
        p.stop()
        r.stop()


def start_proxy_from(p: ProxyProc) -> ProxyProc:
    import subprocess as sp
    import sys

    from tests.helpers import wait_port

    proc = sp.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(p.config)], stderr=open(p.log, "wb"))
    wait_port(p.plain_port, proc)
    return ProxyProc(proc, p.tls_port, p.plain_port, p.metrics_port, p.config, p.log)


def test_protected_commands_follow_the_upstreams_setting(tmp_path: Path, certs: Path, users_file: Path) -> None:
    """enable_debug_command = "upstream" (the default): Redis's `local` means local to redisguard."""
    r = start_redis(extra=["--enable-debug-command local"])
    p = start_proxy(tmp_path, certs, users_file, r.port)
    try:
        debug = encode_command([b"AUTH", b"admin", b"admin-pw"]) + encode_command([b"DEBUG", b"SLEEP", b"0"])
        assert raw_exchange(p.plain_port, debug) == b"+OK\r\n+OK\r\n"  # a loopback client of redisguard
    finally:
        p.stop()
        r.stop()
