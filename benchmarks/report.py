"""The suite's Markdown report: the machine it ran on, and one table per measurement."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import HandshakeResult, IdleResult, Result

README_BEGIN = "<!-- suite:begin (written by benchmarks/suite.py) -->"
README_END = "<!-- suite:end -->"


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip() and "inetd" not in line]
    return lines[0].strip() if lines else "?"


def machine(repo: Path) -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    commit = _first_line(["git", "-C", str(repo), "describe", "--always", "--dirty"])
    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed"
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M %Z")),
        ("CPU", f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} logical cores "
                f"({len(os.sched_getaffinity(0))} usable)"),
        ("memory", f"{int(mem.group(1)) // 1024:,} MiB" if mem else "?"),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}, uvloop {uv}"),
        ("OpenSSL", f"{ssl.OPENSSL_VERSION} (Python); {_first_line(['openssl', 'version']).partition(' (')[0]} (system)"),
        ("Redis", f"{_first_line(['redis-server', '--version'])}; {_first_line(['redis-benchmark', '--version'])}"),
        ("stunnel", _first_line(["stunnel4", "-version"])),
        ("HAProxy", _first_line(["haproxy", "-v"])),
        ("redisguard", f"commit {commit}"),
    ]  # fmt: skip


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table; the first ``left`` columns are text, the rest numbers (right-aligned)."""
    align = ["---"] * left + ["---:"] * (len(headers) - left)
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]


def num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def cpu(us: float | None, digits: int = 1) -> str:
    return "—" if us is None else num(us, digits)


def ratio(x: float, ref: float | None) -> str:
    return f"{x / ref:.2f}×" if ref else "—"


