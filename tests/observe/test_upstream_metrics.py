"""redisguard_upstream_up's companions: the transitions and the downtime, counted between scrapes, and
merged across workers as the largest (each worker sees the same Redis)."""

from __future__ import annotations

import pytest

from redisguard.observe import metrics_merge
from redisguard.observe.metrics import Metrics, parse_samples


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("redisguard.observe.metrics.time.monotonic", c)
    return c


def samples(m: Metrics) -> dict[str, float]:
    return parse_samples(m.render().decode())


def test_flaps_and_downtime_between_scrapes_are_counted(clock: Clock) -> None:
    m = Metrics()
    s = samples(m)
    assert s['redisguard_upstream_transitions_total{to="down"}'] == 0 == s['redisguard_upstream_transitions_total{to="up"}']
    assert s["redisguard_upstream_down_seconds_total"] == 0
    m.upstream_up.set(1)  # the first value is no transition
    clock.now += 5
    m.upstream_up.set(1)
    for _ in range(3):  # three 2-second outages, all between two scrapes
        clock.now += 1
        m.upstream_up.set(0)
        clock.now += 1
        m.upstream_up.set(0)  # still down: no transition
        clock.now += 1
        m.upstream_up.set(1)
    s = samples(m)
    assert s["redisguard_upstream_up"] == 1
    assert s['redisguard_upstream_transitions_total{to="down"}'] == 3 == s['redisguard_upstream_transitions_total{to="up"}']
    assert s["redisguard_upstream_down_seconds_total"] == pytest.approx(6)


def test_an_outage_still_going_on_counts_at_each_scrape(clock: Clock) -> None:
    m = Metrics()
    m.upstream_up.set(0)  # down from the first check: no transition, but downtime
    clock.now += 7
    assert samples(m)["redisguard_upstream_down_seconds_total"] == pytest.approx(7)
    clock.now += 13
    s = samples(m)
    assert s["redisguard_upstream_down_seconds_total"] == pytest.approx(20)
    assert s['redisguard_upstream_transitions_total{to="down"}'] == 0
    clock.now += 1
    m.upstream_up.set(1)
    clock.now += 30
    s = samples(m)
    assert s["redisguard_upstream_down_seconds_total"] == pytest.approx(21)
    assert s['redisguard_upstream_transitions_total{to="up"}'] == 1


def test_workers_merge_to_the_largest_and_never_go_back(clock: Clock) -> None:
    a, b = Metrics(), Metrics()
    for m, flaps in ((a, 2), (b, 3)):
        m.upstream_up.set(1)
        for _ in range(flaps):
            m.upstream_up.set(0)
            clock.now += 1
            m.upstream_up.set(1)
    fams = [metrics_merge.parse(m.render().decode()) for m in (a, b)]
    merged = parse_samples(metrics_merge.render(metrics_merge.merge(fams)).decode())
    assert merged['redisguard_upstream_transitions_total{to="down"}'] == 3  # not 5: one Redis, seen by both
    assert merged["redisguard_upstream_down_seconds_total"] == pytest.approx(3)
    retired: metrics_merge.Families = {}
    metrics_merge.retire(retired, fams[1])  # b (the larger) exited, a new worker starts from 0
    fresh = metrics_merge.parse(Metrics().render().decode())
    merged = parse_samples(metrics_merge.render(metrics_merge.merge([fams[0], fresh], retired)).decode())
    assert merged['redisguard_upstream_transitions_total{to="down"}'] == 3
    metrics_merge.retire(retired, fams[0])
    assert retired["redisguard_upstream_transitions"].samples[("redisguard_upstream_transitions_total", (("to", "down"),))] == 3
