"""The benchmark suite's building blocks, at toy sizes: targets start and stop, each measurement runs
against a real redis-server through real TLS, and the report renders. No timing assertions (the
figures of such tiny runs mean nothing); benchmarks/suite.py is the benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

from redisguard.cli.certs import init_dev_certs

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.measure import Workload, benchmark, handshakes, idle_memory, mixed  # noqa: E402
from benchmarks.report import README_BEGIN, README_END, Report, machine, update_readme  # noqa: E402
from benchmarks.targets import REPO, Processes, start_redis, start_redisguard, start_relay, workers_supported  # noqa: E402


def test_suite_building_blocks(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_dev_certs(certs)
    ca = certs / "ca.pem"
    ps = Processes(tmp_path)
    try:
        plain, _ = start_redis(ps, certs)
        relay = start_relay(ps, certs, plain.port)
        guard = start_redisguard(ps, certs, plain.port, "redisguard", users=50)
        report = Report("suite.py (smoke test)", "toy sizes", machine(REPO), {"relay": relay.name}, [guard.name])
        get = Workload("GET P=1", 1, tests="get")
        for t in (plain, relay, guard):
            report.throughput.setdefault(get.label, {})[t.name] = r = benchmark(t, ca, get, 300)
            assert r.rps > 0 and r.cpu_us is not None
        m = mixed(guard, ca, 4, 400, allowed_rps=report.throughput[get.label][guard.name].rps)
        assert m.allowed.rps > 0 and 0 <= m.denied_share < 1
        report.throughput["mix"] = {guard.name: m.allowed}
        report.denied_share["mix"] = {guard.name: m.denied_share}
        for t in (relay, guard):
            report.idle[t.name] = idle_memory(t, ca, 10)
            report.handshakes[t.name] = (handshakes(t, ca, 0.3, resume=False, threads=2),
                                         handshakes(t, ca, 0.3, resume=True, threads=2))  # fmt: skip
            assert report.handshakes[t.name][0].reused == 0
        assert isinstance(workers_supported(tmp_path, certs), str | None)
    finally:
        started = list(ps.procs)
        ps.stop_all()
    assert all(p.poll() is not None for p in started)

    text = report.render()
    assert "| redisguard | " in text and "× relay" in text and "### Memory per idle TLS connection" in text
    readme = tmp_path / "README.md"
    readme.write_text("# benchmarks\n\nexplanations\n")
    update_readme(readme, text)
    update_readme(readme, text.replace("smoke test", "again"))  # replaces the block, keeps the rest
    out = readme.read_text()
    assert out.startswith("# benchmarks\n\nexplanations\n") and out.count(README_BEGIN) == out.count(README_END) == 1
    assert "again" in out and "smoke test" not in out
