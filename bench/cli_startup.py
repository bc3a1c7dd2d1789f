"""Prints the CPU time (user + sys, median of N runs) of `saga` commands next to a bare `import grpc`.

Run it from a checkout: `.venv/bin/python bench/cli_startup.py [--runs 15] [--address host:port]`.
Without --address it starts the local stack (devstack) for the commands that call the orchestrator (`saga ls`,
`saga stats`) and stops it afterwards. Each round runs every command once, as a child process; its CPU time is the
growth of RUSAGE_CHILDREN across the run, which counts the child's own user and system time, not the wall time
spent waiting on the machine. Every command runs with its bytecode caches warm, as an installed `saga` does: the
first run of each writes them to a temporary PYTHONPYCACHEPREFIX (the checkout is left alone), the measured runs
read them. The `saga` it runs imports sagactl as the environment says: PYTHONPATH pointing at another copy of
sagactl/ measures that copy.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

__all__ = ["child_cpu_seconds", "main"]


def child_cpu_seconds(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one run of argv (which must exit 0)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _saga() -> str:
    found = Path(sys.executable).with_name("saga")
    return str(found) if found.exists() else (shutil.which("saga") or "saga")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per command; the median is printed")
    parser.add_argument("--address", default="", help="a running orchestrator for `saga ls` (default: start one)")
    options = parser.parse_args()
    with ExitStack() as stack:
        caches = stack.enter_context(tempfile.TemporaryDirectory(prefix="cli-startup-pycache-"))
        env = {**os.environ, "PYTHONPYCACHEPREFIX": caches}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        address = options.address
        if not address:
            from devstack.stack import LocalStack, StackConfig

            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cli-startup-")))
            address = stack.enter_context(LocalStack(StackConfig(data_dir=data_dir))).address
        saga = _saga()
        commands = {
            'python -c "import grpc"': [sys.executable, "-c", "import grpc"],
            "saga --help": [saga, "--help"],
            "saga --version": [saga, "--version"],
            "saga ls --json": [saga, "ls", "--json", "--address", address],
            "saga stats --json": [saga, "stats", "--json", "--address", address],
            # Through typer: a command's own help (rendered by rich), and a table.
            "saga ls --help": [saga, "ls", "--help"],
            "saga ls": [saga, "ls", "--address", address],
        }
        for argv in commands.values():  # once each first: it writes the bytecode caches every later run reads
            child_cpu_seconds(argv, env)
        # Round after round of every command, so a change in the machine's load weighs on all of them alike.
        samples: dict[str, list[float]] = {label: [] for label in commands}
        for _ in range(options.runs):
            for label, argv in commands.items():
                samples[label].append(child_cpu_seconds(argv, env))
        medians = {label: statistics.median(seconds) for label, seconds in samples.items()}
    bare = medians['python -c "import grpc"']
    print(f"CPU time (user + sys), median of {options.runs} runs")
    for label, seconds in medians.items():
        print(f"  {label:<26} {seconds * 1000:7.0f} ms  {seconds / bare:5.2f}x")


if __name__ == "__main__":
    main()
