"""``redisguard demo``: a real redis-server on loopback, redisguard in front, a scripted session."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from redisguard.cli.certs import init_dev_certs
from redisguard.cli.procs import free_port, scrape, wait_port, write_config

if TYPE_CHECKING:
    from redis.retry import Retry

ALICE_PASSWORD = "alice-demo-password"  # demo credential from config/users.acl


class Quiet(TypedDict):
    """The demo clients' redis-py options: no CLIENT SETINFO, no retries."""

    lib_name: None
    lib_version: None
    retry: Retry


def main(args: argparse.Namespace) -> int:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    quiet: Quiet = {"lib_name": None, "lib_version": None, "retry": Retry(NoBackoff(), 0)}

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("redisguard demo: redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    d = Path(args.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    certs = d / "certs"
    init_dev_certs(certs)
    users = Path(__file__).resolve().parent.parent / "config" / "users.acl"
    if not users.exists():
        users = d / "users.acl"
        users.write_text(f"user default off\nuser alice on >{ALICE_PASSWORD} ~cache:* +@read +@write -@dangerous\n")
    redis_port, tls_port, plain_port, metrics_port = (free_port() for _ in range(4))
    cfg = write_config(d, tls_port, plain_port, redis_port, metrics_port, users, certs)
    procs: list[subprocess.Popen[bytes]] = []
    log = open(d / "redisguard.log", "wb")
    try:
        r = subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        procs.append(r)
        wait_port(redis_port, r)
        print(f"* redis-server {redis_port} on 127.0.0.1 (plaintext, loopback only)")
        g = subprocess.Popen([sys.executable, "-m", "redisguard", "serve", "-c", str(cfg)], stderr=log, env=os.environ)
        procs.append(g)
        wait_port(tls_port, g)
        print(f"* redisguard: TLS on 127.0.0.1:{tls_port} -> redis 127.0.0.1:{redis_port}; metrics :{metrics_port}")
        before = scrape(metrics_port)

        def show(cmd: str, fn: Callable[[], object]) -> None:
            try:
                print(f"  > {cmd:<38} {fn()!r}")
            except redis.RedisError as e:
                print(f"  > {cmd:<38} ({type(e).__name__}) {e}")

        ca = str(certs / "ca.pem")
        print("\n* redis-py over TLS as alice (rediss://, password auth)")
        c = redis.Redis(
            host="127.0.0.1",
            port=tls_port,
            ssl=True,
            ssl_ca_certs=ca,
            username="alice",
            password=ALICE_PASSWORD,
            **quiet,
        )
        show("SET cache:greeting hello", lambda: c.set("cache:greeting", "hello"))
        show("GET cache:greeting", lambda: c.get("cache:greeting"))
        show("GET secret:token   (key not allowed)", lambda: c.get("secret:token"))
        show("FLUSHALL           (disabled)", lambda: c.flushall())
        show("CLIENT KILL ...    (@dangerous)", lambda: c.execute_command("CLIENT", "KILL", "ID", "1"))
        print("\n* a wrong password")
        bad = redis.Redis(host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=ca, username="alice", password="x", **quiet)
        show("AUTH alice <wrong>", lambda: bad.ping())
        print("\n* a client certificate (CN=alice) logs in without a password")
        cc = redis.Redis(
            host="127.0.0.1", port=tls_port, ssl=True, ssl_ca_certs=ca,
            ssl_certfile=str(certs / "client.pem"), ssl_keyfile=str(certs / "client.key"), **quiet,
        )  # fmt: skip
        show("GET cache:greeting", lambda: cc.get("cache:greeting"))
        print("\n* a pipeline keeps its order: SET / FLUSHALL / GET")
        p = c.pipeline(transaction=False)
        p.set("cache:n", 1)
        p.flushall()
        p.get("cache:n")
        show("pipeline", lambda: [str(x) if isinstance(x, Exception) else x for x in p.execute(raise_on_error=False)])
        cli = shutil.which("redis-cli")
        if cli:
            print("\n* redis-cli --tls")
            out = subprocess.run(
                [cli, "--tls", "--cacert", ca, "-p", str(tls_port), "--user", "alice", "--pass", ALICE_PASSWORD,
                 "--no-auth-warning", "GET", "cache:greeting"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            print(f"  > redis-cli --tls GET cache:greeting   {out.stdout.strip() or out.stderr.strip()}")
        for x in (c, bad, cc):
            x.close()
        time.sleep(0.2)
        after = scrape(metrics_port)
        print(f"\n* metrics that changed (http://127.0.0.1:{metrics_port}/metrics)")
        for k, v in sorted(after.items()):
            if v != before.get(k, 0.0) and "bucket" not in k and not k.startswith("redisguard_upstream_connect_seconds"):
                print(f"  {k} {v:g}")
        print(f"\n* audit log: {d / 'redisguard.log'}")
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
