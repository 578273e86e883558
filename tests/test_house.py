"""The house rule (ARCHITECTURE.md), read from the files as they are: no module of redisguard/ or tests/
over 400 lines, no class over 250, and nothing at the top of redisguard/ but its version (__init__.py)
and its entry point (__main__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_LINES = 400
CLASS_LINES = 250
TOP = {"__init__.py", "__main__.py"}
MODULE_SUFFIXES = {".py", ".pyi", ".so", ".pyd"}  # what Python would import as a module


def modules() -> list[Path]:
    return sorted(p for top in ("redisguard", "tests") for p in (ROOT / top).rglob("*.py"))


def name(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_no_module_is_over_400_lines() -> None:
    sizes = {name(p): len(p.read_text().splitlines()) for p in modules()}
    over = {m: n for m, n in sizes.items() if n > MODULE_LINES}
    assert len(sizes) > 100  # (the walk found the tree)
    assert not over, f"modules over {MODULE_LINES} lines: {over}"


def test_no_class_is_over_250_lines() -> None:
    over = {}
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ClassDef):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                assert node.end_lineno is not None
                if (n := node.end_lineno - start + 1) > CLASS_LINES:
                    over[f"{name(p)}:{node.lineno} {node.name}"] = n
    assert not over, f"classes over {CLASS_LINES} lines: {over}"


def test_redisguard_has_no_top_level_modules_but_its_version_and_entry_point() -> None:
    top = {p.name for p in (ROOT / "redisguard").iterdir() if p.is_file() and p.suffix in MODULE_SUFFIXES}
    assert top == TOP, f"{sorted(top - TOP)}: modules belong in a package of redisguard/ (ARCHITECTURE.md: the layers)"
