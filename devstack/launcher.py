"""Start, watch, restart and stop the suite's processes: used by the local stack, the tests and the chaos harness."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

__all__ = [
    "EventKind",
    "ManagedProcess",
    "Phase",
    "ProcessFailed",
    "RestartBackoff",
    "Supervised",
    "Supervisor",
    "SupervisorEvent",
    "exit_text",
]

_READY = re.compile(rb"READY port=(\d+)")
# Printed before READY by a process started with METRICS_PORT set (svckit.server).
_METRICS = re.compile(rb"METRICS port=(\d+)")
# How long a restart keeps trying its old port when something else holds it for a moment.
_REBIND_SECONDS = 10.0


class ProcessFailed(RuntimeError):
    """A process exited or did not report ready in time; carries the tail of its log."""


class ManagedProcess:
    """One child process whose output goes to a log file and which reports its port when ready."""

    def __init__(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        log_dir: Path,
        *,
        python: str = sys.executable,
    ) -> None:
        self.name = name
        self.module = module
        self.env = dict(env)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.python = python
        self.popen: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        # The Prometheus port the process reported (METRICS_PORT set), else None.
        self.metrics_port: int | None = None
        self._log_offset = 0

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not running")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, timeout: float = 30.0) -> ManagedProcess:
        """Launch the process and wait until it reports its port."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Launch the process without waiting; wait_ready() then waits for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            self.popen = subprocess.Popen(
                [self.python, "-m", self.module],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> ManagedProcess:
        deadline = time.monotonic() + timeout
        while not self.check_ready():
            if time.monotonic() >= deadline:
                self.kill()
                raise ProcessFailed(f"{self.name} did not become ready in {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def check_ready(self) -> bool:
        """Whether the launched process has reported READY (its port, and metrics port, are then set), at once.

        Raises ProcessFailed when it exited before that.
        """
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self._log_offset)
            output = log_file.read()
        match = _READY.search(output)
        if match:
            self.port = int(match.group(1))
            metrics = _METRICS.search(output, 0, match.start())
            self.metrics_port = int(metrics.group(1)) if metrics else None
            return True
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise ProcessFailed(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def is_running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up, as in a crash."""
        if self.is_running():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then wait for a graceful exit; SIGKILL if it does not come."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def relaunch(self) -> None:
        """Launch again on the same port (and metrics port) without waiting; check_ready() tells when it is up."""
        if self.port is not None:
            self.env["PORT"] = str(self.port)
        if self.metrics_port is not None:
            self.env["METRICS_PORT"] = str(self.metrics_port)
        self.launch()

    def restart(self, timeout: float = 30.0) -> ManagedProcess:
        """Start again on the same port, so clients with a static address find it."""
        if self.port is not None:
            self.env["PORT"] = str(self.port)
        deadline = time.monotonic() + _REBIND_SECONDS
        while True:
            try:
                return self.start(timeout)
            except ProcessFailed as error:
                # On a busy machine another process's socket (a client's ephemeral port) can hold
                # the freed port for a moment: the same port again, for a few seconds.
                if "cannot listen on" not in str(error).splitlines()[-1] or time.monotonic() > deadline:
                    raise
                time.sleep(0.25)


def exit_text(returncode: int | None) -> str:
    """A process's exit status as people read it: "exit 1", "SIGKILL" (for -9), "?" when unknown."""
    if returncode is None:
        return "?"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


@dataclass(frozen=True)
class RestartBackoff:
    """How long a supervisor waits before restarting a crashed process: first, doubling up to longest; a
    process that stayed up for stable_after seconds starts again from first at its next crash."""

    first: float = 0.5
    longest: float = 30.0
    factor: float = 2.0
    stable_after: float = 10.0

    def delay(self, crashes_in_a_row: int) -> float:
        return min(self.longest, self.first * self.factor ** max(0, crashes_in_a_row - 1))


class Phase(StrEnum):
    """Where a supervised process is: serving, waiting out its backoff, or launched and not yet ready."""

    UP = "up"
    WAITING = "waiting"
    STARTING = "starting"


@dataclass
class Supervised:
    """A supervised process and its restart record."""

    process: ManagedProcess
    phase: Phase = Phase.UP
    restarts: int = 0
    crashes_in_a_row: int = 0
    since: float = 0.0
    restart_at: float = 0.0
    last_exit: int | None = None


class EventKind(StrEnum):
    """What a supervisor event tells: a process exited, is being relaunched, or is ready again."""

    EXITED = "exited"
    RESTARTING = "restarting"
    BACK = "back"


@dataclass(frozen=True)
class SupervisorEvent:
    """One thing the supervisor saw or did, worded for a log line."""

    name: str
    kind: EventKind
    text: str


@dataclass
class Supervisor:
    """Restarts the processes that exit while they should run, on their own ports, with exponential backoff.

    Nothing runs in the background: check() looks at every process and does what is due, so the caller's
    loop decides when (seconds_to_next() says how soon something will be due). A process that does not
    report READY within ready_timeout of its relaunch is killed and counts as one more crash.
    """

    processes: Mapping[str, ManagedProcess]
    backoff: RestartBackoff = RestartBackoff()
    ready_timeout: float = 30.0
    clock: Callable[[], float] = time.monotonic
    watched: dict[str, Supervised] = field(init=False)

    def __post_init__(self) -> None:
        now = self.clock()
        self.watched = {name: Supervised(process, since=now) for name, process in self.processes.items()}

    def check(self) -> list[SupervisorEvent]:
        """Notice exits, relaunch what is due, and mark ready what came back; one event for each."""
        events: list[SupervisorEvent] = []
        for name, watch in self.watched.items():
            now = self.clock()
            process = watch.process
            if watch.phase is Phase.UP and not process.is_running():
                stable = now - watch.since >= self.backoff.stable_after
                events.append(self._crashed(name, watch, now, "exited", reset=stable))
            elif watch.phase is Phase.WAITING and now >= watch.restart_at:
                watch.restarts += 1
                try:
                    process.relaunch()
                except OSError as error:
                    events.append(self._crashed(name, watch, now, f"could not be launched ({error})"))
                    continue
                watch.phase, watch.since = Phase.STARTING, now
                events.append(
                    SupervisorEvent(name, EventKind.RESTARTING, f"{name}: restarting (restart {watch.restarts})")
                )
            elif watch.phase is Phase.STARTING:
                try:
                    ready = process.check_ready()
                except ProcessFailed:
                    events.append(self._crashed(name, watch, now, "exited while starting"))
                    continue
                if ready:
                    watch.phase, watch.since = Phase.UP, now
                    text = f"{name}: back on {process.address} (pid {process.pid}, restart {watch.restarts})"
                    events.append(SupervisorEvent(name, EventKind.BACK, text))
                elif now - watch.since > self.ready_timeout:
                    process.kill()
                    events.append(self._crashed(name, watch, now, f"not ready in {self.ready_timeout:.0f} s"))
        return events

    def _crashed(self, name: str, watch: Supervised, now: float, what: str, *, reset: bool = False) -> SupervisorEvent:
        watch.crashes_in_a_row = 1 if reset else watch.crashes_in_a_row + 1
        delay = self.backoff.delay(watch.crashes_in_a_row)
        popen = watch.process.popen
        watch.last_exit = popen.returncode if popen is not None else None
        watch.phase, watch.restart_at = Phase.WAITING, now + delay
        text = (
            f"{name}: {what} ({exit_text(watch.last_exit)}); restarting in {delay:g} s (log: {watch.process.log_path})"
        )
        return SupervisorEvent(name, EventKind.EXITED, text)

    def restart_in(self, name: str) -> float:
        """Seconds until a waiting process is relaunched (0 when it is not waiting)."""
        watch = self.watched[name]
        return max(0.0, watch.restart_at - self.clock()) if watch.phase is Phase.WAITING else 0.0

    def seconds_to_next(self) -> float | None:
        """How soon check() has something to do for a process that is not up: None when all are up."""
        waits = [
            max(0.0, watch.restart_at - self.clock()) if watch.phase is Phase.WAITING else 0.05
            for watch in self.watched.values()
            if watch.phase is not Phase.UP
        ]
        return min(waits) if waits else None
