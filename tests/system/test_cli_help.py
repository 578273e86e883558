"""Every ``redisguard`` command's ``--help`` is a manual page: a description, help on every option, and
an example; and ``acl check`` says when the user it allowed cannot log in at all."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from redisguard.cli import main as cli_main
from redisguard.cli.usage import MANUAL


def parsers() -> Iterator[argparse.ArgumentParser]:
    """The top-level parser and every (sub)command's, as main() builds them."""
    built: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *a: object, **kw: object) -> argparse.Namespace:
        built.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[assignment,method-assign]
    try:
        with pytest.raises(SystemExit):
            cli_main.main([])
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
    todo = list(built)
    while todo:
        p = todo.pop()
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


ALL = {p.prog: p for p in parsers()}


def test_every_command_is_listed() -> None:
    assert set(ALL) == {f"redisguard {c}".strip() for c in MANUAL}
    assert len(ALL) >= 14


@pytest.mark.parametrize("prog", sorted(ALL))
def test_help_is_a_manual_page(prog: str) -> None:
    p = ALL[prog]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = out.getvalue()
    assert p.description and len(p.description) > 80, prog
    assert "\nexample:\n  " in text, prog
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, (prog, choice.dest)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            assert action.help and action.help != argparse.SUPPRESS, (prog, action.dest)
    example = text.split("\nexample:\n", 1)[1]
    assert prog in example, (prog, example)  # an example of this very command


def test_acl_help_lists_every_acl_command() -> None:
    assert all(c in (ALL["redisguard acl"].description or "") for c in ("check", "hash", "suggest", "diff", "test"))


def test_acl_check_says_an_off_user_cannot_log_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.acl"
    users.write_text("user default off\nuser app off >pw ~* +@all\nuser web on >pw ~* +@all\n")
    assert cli_main.main(["acl", "check", "--users", str(users), "--user", "app", "--", "GET", "k"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("allowed: user 'app' may run get; but user 'app' is off: it cannot log in"), out
    assert cli_main.main(["acl", "check", "--users", str(users), "--user", "web", "--", "GET", "k"]) == 0
    assert "off" not in capsys.readouterr().out
