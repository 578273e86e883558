"""End to end, redis-py and redis-cli through real TLS into redisguard into a real redis-server: commands
allowed, refused (a key, a command) and disabled; pipelines and transactions in order; inline requests,
QUIT; 200 concurrent TLS clients."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from redisguard.protocol.resp import encode_command
from tests.helpers import ProxyProc, TLSClient, raw_exchange, start_redis

NOPERM_KEY = "this user has no permissions to access one of the keys used as arguments"


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
