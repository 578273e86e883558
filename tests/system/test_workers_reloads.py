"""``[server] workers = 2``: a reload is one event of the instance, counted and logged as one.

One SIGHUP reloads both workers; ``redisguard_config_reload_total`` counts it once (the supervisor counts
each reload, the merge of the workers' metrics does not sum that counter), and ``users_changed`` names
the users that changed rather than "all"."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard.observe import metrics_merge
from redisguard.runtime.aggregate import Aggregate
from tests.helpers import USERS_ACL, ProxyProc, RedisProc, start_proxy
from tests.system.test_workers import WORKERS, http, log_lines, login, metrics, served_by, unix_listener, wait_for

SUCCESS = 'redisguard_config_reload_total{result="success"}'
FAILURE = 'redisguard_config_reload_total{result="failure"}'


@pytest.fixture(scope="module")
def pair_of_workers(tmp_path_factory: pytest.TempPathFactory, certs: Path, redis_server: RedisProc
                    ) -> Iterator[tuple[ProxyProc, Path]]:  # fmt: skip
    d = tmp_path_factory.mktemp("reloads")
    sockdir = Path(tempfile.mkdtemp(prefix="rgr", dir="/tmp"))  # unix socket paths must stay short
    users = d / "users.acl"
    users.write_text(USERS_ACL)
    p = start_proxy(d, certs, users, redis_server.port, disabled="[]", extra=WORKERS + unix_listener(sockdir / "rg.sock"))
    try:
        wait_for(lambda: http(p, "/readyz")[0] == 200)
        yield p, users
    finally:
        p.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def events(p: ProxyProc, event: str, since: int) -> list[dict[str, object]]:
    return [e for line in log_lines(p)[since:] if line.startswith("{") and (e := json.loads(line))["event"] == event]


def test_one_sighup_counts_one_reload_and_logs_the_one_user_changed(pair_of_workers: tuple[ProxyProc, Path]) -> None:
    p, users = pair_of_workers
    before = metrics(p)
    users.write_text(USERS_ACL.replace(">alice-pw", ">alice-new-pw"))  # one password rotated
    since = len(log_lines(p))
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_by(p, "config_reloaded", since) == {0, 1})
    wait_for(lambda: metrics(p).get(SUCCESS, 0) > before.get(SUCCESS, 0))
    m = metrics(p)
    assert m[SUCCESS] - before.get(SUCCESS, 0) == 1  # not 2: one reload of the instance
    assert m.get(FAILURE, 0) == before.get(FAILURE, 0)
    changed = events(p, "users_changed", since)
    assert len(changed) == 2  # one line per worker, each naming the one user
    assert all(e["changed"] == ["alice"] and e["changed_count"] == 1 and e["deleted"] == [] for e in changed), changed
    assert login(p, "alice", "alice-new-pw")

    # A reload refused (a duplicate user): one failure, the operator's message names path:line.
    users.write_text(USERS_ACL + "user bob on >x\n")
    since = len(log_lines(p))
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_by(p, "config_reload_failed", since) == {0, 1})
    wait_for(lambda: metrics(p).get(FAILURE, 0) > before.get(FAILURE, 0))
    m = metrics(p)
    assert m[FAILURE] - before.get(FAILURE, 0) == 1 and m[SUCCESS] - before.get(SUCCESS, 0) == 1
    assert m["redisguard_config_last_reload_successful"] == 0
    (failed, _) = events(p, "config_reload_failed", since)
    assert f"{users}:8: duplicate user 'bob' (first defined on line 4)." in str(failed["error"])
    assert "WARNING" not in str(failed["error"])
    users.write_text(USERS_ACL)
    since = len(log_lines(p))
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served_by(p, "config_reloaded", since) == {0, 1})


def test_the_supervisor_counts_each_reload_once() -> None:
    agg = Aggregate([])
    agg.reloaded(1, True)
    agg.reloaded(1, True)  # the second worker: the same reload
    agg.reloaded(2, False)
    agg.reloaded(2, False)
    agg.reloaded(3, True)
    agg.reloaded(3, False)  # one worker refused what the other took: never hidden
    assert agg.reloads == {"success": 2, "failure": 2}
    summed = metrics_merge.merge([metrics_merge.parse(t) for t in (
        "# TYPE redisguard_config_reload counter\nredisguard_config_reload_total{result=\"success\"} 3\n"
        "redisguard_config_reload_total{result=\"unsettled\"} 4\n",
        "# TYPE redisguard_config_reload counter\nredisguard_config_reload_total{result=\"success\"} 3\n",
    )])  # fmt: skip
    metrics_merge.counted_once(summed, "redisguard_config_reload", agg.reloads)
    text = metrics_merge.render(summed).decode()
    assert 'redisguard_config_reload_total{result="success"} 2.0' in text
    assert 'redisguard_config_reload_total{result="failure"} 2.0' in text
    assert 'redisguard_config_reload_total{result="unsettled"} 4.0' in text  # only the first worker watches files
