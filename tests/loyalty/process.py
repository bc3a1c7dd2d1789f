"""Start the loyalty service as a real process for a test, wait for its port, and stop it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.loyalty.build import LoyaltyBuild

__all__ = ["SERVER", "LoyaltyProcess"]

SERVER = Path(__file__).resolve().with_name("server.py")
_READY = re.compile(rb"READY port=(\d+)")


class LoyaltyProcess:
    """One `python tests/loyalty/server.py` process, its output in a log file."""

    def __init__(self, name: str, directory: Path, build: LoyaltyBuild, *, broken: str = "", port: int = 0) -> None:
        self.name = name
        self.db = directory / f"{name}.db"
        self.log_path = directory / f"{name}.log"
        self._build = build
        self._broken = broken
        self._requested_port = port
        self.port: int | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not running")
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> LoyaltyProcess:
        """Launch the server and wait until it prints its port (on a busy machine, for up to timeout seconds)."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Launch the server without waiting; wait_ready() then waits for its port."""
        command = [sys.executable, str(SERVER), "--port", str(self._requested_port), "--db", str(self.db)]
        command += ["--stubs", str(self._build.out_dir)]
        if self._broken:
            command += ["--broken", self._broken]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            self.popen = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait_ready(self, timeout: float = 30.0) -> LoyaltyProcess:
        assert self.popen is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._log_offset)
                found = _READY.search(log_file.read())
            if found:
                self.port = int(found.group(1))
                return self
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)  # polling the log for the READY line, not waiting on luck
        self.stop()
        raise RuntimeError(f"{self.name} did not print its port in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait for the drain; SIGKILL if it does not end in time."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def __enter__(self) -> LoyaltyProcess:
        return self if self.port is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
