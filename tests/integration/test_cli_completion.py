"""Completion of saga ids and order ids against a real orchestrator: the newest matches, fast, and silent on failure;
and the `saga` script itself completing ids and --status words as bash asks it to, against a real stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from devstack.launcher import ManagedProcess
from devstack.stack import LocalStack
from sagactl.app import app
from sagactl.completion import COMPLETION_SECONDS, complete_saga_id, complete_status
from sagactl.settings import DEFAULT_ADDRESS
from tests.integration.test_saga_up import SAGA
from tests.orchestrator_helpers import new_order_id, start_stack

# An orchestrator alone is enough: the sagas it starts stay RUNNING, retrying services that are not there.
UNUSED = {f"{name}_ADDR": "127.0.0.1:9" for name in ("INVENTORY", "PAYMENT", "SHIPPING", "NOTIFY")}

# A command shaped as the saga commands are, with the callbacks attached as sagactl.completion says.
probe = typer.Typer()


@probe.command()
def show(
    saga_ref: Annotated[str, typer.Argument(autocompletion=complete_saga_id)],
    status: Annotated[list[str] | None, typer.Option("--status", autocompletion=complete_status)] = None,
    address: Annotated[str, typer.Option("--address", envvar="SAGA_ADDRESS")] = DEFAULT_ADDRESS,
) -> None:
    """Stands in for a command that takes a saga id."""


def _completions(words: str, address: str) -> list[str]:
    """What bash would be offered for the last word of words (typer's completion protocol)."""
    env = {"_PROBE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    result = CliRunner().invoke(probe, [], env={**env, "SAGA_ADDRESS": address}, prog_name="probe")
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line]


def _context(address: str) -> typer.Context:
    ctx = typer.Context(typer.main.get_command(probe))
    ctx.params = {"address": address}
    return ctx


def _dead_address() -> str:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe_socket.getsockname()[1]}"


def test_saga_ids_and_order_ids_complete_from_the_orchestrator(start_process: Any, tmp_path: Path) -> None:
    orchestrator: ManagedProcess = start_process("orchestrator", DATA_DIR=str(tmp_path), **UNUSED)
    address = orchestrator.address
    placed = {}
    for _ in range(3):
        order_id = new_order_id("complete-me")
        result = CliRunner().invoke(
            app, ["order", "--order-id", order_id, "--no-wait", "--json"], env={"SAGA_ADDRESS": address}
        )
        assert result.exit_code == 0, result.output
        placed[order_id] = json.loads(result.stdout)["saga_id"]

    order_id, saga_id = next(iter(placed.items()))
    assert _completions(f"probe {saga_id[:6]}", address) == [
        found for found in placed.values() if found.startswith(saga_id[:6])
    ]
    assert sorted(_completions("probe complete-me", address)) == sorted(placed)
    assert _completions(f"probe {order_id}", address) == [order_id]
    # Nothing typed: the newest sagas, by id.
    assert set(_completions("probe ", address)) == set(placed.values())
    # Each suggestion says what it is, for the shells that show it (zsh, fish).
    described = dict(complete_saga_id(_context(address), order_id))
    assert described[order_id].startswith("RUNNING OrderSaga order " + order_id)

    # An orchestrator that holds the call (SIGSTOP) costs the shell at most the completion budget, then nothing.
    assert orchestrator.popen is not None
    orchestrator.popen.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert complete_saga_id(_context(address), saga_id[:4]) == []
        assert time.monotonic() - started < COMPLETION_SECONDS + 1.0
    finally:
        orchestrator.popen.send_signal(signal.SIGCONT)
    # None at all listening: nothing, and no error printed.
    assert _completions("probe ab", _dead_address()) == []


# -- the saga script, as bash runs it ------------------------------------------------------------------

# The commands that take a saga id as their first argument.
ID_COMMANDS = ["show", "watch", "retry", "pause", "resume", "cancel", "terminate", "approve", "reject", "signal"]
# The commands with a --status option.
STATUS_COMMANDS = ["ls", "retry", "pause", "resume", "cancel", "terminate"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("cli-complete"))
    try:
        yield running
    finally:
        running.stop()


def bash_completes(words: str, address: str, **env: str) -> list[str]:
    """What `saga` answers bash for the last word of words: bash sets _SAGA_COMPLETE, COMP_WORDS and COMP_CWORD."""
    asked = {
        **{name: value for name, value in os.environ.items() if name not in ("SAGA_TOKEN", "SAGA_CA_FILE")},
        "SAGA_ADDRESS": address,
        "_SAGA_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
        **env,
    }
    answer = subprocess.run(SAGA, env=asked, capture_output=True, text=True, timeout=60, check=False)
    # Whatever happens, bash gets completions or nothing: never an error on its terminal.
    assert (answer.returncode, answer.stderr) == (0, ""), answer
    return answer.stdout.split()


def test_the_saga_script_completes_a_short_id_and_a_status_in_every_command(stack: LocalStack) -> None:
    placed = []
    for _ in range(2):
        order_id = new_order_id("complete-cli")
        result = CliRunner().invoke(
            app, ["order", "--order-id", order_id, "--json"], env={"SAGA_ADDRESS": stack.address, "COLUMNS": "80"}
        )
        assert result.exit_code == 0, result.output
        placed.append(json.loads(result.stdout)["saga_id"])
    listed = CliRunner().invoke(app, ["ls", "--all", "--json"], env={"SAGA_ADDRESS": stack.address})
    everyone = [saga["saga_id"] for saga in json.loads(listed.stdout)["sagas"]]
    saga_id = placed[0]
    # A short prefix as one types it: the first 4 characters of an id ls shows by its first 8.
    prefix = saga_id[:4]
    sharing = sorted(found for found in everyone if found.startswith(prefix))
    for command in ID_COMMANDS:
        assert sorted(bash_completes(f"saga {command} {prefix}", stack.address)) == sharing, command
    # The options before the id count: --address here points at the stack, SAGA_ADDRESS nowhere.
    given = bash_completes(f"saga show --address {stack.address} {prefix}", _dead_address())
    assert sorted(given) == sharing

    for command in STATUS_COMMANDS:
        assert bash_completes(f"saga {command} --status comp", stack.address) == [
            "compensating",
            "completed",
            "compensated",
        ], command
    assert bash_completes("saga ls -s needs", stack.address) == ["needs_attention"]
    assert bash_completes("saga ls --status running,pa", stack.address) == ["running,paused"]

    # The orchestrator down: no completions, and no error.
    assert bash_completes(f"saga show {prefix}", _dead_address()) == []
    # Statuses need no orchestrator.
    assert bash_completes("saga ls --status term", _dead_address()) == ["terminated"]
