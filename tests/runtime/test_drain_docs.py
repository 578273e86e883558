"""The drain's numbers as the docs and the shipped examples give them are the code's: [server]
drain_timeout's default, the supervisor's kill margin, and service-manager grace periods longer than both."""

from __future__ import annotations

import re
from pathlib import Path

from redisguard.config.options import default
from redisguard.runtime.supervisor import STOP_MARGIN

REPO = Path(__file__).resolve().parents[2]
DRAIN = default("server", "drain_timeout")
KILL = DRAIN + STOP_MARGIN  # with workers: SIGKILL for a worker still running this long after the signal


def read(path: str) -> str:
    return (REPO / path).read_text()


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_readme_says_what_the_code_does() -> None:
    readme = flat(read("README.md"))
    assert f"drain_timeout = {DRAIN:g} " in readme
    assert f"up to `[server] drain_timeout`, {DRAIN:g} s by default; a worker still running {STOP_MARGIN:g} s after " \
           f"that, {KILL:g} s after the signal, is killed" in readme  # fmt: skip
    assert f"at the latest {DRAIN:g} s after the signal by default" in readme
    assert f"`drain_timeout` + {STOP_MARGIN:g} s after it, {KILL:g} s by default" in readme
    for stale in ("5 s for clients", "killed after 15 s"):
        assert stale not in readme


def test_the_supervisor_and_the_sample_config_agree() -> None:
    src = flat(read("redisguard/runtime/supervisor.py"))
    assert f"workers still there {STOP_MARGIN:g} s later are killed" in src
    assert f"still running after drain_timeout + {STOP_MARGIN:g} s" in src
    assert f"# drain_timeout = {DRAIN!r} " in read("config/redisguard.toml")


def test_the_examples_give_the_drain_its_time() -> None:
    dockerfile = read("Dockerfile")
    assert f"up to [server] drain_timeout, {DRAIN:g} s by default" in flat(dockerfile)
    grace = {
        "systemd": re.search(r"^TimeoutStopSec=(\d+)$", read("config/examples/systemd/redisguard.service"), re.M),
        "compose": re.search(r"^\s+stop_grace_period: (\d+)s\b", read("config/examples/compose.yaml"), re.M),
        "kubernetes": re.search(r"^\s+terminationGracePeriodSeconds: (\d+)\b",
                                read("config/examples/kubernetes-sidecar.yaml"), re.M),
        "docker stop": re.search(r"docker stop -t (\d+)", dockerfile),
    }  # fmt: skip
    for where, m in grace.items():
        assert m, f"{where}: no grace period given"
        assert int(m.group(1)) > KILL, f"{where}: {m.group(1)} s does not outlast the drain ({KILL:g} s)"
    assert f"the examples use {int(grace['systemd'].group(1))} s" in flat(read("README.md"))  # type: ignore[union-attr]
