from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from redisguard.cli.certs import init_dev_certs
from redisguard.commands.table import CommandTable
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, TLSClient, start_proxy, start_redis


@pytest.fixture(scope="session")
def table() -> CommandTable:
    return CommandTable.snapshot()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    init_dev_certs(d, client_name="alice")
    return d


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("users") / "users.acl"
    p.write_text(USERS_ACL)
    return p


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProc]:
    r = start_redis()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def proxy(tmp_path_factory: pytest.TempPathFactory, certs: Path, users_file: Path, redis_server: RedisProc
          ) -> Iterator[ProxyProc]:  # fmt: skip
    p = start_proxy(tmp_path_factory.mktemp("proxy"), certs, users_file, redis_server.port)
    yield p
    p.stop()


@pytest.fixture
def tls_client(proxy: ProxyProc, certs: Path) -> Iterator[TLSClient]:
    clients: list[redis.Redis] = []

    def make(username: str | None = "alice", password: str | None = "alice-pw", **kw: Any) -> redis.Redis:
        c = redis.Redis(
            host="127.0.0.1", port=proxy.tls_port, ssl=True, ssl_ca_certs=str(certs / "ca.pem"),
            username=username, password=password, socket_timeout=10,
            **kw,
        )  # fmt: skip
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisProc]:
    """A redis-server of the test module's own (service user ~* &* +@all -flushall): its state is the
    module's to change."""
    r = start_redis()
    yield r
    r.stop()


@pytest.fixture
def direct(redis_server: RedisProc) -> redis.Redis:
    """A connection straight to the upstream Redis (as the service user), for checking effects."""
    from tests.helpers import UPSTREAM_PASSWORD, UPSTREAM_USER

    return redis.Redis(port=redis_server.port, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
