"""With ``[server] workers``: the supervisor's ``/metrics`` and ``/readyz``, made of every worker's.

**An aggregating endpoint, not prometheus-client's multiprocess mode.** The supervisor serves the one
``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] address``; for ``/metrics`` it asks every worker
for its exposition over the private channel (:mod:`.worker_link`) and merges them (:mod:`.metrics_merge`:
counters and histograms summed, counting gauges summed, the others by min or max). Multiprocess mode was
not chosen because it changes the hot path and the metrics we have: every increment becomes a write into
a memory-mapped file, ``set_function`` gauges (descriptors accounted) are not supported, the
allowed-command tallies the observer flushes before a render would only be flushed in the process that
renders, and its files must be managed per pid. Aggregating keeps each worker's metrics exactly as in one
process (and ``workers = 1`` untouched), at the cost of one round trip per worker per scrape. The
supervisor adds ``redisguard_workers{state}`` (configured, running, ready) and
``redisguard_worker_restarts_total``, and counts the events of the whole instance that every worker
sees (a reload: ``redisguard_config_reload_total``, once per SIGHUP however many workers reloaded).
``/readyz`` is ready only when all N workers are up and each is
ready (its listeners, certificates, the upstream PING).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest

from redisguard.observe import metrics_merge
from redisguard.runtime.slots import Slot


class Aggregate:
    """Every worker's metrics and readiness, over the supervisor's ``slots`` (the same list)."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.n = len(slots)
        self.retired: metrics_merge.Families = {}  # counters of workers that exited
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.workers_gauge = Gauge("redisguard_workers", "Worker processes: configured ([server] workers), running "
                                   "(forked, not yet exited), ready (listeners up).", ["state"], registry=r)  # fmt: skip
        self.restarts = Counter("redisguard_worker_restarts", "Workers forked again after one exited unexpectedly.",
                                registry=r)  # fmt: skip
        self.reloads: dict[str, int] = {"success": 0, "failure": 0}  # each reload of the instance once
        self.outcomes: dict[int, bool] = {}  # the recent reloads' outcomes so far, by generation

    def reloaded(self, generation: int, ok: bool) -> None:
        """A worker's outcome of reload ``generation`` (ChangeStream.reload's number): each reload counted
        once, as the first worker to finish it says; a worker that then fails it counts it failed too,
        so a failure is never hidden by another worker's success."""
        before = self.outcomes.get(generation)
        if before is None or (before and not ok):
            self.reloads["success" if ok else "failure"] += 1
            self.outcomes[generation] = ok
            for old in [g for g in self.outcomes if g < generation - 64]:  # bounded: late answers only
                del self.outcomes[old]

    def retire(self, slot: Slot) -> None:
        """The worker in ``slot`` exited: its counters stay in the totals."""
        metrics_merge.retire(self.retired, slot.last)
        slot.last = {}

    async def render(self) -> bytes:
        answers = await asyncio.gather(*(s.ask({"op": "metrics"}) for s in self.slots))
        for slot, answer in zip(self.slots, answers, strict=True):
            if answer is not None:
                slot.last = metrics_merge.parse(answer["text"])
        merged = metrics_merge.merge([s.last for s in self.slots if s.pid], self.retired)
        metrics_merge.counted_once(merged, "redisguard_config_reload", self.reloads,
                                   "Reloads of users and certificates (SIGHUP).")  # fmt: skip
        self.workers_gauge.labels("configured").set(self.n)
        self.workers_gauge.labels("running").set(sum(1 for s in self.slots if s.pid))
        self.workers_gauge.labels("ready").set(sum(1 for s in self.slots if s.up))
        return metrics_merge.render(merged) + generate_latest(self.registry)

    async def ready(self) -> tuple[bool, str]:
        up = sum(1 for s in self.slots if s.up)
        if up < self.n:
            return False, f"{up} of {self.n} workers up"
        answers = await asyncio.gather(*(s.ask({"op": "ready"}) for s in self.slots))
        whys = []
        for slot, answer in zip(self.slots, answers, strict=True):
            if answer is None or not answer["ok"]:
                return False, f"worker {slot.index}: {answer['why'] if answer else 'did not answer'}"
            whys.append(answer["why"])
        return True, f"{whys[0]}; {self.n} workers"
