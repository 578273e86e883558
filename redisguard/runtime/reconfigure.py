"""SIGHUP and the config file: what changed, what is applied at once, what needs a restart.

A reload always re-reads the users file and the certificates. It also re-reads the TOML (an invalid
file fails the whole reload, so a broken config is noticed before the next restart), compares the
new :class:`~redisguard.config.model.Config` with the running one, applies the settings that are safe to
change live (:data:`LIVE`), and logs the names — never the values, some are secrets — of the
changed settings that take effect only after a restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from redisguard.config.load import load_config
from redisguard.config.model import Config
from redisguard.observe.audit import configure_logging, get_logger
from redisguard.transport.tls import OPENSSL

log = get_logger("redisguard")

# Settings a reload applies to the running proxy.
LIVE = ("log.level", "log.format", "log.audit_keys", "acl.disabled_commands")
# Dataclass fields that are one config key (host + port are "address"), or none (where it was read from).
# (resolved_identity: what identity = "auto" became at start; a re-read file has not resolved it.)
_KEY = {"host": "address", "port": "address", "tls": "", "tls_policy": "", "source": None, "resolved_identity": None}


def changed_settings(old: Config, new: Config) -> list[str]:
    """The config keys whose values differ, e.g. ``["listener[0].address", "limits.idle_timeout"]``."""
    out: list[str] = []
    _diff(old, new, "", out)
    return list(dict.fromkeys(out))


def _diff(a: Any, b: Any, prefix: str, out: list[str]) -> None:
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in dataclasses.fields(a):
            key = _KEY.get(f.name, f.name)
            if key is not None:
                _diff(getattr(a, f.name), getattr(b, f.name), ".".join(p for p in (prefix, key) if p), out)
    elif prefix == "listeners" and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"listener[{i}]", out)
    elif a != b:
        out.append("listener" if prefix == "listeners" else prefix)


@dataclass
class Reconfiguration:
    new: Config | None  # None: the running config was not read from a file
    changed: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [k for k in self.changed if k in LIVE]

    @property
    def restart(self) -> list[str]:
        return [k for k in self.changed if k not in LIVE]

    def merged(self, old: Config) -> Config:
        """The running config with the live settings of the new file (the others stay until restart)."""
        new = self.new
        if new is None or not self.changed:
            return old
        return dataclasses.replace(
            old, acl=dataclasses.replace(old.acl, disabled_commands=new.acl.disabled_commands),
            log=dataclasses.replace(old.log, level=new.log.level, format=new.log.format, audit_keys=new.log.audit_keys),
        )  # fmt: skip

    def log(self) -> None:
        """On the event loop, once the reload is in force: logging as configured, and what waits for a restart."""
        new = self.new
        if new is None or not self.changed:
            return
        configure_logging(new.log.format, new.log.level)
        if self.restart:
            log.warning("config_restart_required", settings=self.restart, applied=self.applied,
                        detail="these settings changed in the config file; they take effect when redisguard "
                        "restarts (the running values stay until then)")  # fmt: skip


def reread(running: Config, text: bytes | None = None) -> Reconfiguration:
    """Read the running config's file again (in a worker thread; ``text``: its bytes as the reload read
    and checked them); ConfigError if it is invalid now."""
    if running.source is None:
        return Reconfiguration(None)
    new = load_config(running.source, text, tls=OPENSSL)
    return Reconfiguration(new, changed_settings(running, new))
