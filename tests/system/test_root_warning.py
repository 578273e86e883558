"""A warning at start-up and in check-config when redisguard runs as root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from redisguard.cli.preflight import root_warning
from tests.helpers import ProxyProc


def test_root_warning_text() -> None:
    assert root_warning(1000) is None
    warning = root_warning(0) or ""
    assert warning.startswith("running as root (uid 0)") and "CAP_NET_BIND_SERVICE" in warning


def test_check_config_and_serve_warn_as_root(proxy: ProxyProc, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "redisguard", "check-config", "--skip-bind", "-c", str(proxy.config)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    as_root = os.geteuid() == 0
    assert ("warning: running as root (uid 0)" in res.stderr) == as_root, res.stderr
    assert ('"event": "running_as_root"' in proxy.log.read_text()) == as_root
    if as_root:  # and not as another user (the config and its files are readable by all here)
        nobody = subprocess.run([sys.executable, "-c", "import os, sys; from redisguard.cli.preflight import root_warning; "
                                 "os.setuid(65534); sys.exit(root_warning() is not None)"], timeout=60)  # fmt: skip
        assert nobody.returncode == 0
