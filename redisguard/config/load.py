"""Reading a config file: the TOML, the secret files and the environment, then the pure parse."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from redisguard.config.model import Config, ConfigError
from redisguard.config.parse import TLSSupport, parse_config


class LocalSecrets:
    """Secrets from this machine: ``password_file`` from the file system, ``password_env`` from the environment."""

    def read_file(self, path: Path) -> str:
        return path.read_text()

    def env(self, name: str) -> str | None:
        return os.environ.get(name)


def load_config(path: str | os.PathLike[str], text: bytes | None = None, tls: TLSSupport | None = None) -> Config:
    """The config file at ``path``; ``text``: its bytes as already read (a reload parses what it checked);
    ``tls``: as in :func:`~.parse.parse_config` (serve and check-config pass OpenSSL's)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text() if text is None else text.decode())
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse_config(data, p.resolve().parent, p, tls, LocalSecrets(), os.cpu_count() or 1)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
