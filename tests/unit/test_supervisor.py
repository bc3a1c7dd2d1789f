"""The supervisor `saga up` runs: backoff doubling to its cap and reset after a stable run, on a fixed clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from devstack.launcher import EventKind, ManagedProcess, Phase, ProcessFailed, RestartBackoff, Supervisor, exit_text


@dataclass
class _Popen:
    returncode: int | None = None
    pid: int = 100


@dataclass
class _Process:
    """Stands in for a ManagedProcess: crashes and readiness are set by the test."""

    name: str = "payment"
    port: int = 50052
    popen: _Popen = field(default_factory=_Popen)
    launches: int = 0
    ready: bool = False
    fails_to_start: bool = False
    log_path: Path = Path("logs/payment.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_running(self) -> bool:
        return self.popen.returncode is None

    def crash(self, code: int = -9) -> None:
        self.popen.returncode = code

    def relaunch(self) -> None:
        self.launches += 1
        self.popen = _Popen(pid=100 + self.launches)
        self.ready = False

    def check_ready(self) -> bool:
        if self.fails_to_start:
            self.crash(1)
            raise ProcessFailed("payment exited with 1")
        return self.ready

    def kill(self) -> None:
        self.crash()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _supervisor(process: _Process, clock: _Clock) -> Supervisor:
    return Supervisor({"payment": cast(ManagedProcess, process)}, RestartBackoff(), ready_timeout=30, clock=clock)


def _phase(supervisor: Supervisor) -> Phase:
    return supervisor.watched["payment"].phase


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    backoff = RestartBackoff()
    assert [backoff.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_crash_waits_its_backoff_then_relaunches_and_comes_back() -> None:
    process, clock = _Process(), _Clock()
    supervisor = _supervisor(process, clock)
    assert supervisor.check() == [] and supervisor.seconds_to_next() is None
    process.crash(-9)
    [exited] = supervisor.check()
    assert exited.kind is EventKind.EXITED and "exited (SIGKILL); restarting in 0.5 s" in exited.text
    assert _phase(supervisor) is Phase.WAITING and supervisor.restart_in("payment") == 0.5
    clock.now += 0.4
    assert supervisor.check() == [] and process.launches == 0
    clock.now += 0.1
    [restarting] = supervisor.check()
    assert restarting.kind is EventKind.RESTARTING and process.launches == 1
    assert supervisor.check() == []  # launched, not ready yet
    process.ready = True
    [back] = supervisor.check()
    assert back.text == "payment: back on 127.0.0.1:50052 (pid 101, restart 1)"
    assert _phase(supervisor) is Phase.UP and supervisor.watched["payment"].restarts == 1


def test_crashes_in_a_row_double_the_wait_and_a_stable_run_resets_it() -> None:
    process, clock = _Process(), _Clock()
    supervisor = _supervisor(process, clock)
    waits = []
    for _ in range(4):
        process.crash()
        supervisor.check()
        waits.append(supervisor.restart_in("payment"))
        clock.now += waits[-1]
        supervisor.check()  # relaunched
        process.ready = True
        supervisor.check()  # back, and crashes again at once
    assert waits == [0.5, 1, 2, 4]
    clock.now += 10  # up for stable_after
    process.crash()
    supervisor.check()
    assert supervisor.restart_in("payment") == 0.5


def test_a_relaunch_that_fails_or_never_gets_ready_counts_as_a_crash() -> None:
    process, clock = _Process(), _Clock()
    supervisor = _supervisor(process, clock)
    process.crash()
    supervisor.check()
    clock.now += 0.5
    supervisor.check()
    process.fails_to_start = True
    [failed] = supervisor.check()
    assert "exited while starting (exit 1); restarting in 1 s" in failed.text
    process.fails_to_start = False
    clock.now += 1
    supervisor.check()
    clock.now += 31
    [late] = supervisor.check()
    assert "not ready in 30 s" in late.text and supervisor.restart_in("payment") == 2
    assert supervisor.watched["payment"].restarts == 2


def test_exit_text_names_the_signal() -> None:
    assert (exit_text(-9), exit_text(-15), exit_text(1), exit_text(None)) == ("SIGKILL", "SIGTERM", "exit 1", "?")
