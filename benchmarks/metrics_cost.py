"""What per-request metrics cost, without network noise: `python benchmarks/metrics_cost.py`.

Drives the session state machine (parse, decide, count, re-frame replies) with pipelines of GETs and
their replies, once with the Prometheus observer counting and once with counting off, and reports
the time per request. Run-to-run noise here is ~1-2%, far below redis-benchmark's on 2 cores."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisguard.acl import parse_users  # noqa: E402
from redisguard.commands.table import CommandTable  # noqa: E402
from redisguard.observe.events import Observer  # noqa: E402
from redisguard.observe.metrics import Metrics  # noqa: E402
from redisguard.policy.decide import Policy, Shared  # noqa: E402
from redisguard.protocol.resp import encode_command  # noqa: E402
from redisguard.session.machine import Session  # noqa: E402


def per_request_us(count: bool, rounds: int = 2000, depth: int = 50) -> float:
    table = CommandTable.snapshot()
    users = parse_users("user default off\nuser app on >pw ~cache:* +@all -@dangerous\n", table)
    s = Session(Shared(Policy(table, users), Observer(Metrics(), users, count=count)), "tls", "127.0.0.1:1")
    s.client_data(encode_command([b"AUTH", b"app", b"pw"]))
    requests = b"".join(encode_command([b"GET", b"cache:%d" % i]) for i in range(depth))
    replies = b"$5\r\nhello\r\n" * depth
    start = time.perf_counter()
    for _ in range(rounds):
        s.client_data(requests)
        s.upstream_data(replies)
        s.to_client.clear()
        s.to_upstream.clear()
    return (time.perf_counter() - start) / (rounds * depth) * 1e6


def main() -> None:
    from redisguard.observe.audit import configure_logging

    configure_logging("json", "warning")
    results = {True: [], False: []}  # type: dict[bool, list[float]]
    for _ in range(5):
        for count in (True, False):
            results[count].append(per_request_us(count))
    on, off = min(results[True]), min(results[False])
    print(f"session cost per pipelined GET: metrics on {on:.2f} µs, off {off:.2f} µs -> metrics add {on - off:.2f} µs "
          f"({(on - off) / on * 100:.1f}% of the proxy's per-request CPU)")


if __name__ == "__main__":
    main()
