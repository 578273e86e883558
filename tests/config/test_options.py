"""The config is declared once (redisguard/config/options.py): the sample config, the docs' option
table and the dataclass defaults are checked against the declarations."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from redisguard.config.model import LimitsConfig, LogConfig, ProfileConfig, ServerConfig
from redisguard.config.options import REQUIRED, TABLES, reference_markdown, toml_value
from redisguard.config.parse import parse_config

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "config" / "redisguard.toml"


def sample_lines() -> dict[tuple[str, str], str]:
    """``(table, key) -> value text`` for each option line of the sample config: "#value" for a commented
    line that shows the default, "value" for a set value or an example (whose comment names the default)."""
    table = ""
    out: dict[tuple[str, str], str] = {}
    for line in SAMPLE.read_text().splitlines():
        if m := re.match(r"#?\s*\[\[?(\w+)\]\]?\s*$", line):
            table = m.group(1)
        elif m := re.match(r"(#?)\s*([a-z_]+) = (.*?)(\s+#.*)?$", line):
            example = "default" in (m.group(4) or "")  # an example value; the comment names the default
            out.setdefault((table, m.group(2)), ("" if example else "#" if m.group(1) else "") + m.group(3))
    return out


def test_the_sample_config_shows_every_option_with_its_real_default() -> None:
    shown = sample_lines()
    missing = [f"[{t}] {o.key}" for t, opts in TABLES.items() for o in opts if (t, o.key) not in shown]
    assert not missing, f"config/redisguard.toml does not show: {', '.join(missing)}"
    unknown = [f"[{t}] {k}" for t, k in shown if not any(o.key == k for o in TABLES.get(t, ()))]
    assert not unknown, f"config/redisguard.toml shows options that are not declared: {unknown}"
    for t, opts in TABLES.items():
        for o in opts:
            text = shown[(t, o.key)]
            if text.startswith("#") and o.default not in (None, REQUIRED) and not isinstance(o.default, (list, dict)):
                # a commented line is the default: it must say the real one
                assert tomllib.loads(f"v = {text[1:]}")["v"] == o.default, (t, o.key, text, toml_value(o.default))


def test_the_docs_option_table_is_made_from_the_declarations() -> None:
    assert (REPO / "docs" / "configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is out of date: python -m redisguard.config.options > docs/configuration.md")


@pytest.mark.parametrize("table, cls", [("limits", LimitsConfig), ("log", LogConfig), ("profile", ProfileConfig),
                                        ("server", ServerConfig)])  # fmt: skip
def test_defaults_are_the_declared_ones(tmp_path: Path, table: str, cls: type) -> None:
    """An empty table parses to the dataclass's defaults, and both are the declared defaults."""
    base = {"listener": [{"type": "tcp", "address": "127.0.0.1:1"}], "acl": {"users_file": "u.acl"}}
    cfg = parse_config({**base, table: {}}, tmp_path)
    assert getattr(cfg, table) == cls()
    declared = {o.key: o.default for o in TABLES[table]}
    for f in fields(cls):
        assert getattr(cls(), f.name) == declared[f.name], (table, f.name)


# Declared options the parsed config holds in another shape (or not at all: secrets are read, not kept).
DERIVED = {("upstream", "address"), ("upstream", "password_file"), ("upstream", "password_env"), ("acl", "users_file"),
           ("metrics", "address"), ("listener", "name"), ("listener", "type"), ("listener", "address"),
           ("listener", "socket_mode")}  # fmt: skip


def test_every_other_table_parses_to_its_declared_defaults(tmp_path: Path) -> None:
    """[upstream], [acl] and [metrics] given nothing but what is required hold the declared defaults (None:
    not set, also as ""); the derived ones in their own shape."""
    base = {"listener": [{"type": "tls", "address": "127.0.0.1:1", "cert_file": "c.pem", "key_file": "k.pem"}],
            "acl": {"users_file": "u.acl"}}  # fmt: skip
    cfg = parse_config(base, tmp_path)
    for table, obj in (("upstream", cfg.upstream), ("acl", cfg.acl), ("metrics", cfg.metrics)):
        names = {f.name for f in fields(obj)}
        for o in TABLES[table]:
            if (table, o.key) in DERIVED:
                continue
            assert o.key in names, (table, o.key)
            value = getattr(obj, o.key)
            value = list(value) if isinstance(value, (tuple, list, frozenset)) and isinstance(o.default, list) else value
            value = dict(value) if isinstance(o.default, dict) else value
            assert value == o.default or (o.default is None and value in (None, "")), (table, o.key, value, o.default)
    assert (cfg.upstream.host, cfg.upstream.port) == ("127.0.0.1", 6379) and (cfg.metrics.host, cfg.metrics.port) == (
        "127.0.0.1", 9187)  # fmt: skip
