"""`saga up` as a real process: it restarts what crashed on the same port, keeps its token, and owns its data folder."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.orchestrator_helpers import new_order_id

WAIT_SECONDS = 90.0
PANEL_ROW = re.compile(r"(inventory|payment|shipping|notify|orchestrator)\s+127\.0\.0\.1:(\d+)\s+(\d+)\s+SERVING")
SCRIPT = Path(sys.executable).parent / "saga"
# Without the installed script, the same entry point under the script's name (completion reads it).
SAGA = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; "
                                              "from sagactl.main import main; main()"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """This environment without the settings saga up and the CLI would take from it, and extra on top."""
    env = {**os.environ, "COLUMNS": "200"}
    for name in ("OPERATOR_TOKENS", "OPERATOR_TOKENS_FILE", "SAGA_ADDRESS", "SAGA_TOKEN"):
        env.pop(name, None)
    return {**env, **extra}


class _Up:
    """One `saga up` child; its output read on a thread so that waiting for a line is bounded."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        command = [*SAGA, "up", "--port", str(self.port), "--service-port-base", "0", "--data-dir", str(data_dir)]
        self.process = subprocess.Popen(
            [*command, "--refresh", "0.3", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or _env(),
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, within: float = WAIT_SECONDS) -> re.Match[str]:
        """The first line (seen so far or to come) that matches pattern."""
        deadline = time.monotonic() + within
        checked = 0
        while True:
            for seen in self.seen[checked:]:
                found = re.search(pattern, seen)
                if found:
                    return found
            checked = len(self.seen)
            line: str | None
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line matching {pattern!r} within {within:.0f}s:\n{self.output()}")
            self.seen.append(line)

    def output(self) -> str:
        return "".join(self.seen)

    def panel_rows(self) -> dict[str, tuple[int, int]]:
        """Each process's (port, pid), from the panel printed once before `ready:`."""
        self.wait_for("ready: orchestrator at")
        return {name: (int(port), int(pid)) for name, port, pid in PANEL_ROW.findall(self.output())}

    def stop(self) -> int:
        """Ctrl-C, and the exit code once every process has stopped."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=60)
        self.wait_for(r"^stopped$", within=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_up() -> Iterator[Callable[..., _Up]]:
    started: list[_Up] = []

    def start(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> _Up:
        up = _Up(data_dir, *args, env=env)
        started.append(up)
        return up

    yield start
    for up in started:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGINT)
            try:
                up.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()


def _saga(*args: str, address: str, token: str = "") -> subprocess.CompletedProcess[str]:
    env = _env(SAGA_ADDRESS=address, **({"SAGA_TOKEN": token} if token else {}))
    return subprocess.run([*SAGA, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def _paused(address: str, token: str) -> subprocess.CompletedProcess[str]:
    """`saga pause` of a completed saga with this token: refused (exit 4), for its state or for the token."""
    placed = _saga("order", "--order-id", new_order_id("up-token"), "--json", address=address)
    assert placed.returncode == 0, placed.stderr
    paused = _saga("pause", json.loads(placed.stdout)["saga_id"], "--reason", "test", address=address, token=token)
    assert paused.returncode == 4, paused
    return paused


def _serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait_until(condition: Callable[[], bool], what: str, within: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {within:.0f}s")
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_a_killed_service_and_orchestrator_come_back_on_their_ports(
    tmp_path: Path, start_up: Callable[..., _Up]
) -> None:
    up = start_up(tmp_path)
    rows = up.panel_rows()
    assert sorted(rows) == ["inventory", "notify", "orchestrator", "payment", "shipping"], up.output()
    # Not the default address: the hint says how to reach this one.
    assert f"try `saga order --address {up.address}`" in up.output()

    payment_port, payment_pid = rows["payment"]
    os.kill(payment_pid, signal.SIGKILL)
    up.wait_for(r"payment: exited \(SIGKILL\); restarting in 0\.5 s")
    back = up.wait_for(r"payment: back on 127\.0\.0\.1:(\d+) \(pid (\d+), restart 1\)")
    assert int(back.group(1)) == payment_port and int(back.group(2)) != payment_pid
    _wait_until(lambda: _serving(payment_port), "payment answering health on its old port")

    orchestrator_port, orchestrator_pid = rows["orchestrator"]
    os.kill(orchestrator_pid, signal.SIGKILL)
    up.wait_for(rf"orchestrator: back on 127\.0\.0\.1:{orchestrator_port} \(pid \d+, restart 1\)")
    _wait_until(lambda: _serving(orchestrator_port), "the orchestrator answering health on its old port")

    # The restarted orchestrator finds the restarted payment service where it was: an order goes through.
    placed = _saga("order", "--order-id", new_order_id("up-restart"), "--json", address=up.address)
    assert placed.returncode == 0 and json.loads(placed.stdout)["status"] == "COMPLETED", placed.stderr

    # A clean stop restarts nothing; the exit code says that processes crashed on the way.
    pids = [pid for _, pid in rows.values()] + [int(pid) for pid in re.findall(r"back on \S+ \(pid (\d+)", up.output())]
    assert up.stop() == 1, up.output()
    assert "restarting" not in up.output().split("stopping ...")[-1], up.output()
    _wait_until(lambda: all(_gone(pid) for pid in pids), "every process gone", within=15)


def test_the_token_is_kept_the_folder_locked_and_metrics_printed(tmp_path: Path, start_up: Callable[..., _Up]) -> None:
    token_file = tmp_path / "operator.token"
    first = start_up(tmp_path, "--metrics")
    made = first.wait_for(rf"operator token \(new, kept in {re.escape(str(token_file))}\): export SAGA_TOKEN=(\S+)")
    token = made.group(1)
    assert token_file.read_text().strip() == token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    first.panel_rows()
    metrics = dict(re.findall(r"^metrics: (\w+) (http://127\.0\.0\.1:\d+/metrics)$", first.output(), re.MULTILINE))
    assert sorted(metrics) == ["inventory", "notify", "orchestrator", "payment", "shipping"], first.output()
    with urllib.request.urlopen(metrics["orchestrator"], timeout=10) as page:
        assert "sagasuite_rpc_calls_total" in page.read().decode()

    # A second saga up on the folder: one line naming the first one's pid, at once, and nothing touched.
    second = subprocess.run(
        [*SAGA, "up", "--port", str(_free_port()), "--service-port-base", "0", "--data-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1 and second.stdout == "", second
    assert second.stderr == (
        f"saga: error: {tmp_path} is in use by another saga up (pid {first.process.pid}): "
        "stop that one first, or choose another --data-dir\n"
    )
    assert token_file.read_text().strip() == token

    # The orchestrator takes the token: an operator call is judged on its saga, not refused for the token.
    assert "ILLEGAL_STATE_FOR_PAUSE" in _paused(first.address, token).stderr
    assert first.stop() == 0, first.output()

    # The next run keeps it, even with --fresh; --token overrides it for one run and says so.
    again = start_up(tmp_path, "--fresh")
    again.wait_for(rf"operator token \(kept in {re.escape(str(token_file))}\): export SAGA_TOKEN={re.escape(token)}$")
    again.panel_rows()
    assert again.stop() == 0
    given = "given-on-the-command-line-0123"
    override = start_up(tmp_path, "--token", given, env=_env(SAGA_TOKEN=token))
    override.wait_for(r"operator token: from --token \(operator name [^)]+\)")
    override.panel_rows()
    assert "ILLEGAL_STATE_FOR_PAUSE" in _paused(override.address, given).stderr
    assert "INVALID_TOKEN" in _paused(override.address, token).stderr
    assert override.stop() == 0
    assert token_file.read_text().strip() == token
