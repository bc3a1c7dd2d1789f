"""An empty, blank or control-character orchestrator address is a one-line usage error (exit 2), not a gRPC error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sagactl.app import app
from sagactl.client import ClientError, SagaClient
from sagactl.settings import EXIT_USAGE, ClientConfig

ENTRY = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]
# Every command that calls the orchestrator, in a form that would otherwise reach it.
COMMANDS = [
    ["ls"],
    ["ls", "--json"],
    ["show", "ord-1"],
    ["show", "ord-1", "--json"],
    ["watch", "ord-1"],
    ["stats", "--json"],
    ["order", "--no-wait"],
    ["pause", "ord-1"],
    ["retry", "--all", "--yes"],
    ["terminate", "ord-1", "--reason", "by hand"],
]
BAD = ["", " ", "\t ", "127.0.0.1:50050\n", "\x00"]
CLEAN_ENV = {"SAGA_ADDRESS": None, "SAGA_TOKEN": None, "SAGA_CA_FILE": None, "COLUMNS": "120"}


def _one_usage_line(exit_code: int, stdout: str, stderr: str, *, as_json: bool = False) -> None:
    assert (exit_code, stdout) == (EXIT_USAGE, ""), stderr
    assert stderr.count("\n") == 1, stderr
    if as_json:
        # With --json the error is one line of JSON carrying the same message.
        error = json.loads(stderr)["error"]
        assert (error["code"], error["exit_code"]) == ("USAGE", EXIT_USAGE), error
        message = error["message"]
    else:
        assert stderr.startswith("saga: error: "), stderr
        message = stderr.removeprefix("saga: error: ")
    assert message.startswith("the orchestrator address (--address or SAGA_ADDRESS) ")
    assert "expected host:port" in message, message


@pytest.mark.parametrize("address", BAD)
def test_the_client_refuses_the_address_before_opening_a_channel(address: str) -> None:
    with pytest.raises(ClientError) as raised:
        SagaClient(ClientConfig(address=address))
    assert raised.value.exit_code == EXIT_USAGE and "\n" not in raised.value.message


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("address", BAD, ids=repr)
def test_every_command_gives_one_usage_line(args: list[str], address: str) -> None:
    result = CliRunner().invoke(app, [*args, "--address", address], env=CLEAN_ENV)
    _one_usage_line(result.exit_code, result.stdout, result.stderr, as_json="--json" in args)


def test_a_blank_address_from_the_environment_is_refused_too() -> None:
    result = CliRunner().invoke(app, ["ls"], env={**CLEAN_ENV, "SAGA_ADDRESS": "   "})
    _one_usage_line(result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("args", [["ls", "--json"], ["show", "ord-1", "--json"], ["stats", "--json", "--address="]])
def test_the_entry_points_fast_path_words_it_as_the_typer_command_does(args: list[str]) -> None:
    argv = args if args[-1] == "--address=" else [*args, "--address", ""]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SAGA_")}
    fast = subprocess.run([*ENTRY, *argv], env=env, capture_output=True, text=True, timeout=60, check=False)
    _one_usage_line(fast.returncode, fast.stdout, fast.stderr, as_json=True)
    typer = CliRunner().invoke(app, argv, env=CLEAN_ENV)
    assert (typer.exit_code, typer.stdout, typer.stderr) == (fast.returncode, fast.stdout, fast.stderr)
