"""Every command's help lists its flags bare (no `<bool>`), and shell completion goes through the entry point."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import typer
from typer._click import Command, Context
from typer.core import TyperGroup
from typer.testing import CliRunner

from sagactl.app import _OPTIONAL_COMMANDS, app
from sagactl.completion import complete_status

ENTRY = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]


def _commands() -> list[list[str]]:
    """The path of every command and group of the app, the root's groups walked too."""
    root = typer.main.get_command(app)
    found: list[list[str]] = []

    def walk(command: Command, path: list[str]) -> None:
        found.append(path)
        if isinstance(command, TyperGroup):
            ctx = Context(command, info_name=path[-1] if path else "saga")
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not (path == [] and name in _OPTIONAL_COMMANDS):
                    walk(sub, [*path, name])

    walk(root, [])
    # The optional commands are listed by stand-ins: invoked, the real ones load (when their package is here).
    optional = [[name] for name, command in _OPTIONAL_COMMANDS.items() if importlib.util.find_spec(command.package)]
    return found[1:] + optional  # the root's help is sagactl.roothelp's own text


@pytest.mark.parametrize("path", _commands(), ids=lambda path: " ".join(path))
def test_a_flag_is_listed_without_a_type(path: list[str]) -> None:
    shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "<bool>" not in shown.stdout, shown.stdout
    assert "--help" in shown.stdout
    # Options that take a value keep their type.
    if path == ["ls"]:
        assert "--json " in shown.stdout and "<int range>" in shown.stdout


def test_status_words_complete_after_commas() -> None:
    def values(incomplete: str) -> list[str]:
        return [value for value, _ in complete_status(incomplete)]

    assert values("comp") == ["compensating", "completed", "compensated"]
    assert values("running,n") == ["running,needs_attention"]
    assert "running,running" not in values("running,")
    assert dict(complete_status("in"))["in_flight"] == "running, compensating or paused"


def test_the_saga_script_answers_a_shell_asking_for_completions() -> None:
    # The shell runs `saga` with no arguments and the request in the environment: not the root help.
    env = {**os.environ, "_SAGA_COMPLETE": "complete_bash", "COMP_WORDS": "saga st", "COMP_CWORD": "1"}
    answer = subprocess.run(ENTRY, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (answer.returncode, answer.stdout.split(), answer.stderr) == (0, ["start", "stats"], "")
    env = {**env, "COMP_WORDS": "saga ls --status needs", "COMP_CWORD": "3"}
    answer = subprocess.run(ENTRY, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert answer.returncode == 0 and answer.stderr == ""
