"""One /metrics for several worker processes: their text expositions parsed and merged.

Each worker keeps its own in-process registry (:class:`~redisguard.observe.metrics.Metrics`, unchanged from a
single process: plain counters, ``set_function`` gauges, the allowed-command tallies flushed before a
render). The supervisor asks every worker for its exposition and merges them here, family by family:

- counters and histograms are summed (buckets, ``_count`` and ``_sum`` alike); the last values seen
  from a worker that exited are kept in a "retired" set and added too, so a merged counter never goes
  backwards when a worker is restarted (what it counted after its last scrape is lost);
- counters that every worker counts of the same thing (the upstream's outages, seen by each worker's
  health check) take the largest, a retired worker's included: :data:`COUNTER_MAX` (monotonic too: what
  a restarted worker counts shows once it passes the largest seen);
- gauges that count things (connections, pending handshakes, ...) are summed; the others take the
  value that is right for the whole: :data:`GAUGE_RULES`;
- counters of events of the whole instance that every worker sees, and counts, once each (one SIGHUP
  is one reload of every worker) are not summed: :data:`PER_INSTANCE` names them, the supervisor
  counts each event once and :func:`counted_once` puts its counts in their place.

Pure: no I/O, text in, text out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges that are not summed across workers. Everything else is.
GAUGE_RULES: dict[str, Callable[[Iterable[float]], float]] = {
    "redisguard_upstream_up": min,  # down if any worker cannot reach Redis
    "redisguard_config_last_reload_successful": min,  # 0 if any worker's last reload failed
    "redisguard_certificate_expiry_timestamp_seconds": min,  # the soonest, should workers disagree
    "redisguard_build_info": max,
    "redisguard_policy_info": max,  # 1 per digest; workers differ only while a change reaches them all
    "redisguard_file_descriptors_limit": max,  # a per-process limit: the busiest worker's headroom matters
    "redisguard_file_descriptors_accounted": max,
}
SUMMED = ("counter", "histogram", "summary")
# Counters (family names, without _total) each worker counts of the one upstream: the largest, not the sum.
COUNTER_MAX = frozenset({"redisguard_upstream_transitions", "redisguard_upstream_down_seconds"})

# Counters of instance events, by family: the label, and its values the supervisor counts (others, such
# as a reload's result="unsettled" that only the first worker's file watch counts, are summed as usual).
PER_INSTANCE: dict[str, tuple[str, tuple[str, ...]]] = {
    "redisguard_config_reload": ("result", ("success", "failure")),
}

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, labels in the order written)


@dataclass
class Family:
    name: str
    documentation: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)


Families = dict[str, Family]


def parse(text: str) -> Families:
    """A text exposition as families of samples."""
    out: Families = {}
    for fam in text_string_to_metric_families(text):
        f = out[fam.name] = Family(fam.name, fam.documentation, fam.type)
        for s in fam.samples:
            f.samples[(s.name, tuple(s.labels.items()))] = s.value
    return out


def retire(retired: Families, last: Families) -> None:
    """A worker exited: keep the counters and histograms of its last scrape (added to every merge)."""
    for name, fam in last.items():
        if fam.type not in SUMMED:
            continue
        into = retired.setdefault(name, Family(name, fam.documentation, fam.type))
        for key, value in fam.samples.items():
            before = into.samples.get(key, 0.0)
            into.samples[key] = max(before, value) if name in COUNTER_MAX else before + value


def merge(scrapes: Sequence[Families], retired: Families | None = None) -> Families:
    """The workers' families as one: see the module docstring for the rules."""
    values: dict[str, dict[SampleKey, list[float]]] = {}
    meta: Families = {}
    for fams in [*scrapes, retired or {}]:
        for name, fam in fams.items():
            meta.setdefault(name, Family(name, fam.documentation, fam.type))
            per = values.setdefault(name, {})
            for key, value in fam.samples.items():
                per.setdefault(key, []).append(value)
    for name, fam in meta.items():
        rule = max if name in COUNTER_MAX else sum if fam.type in SUMMED else GAUGE_RULES.get(name, sum)
        fam.samples = {key: float(rule(vals)) for key, vals in values[name].items()}
    return meta


def render(families: Families) -> bytes:
    """Families in the Prometheus text format (prometheus-client's own writer)."""
    metrics = []
    for fam in families.values():
        m = Metric(fam.name, fam.documentation, fam.type)
        for (sample, labels), value in fam.samples.items():
            m.add_sample(sample, dict(labels), value)
        metrics.append(m)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def counted_once(families: Families, name: str, counts: Mapping[str, float], documentation: str = "") -> None:
    """The samples of :data:`PER_INSTANCE` family ``name`` the workers counted each (summed by
    :func:`merge`) replaced by ``counts``, the supervisor's, by label value."""
    label, values = PER_INSTANCE[name]
    fam = families.setdefault(name, Family(name, documentation, "counter"))
    for value in values:
        fam.samples[(f"{name}_total", ((label, value),))] = float(counts.get(value, 0))

