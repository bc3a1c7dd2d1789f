"""`saga ls|show|stats --json` answer without typer or rich, byte for byte as the typer commands do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import LocalStack
from tests.orchestrator_helpers import new_order_id, start_stack

# The entry point (sagactl.main, with the fast path) and the typer app alone, both named `saga` in usage lines.
ENTRY = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]
TYPER = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.app import main; main()"]


def run(argv: list[str], address: str, *extra_env: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGA_ADDRESS": address, "COLUMNS": "200", **dict(extra_env)}
    for unset in ("SAGA_TOKEN", "SAGA_CA_FILE", "SAGA_CERT_FILE", "SAGA_KEY_FILE"):
        env.pop(unset, None)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("cli-fast"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def orders(stack: LocalStack) -> list[tuple[str, str]]:
    """Two ended sagas (one completed, one compensated) as (order id, saga id), so every read is stable."""
    found = []
    for token, code in (("tok_visa", 0), ("tok_declined", 1)):
        order_id = new_order_id("cli-fast")
        placed = run([*TYPER, "order", "--order-id", order_id, "--payment-token", token, "--json"], stack.address)
        assert placed.returncode == code, placed.stderr
        found.append((order_id, json.loads(placed.stdout)["saga_id"]))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_read_commands_print_what_the_typer_commands_print(stack: LocalStack, orders: list[tuple[str, str]]) -> None:
    (order_id, saga_id), (_, declined_saga_id) = orders
    cases = [
        ["ls", "--json"],
        ["ls", "--limit", "1", "--json"],
        ["ls", "--all", "--limit=1", "--json"],
        ["ls", "--json", "--status", "completed,compensated", "-s", "running"],
        ["ls", "--json", "--order", order_id, "--since", "1h", "--type=OrderSaga"],
        ["ls", "--json", "--older-than", "1d"],
        ["show", saga_id, "--json"],
        ["show", "--json", order_id, "--history", "--width", "30"],
        ["show", declined_saga_id, "--json", "--address", stack.address, "--timeout", "5"],
        ["show", "no-such-saga", "--json"],
        ["stats", "--json"],
        ["stats", "--since", "1h", "--json", "--token="],
        ["ls", "--json", "-a", f"127.0.0.1:{free_port()}", "--timeout", "2"],
        # Not for the fast path: typer words these usage errors.
        ["ls", "--json", "--limit", "0"],
        ["ls", "--json", "--since", "soon"],
        ["ls", "--json", "--status", "lost"],
        ["show", "--json"],
        ["stats", "--json", "--help"],
    ]
    for args in cases:
        fast, typer = run([*ENTRY, *args], stack.address), run([*TYPER, *args], stack.address)
        assert (fast.returncode, fast.stdout, fast.stderr) == (typer.returncode, typer.stdout, typer.stderr), args
    assert json.loads(run([*ENTRY, "show", saga_id, "--json"], stack.address).stdout)["status"] == "COMPLETED"
    assert run([*ENTRY, "show", "no-such-saga", "--json"], stack.address).returncode == 4


def test_read_commands_with_json_import_neither_typer_nor_rich(
    stack: LocalStack, orders: list[tuple[str, str]], tmp_path: Path
) -> None:
    _, saga_id = orders[0]
    for args in (["ls", "--json"], ["show", saga_id, "--json"], ["stats", "--json"]):
        result = run([sys.executable, "-X", "importtime", *ENTRY[1:], *args], stack.address)
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert not {name for name in imported if name.split(".")[0] in ("typer", "rich")}, args
        assert "google.protobuf.json_format" not in imported, args
