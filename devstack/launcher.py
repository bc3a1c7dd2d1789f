"""Start, watch and stop the suite's processes: used by the local stack, the tests and the chaos harness."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ManagedProcess", "ProcessFailed"]

_READY = re.compile(rb"READY port=(\d+)")
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
        self.port = self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._log_offset)
                match = _READY.search(log_file.read())
            if match:
                return int(match.group(1))
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)
        self.kill()
        raise ProcessFailed(f"{self.name} did not become ready in {timeout:.0f}s:\n{self.log_tail()}")

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
