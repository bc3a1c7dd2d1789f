"""`saga --help` is sagactl.roothelp's text through the entry point and the typer app alike, and it is complete."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import typer
from typer._click import Context
from typer.testing import CliRunner

from sagactl import app as app_module
from sagactl import roothelp
from sagactl.app import app

# The entry point as the `saga` script runs it, with the fast paths.
ENTRY = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]


def _words(text: str) -> str:
    return " ".join(text.split())


def _root() -> tuple[typer.core.TyperGroup, Context]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group, Context(group, info_name="saga")


def _entry(*args: str, columns: str = "80") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": columns}
    return subprocess.run([*ENTRY, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _unboxed(text: str) -> str:
    """The help's words with the panels' borders taken out."""
    return _words(" ".join(line.strip("│╭╮╰╯─ ") for line in text.splitlines()))


def test_every_command_is_listed_with_the_first_paragraph_of_its_own_help() -> None:
    group, ctx = _root()
    assert group.list_commands(ctx) == list(roothelp.COMMANDS)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        optional = app_module._OPTIONAL_COMMANDS.get(name)
        if optional is not None and importlib.util.find_spec(optional.package) is not None:
            command = app_module._load_optional(name, optional)  # the real command, not its stand-in
        assert command is not None and command.help, name
        assert _words(command.help.split("\n\n")[0]) == roothelp.COMMANDS[name], name
        assert roothelp.COMMANDS[name] in _unboxed(roothelp.root_help()), name


def test_every_root_option_is_listed_with_its_help() -> None:
    group, ctx = _root()
    options = {param.opts[0]: _words(getattr(param, "help", "") or "") for param in group.get_params(ctx)}
    assert options == dict(roothelp.OPTIONS)
    text = _unboxed(roothelp.root_help())
    for name, help_text in roothelp.OPTIONS:
        assert f"{name} {help_text}" in text, name


def test_the_typer_app_prints_the_same_help_and_exits_like_typer() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "80"})
    assert (shown.exit_code, shown.stdout) == (0, roothelp.root_help(80))
    # No arguments: the help on stdout and the exit code of a usage error, as before.
    bare = runner.invoke(app, [], env={"COLUMNS": "80"})
    assert (bare.exit_code, bare.stdout, bare.stderr) == (2, roothelp.root_help(80), "")


def test_the_entry_point_prints_it_without_typer_rich_or_grpc() -> None:
    shown, bare = _entry("--help"), _entry()
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, roothelp.root_help(80), "")
    assert (bare.returncode, bare.stdout, bare.stderr) == (2, roothelp.root_help(80), "")
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", *ENTRY[1:], "--help"], capture_output=True, text=True, check=True
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in timed.stderr.splitlines() if "|" in line}
    assert not imported & {"typer", "rich", "grpc", "google", "sagasuite"}, sorted(imported)


def test_version_answers_at_once() -> None:
    shown = _entry("--version")
    assert shown.returncode == 0 and shown.stdout.startswith("sagasuite ") and shown.stderr == ""
    assert CliRunner().invoke(app, ["--version"]).stdout == shown.stdout


@pytest.mark.parametrize("columns", [30, 57, 80, 200])
def test_the_help_fits_the_terminal_from_50_to_80_columns(columns: int) -> None:
    text = roothelp.root_help(columns)
    assert max(map(len, text.splitlines())) <= max(50, min(columns, 80))
    for words in (roothelp.SUMMARY, *roothelp.COMMANDS.values(), "0 ok", "saga ls --status needs_attention"):
        assert words in _unboxed(text), (columns, words)
    assert _entry("--help", columns=str(columns)).stdout == text


def test_a_command_whose_package_is_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "bench" else found(name))
    assert roothelp.summary("bench").endswith("(needs the bench package: not installed here)")
    assert "not installed here" not in roothelp.summary("ls")
    assert "(needs the bench package: not installed here)" in _unboxed(roothelp.root_help())