@dataclass
class Report:
    """Everything one run measured, keyed by the targets' display names."""

    command: str
    params: str
    machine: list[tuple[str, str]]
    references: dict[str, str]  # column title ("stunnel") -> target name, for the ratio columns
    proxied: list[str]  # the redisguard targets: the rows that get ratios
    throughput: dict[str, dict[str, Result]] = field(default_factory=dict)  # workload -> target -> result
    denied_share: dict[str, dict[str, float]] = field(default_factory=dict)  # mixed workload -> target -> share
    users_scale: dict[str, Result] = field(default_factory=dict)
    acl: list[tuple[str, str, str, dict[str, float]]] = field(default_factory=list)
    idle: dict[str, IdleResult] = field(default_factory=dict)
    handshakes: dict[str, tuple[HandshakeResult, HandshakeResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        out = [f"## Side-by-side run, {self.machine[0][1]}", "", f"`{self.command}` ({self.params})", ""]
        out += table(["machine", ""], [[k, v] for k, v in self.machine[1:]], left=2)
        if self.notes:
            out += [f"- {n}" for n in self.notes] + [""]
        out += self._summary() + self._workloads() + self._users() + self._acl() + self._idle() + self._handshakes()
        return "\n".join(out).rstrip() + "\n"

    def _ratio_headers(self) -> list[str]:
        return [f"× {t}" for t in self.references]

    def _ratio_cells(self, name: str, value: float, figures: dict[str, float], higher_is_better: bool = True) -> list[str]:
        if name not in self.proxied:
            return ["" for _ in self.references]
        cells = []
        for ref in self.references.values():
            r = figures.get(ref)
            cells.append(ratio(value, r) if higher_is_better else ratio(r or 0.0, value) if r else "—")
        return cells

    def _summary(self) -> list[str]:
        if not self.throughput:
            return []
        workloads = list(self.throughput)
        names = list(dict.fromkeys(n for per in self.throughput.values() for n in per))
        rows = [[n, *(num(self.throughput[w][n].rps) if n in self.throughput[w] else "—" for w in workloads)] for n in names]
        for p in self.proxied:
            for title, ref in self.references.items():
                rows.append([f"{p} / {title}", *(ratio(self.throughput[w][p].rps, self.throughput[w].get(ref, Result(0, 0)).rps)
                                                  if p in self.throughput[w] else "—" for w in workloads)])  # fmt: skip
        return ["### Requests per second (redis-benchmark --tls -c 50)", "", *table(["target", *workloads], rows)]

    def _workloads(self) -> list[str]:
        out = []
        for w, per in self.throughput.items():
            figures = {n: r.rps for n, r in per.items()}
            shares = self.denied_share.get(w)
            headers = ["target", "rps" + (" (allowed)" if shares else ""), "p50 ms", "CPU µs / req"]
            headers += ["denied share"] if shares else []
            headers += self._ratio_headers()
            rows = []
            for n, r in per.items():
                row = [n, num(r.rps), num(r.p50_ms, 3), cpu(r.cpu_us)] + ([f"{shares[n]:.1%}"] if shares else [])
                rows.append(row + self._ratio_cells(n, r.rps, figures))
            out += [f"### {w}", "", *table(headers, rows)]
        return out

    def _users(self) -> list[str]:
        if not self.users_scale:
            return []
        first, base = next(iter(self.users_scale.items()))
        rows = [[n, num(r.rps), num(r.p50_ms, 3), cpu(r.cpu_us), ratio(r.rps, base.rps)] for n, r in self.users_scale.items()]
        return ["### redisguard with 10 vs 10,000 users (GET, P=16)", "",
                "The same user and workload; only the size of the users file changes.", "",
                *table(["users file", "rps", "p50 ms", "CPU µs / req", f"× {first}"], rows)]  # fmt: skip

    def _acl(self) -> list[str]:
        if not self.acl:
            return []
        cols = list(self.acl[0][3])
        rows = [[u, f"`{c}`", v, *(num(us[k], 2) for k in cols)] for u, c, v, us in self.acl]
        return ["### Cost of one ACL decision (µs, in process: benchmarks/acl_decision.py)", "",
                "`check`: the ACL rules alone; `decide`: the whole decision for a request off the fast path; "
                "`fast path`: the per-user precomputed decision an allowed request takes (for a denied one, "
                "the cost of handing it to `decide`).", "",
                *table(["user", "command", "verdict", *cols], rows, left=3)]  # fmt: skip

    def _idle(self) -> list[str]:
        if not self.idle:
            return []
        figures = {n: r.kib_per_conn for n, r in self.idle.items()}
        rows = [[n, num(r.connected), num(r.kib_per_conn, 1), num(r.setup_s, 1),
                 *self._ratio_cells(n, r.kib_per_conn, figures, higher_is_better=False)]
                for n, r in self.idle.items()]  # fmt: skip
        return ["### Memory per idle TLS connection", "",
                "Each connection did one round trip (AUTH + PING where the target enforces ACLs, so it holds its "
                "upstream connection as the plain proxies do) and then sits idle; RSS growth of the target's "
                "process(es) from /proc. Ratios: the reference's KiB over redisguard's (above 1× is leaner).", "",
                *table(["target", "connections", "KiB / conn", "set-up s", *self._ratio_headers()], rows)]  # fmt: skip

    def _handshakes(self) -> list[str]:
        if not self.handshakes:
            return []
        figures = {n: new.per_second for n, (new, _) in self.handshakes.items()}
        rows = [[n, num(new.per_second), cpu(new.cpu_us, 0), num(res.per_second), cpu(res.cpu_us, 0), f"{res.reused:.0%}",
                 *self._ratio_cells(n, new.per_second, figures)] for n, (new, res) in self.handshakes.items()]  # fmt: skip
        return ["### TLS handshakes per second", "",
                "Connect, handshake, PING, close, from 4 client threads on the same machine (so the rate is partly "
                "the client's; the target's CPU µs per connection is its own cost); \"resumed\" offers the session "
                "of the previous connection (a TLS 1.3 ticket). Ratios are for full handshakes per second.", "",
                *table(["target", "full / s", "CPU µs", "resumed / s", "CPU µs", "resumed share", *self._ratio_headers()],
                       rows)]  # fmt: skip


def update_readme(readme: Path, report: str) -> None:
    """Put ``report`` between the markers in ``readme`` (appended with them if they are missing)."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{README_BEGIN}\n{report}{README_END}"
    if README_BEGIN in text and README_END in text:
        head, _, rest = text.partition(README_BEGIN)
        text = head + block + rest.partition(README_END)[2]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
