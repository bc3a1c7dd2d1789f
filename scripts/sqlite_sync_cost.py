"""What SQLITE_SYNCHRONOUS=full costs against normal: small commits on a real SQLite file in WAL mode, timed.

Each setting opens a fresh file through svckit.db.Database, so the pragmas are exactly the ones every
process runs with, and commits small transactions two ways:

- raw: BEGIN IMMEDIATE, one small INSERT, COMMIT on the driver's connection, one at a time: the
  price of one commit and nothing else;
- units: `Database.transaction` as the services and the orchestrator call it, from C concurrent
  callers, so one commit serves every unit queued meanwhile (group commit).

It prints commits (or units) per second and the p50/p99 latency of one, with the file system the
file lives on and the load average, since fsync is the disk's time and the rest is the CPU's.

    .venv/bin/python scripts/sqlite_sync_cost.py                 # 2000 commits each, C=1,32
    .venv/bin/python scripts/sqlite_sync_cost.py -n 5000 --dir /var/tmp --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text

from svckit.db import Database, SqliteSynchronous

_CREATE = "CREATE TABLE IF NOT EXISTS bench_row (id INTEGER PRIMARY KEY, key TEXT NOT NULL, payload BLOB NOT NULL)"
_INSERT = "INSERT INTO bench_row (key, payload) VALUES (?, ?)"
# About the size of an idempotency record: a key, a hash and a short response.
_PAYLOAD = os.urandom(160)


@dataclass(frozen=True)
class Result:
    """One measured run: what was committed, how fast, and the latency of one."""

    setting: SqliteSynchronous
    mode: str
    concurrency: int
    count: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000.0


def _open(folder: Path, setting: SqliteSynchronous, label: str) -> Database:
    path = folder / f"{label}-{setting.value}.db"
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    database = Database(f"sqlite:///{path}", sqlite_synchronous=setting)
    database.transaction_sync(lambda c: c.execute(text(_CREATE)))
    return database


def _check_pragmas(database: Database, setting: SqliteSynchronous) -> None:
    """Refuse to report figures for a file that does not run the pragmas it is labelled with."""

    def read(connection: Connection) -> tuple[str, int]:
        mode = connection.execute(text("PRAGMA journal_mode")).scalar_one()
        level = connection.execute(text("PRAGMA synchronous")).scalar_one()
        return str(mode), int(level)

    mode, level = database.transaction_sync(read)
    expected = {SqliteSynchronous.NORMAL: 1, SqliteSynchronous.FULL: 2}[setting]
    if mode.lower() != "wal" or level != expected:
        raise SystemExit(f"{setting.value}: journal_mode={mode} synchronous={level}, expected wal and {expected}")


def measure_raw(folder: Path, setting: SqliteSynchronous, count: int) -> Result:
    """One commit at a time on the driver's connection: the cost of a commit itself."""
    database = _open(folder, setting, "raw")
    try:
        _check_pragmas(database, setting)
        raw = database.engine.raw_connection()
        try:
            driver = raw.driver_connection
            assert driver is not None
            latencies = []
            started = time.perf_counter()
            for index in range(count):
                begun = time.perf_counter()
                driver.execute("BEGIN IMMEDIATE")
                driver.execute(_INSERT, (f"key-{index}", _PAYLOAD))
                driver.execute("COMMIT")
                latencies.append(time.perf_counter() - begun)
            seconds = time.perf_counter() - started
        finally:
            raw.close()
    finally:
        database.close()
    return Result(setting, "raw", 1, count, seconds, latencies)


async def _units(database: Database, count: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    next_index = 0

    def insert(index: int) -> Callable[[Connection], None]:
        def work(connection: Connection) -> None:
            connection.connection.cursor().execute(_INSERT, (f"key-{index}", _PAYLOAD))

        return work

    async def caller() -> None:
        nonlocal next_index
        while next_index < count:
            index, next_index = next_index, next_index + 1
            begun = time.perf_counter()
            await database.transaction(insert(index))
            latencies.append(time.perf_counter() - begun)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def measure_units(folder: Path, setting: SqliteSynchronous, count: int, concurrency: int) -> Result:
    """Database.transaction from concurrent callers: what a process pays, group commit included."""
    database = _open(folder, setting, f"units-c{concurrency}")
    try:
        _check_pragmas(database, setting)
        seconds, latencies = asyncio.run(_units(database, count, concurrency))
    finally:
        database.close()
    return Result(setting, "units", concurrency, count, seconds, latencies)


def _file_system(folder: Path) -> str:
    """The mount a folder lives on, as /proc/mounts names it: a tmpfs makes fsync free."""
    resolved, best = str(folder.resolve()), ("?", "?", "?")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        device, mount_point, kind = line.split()[:3]
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(
            best[1]
        ):
            best = (device, mount_point, kind)
    return f"{best[2]} ({best[0]} on {best[1]})"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def _print(results: Sequence[Result]) -> None:
    print(f"{'setting':8} {'mode':6} {'C':>3} {'count':>6} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in results:
        print(
            f"{r.setting.value:8} {r.mode:6} {r.concurrency:>3} {r.count:>6} {r.per_second:>9.0f} "
            f"{r.percentile(0.50):>8.3f} {r.percentile(0.99):>8.3f}"
        )
    by_key = {(r.mode, r.concurrency, r.setting): r for r in results}
    for (mode, concurrency, setting), full in by_key.items():
        normal = by_key.get((mode, concurrency, SqliteSynchronous.NORMAL))
        if setting is SqliteSynchronous.FULL and normal is not None and full.per_second > 0:
            print(
                f"full/normal {mode} C={concurrency}: {full.per_second / normal.per_second:.2f}x the rate, "
                f"p50 +{full.percentile(0.5) - normal.percentile(0.5):.3f} ms"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--transactions", type=int, default=2000, help="commits (or units) per run")
    parser.add_argument("--concurrency", default="1,32", help="callers of Database.transaction, e.g. 1,32")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (default: a temp folder)")
    parser.add_argument("--settings", default="normal,full", help="SQLITE_SYNCHRONOUS values to measure")
    options = parser.parse_args(argv)
    if options.transactions < 1:
        parser.error("--transactions must be at least 1")
    settings = [SqliteSynchronous(value.strip().lower()) for value in options.settings.split(",") if value.strip()]
    levels = [int(value) for value in options.concurrency.split(",") if value.strip()]
    if not levels or min(levels) < 1:
        parser.error("--concurrency takes positive integers, e.g. 1,32")
    with tempfile.TemporaryDirectory(prefix="sqlite-sync-", dir=options.dir) as folder_name:
        folder = Path(folder_name)
        print(f"files on: {_file_system(folder)}")
        print(f"load before: {_load()}")
        results: list[Result] = []
        # Settings alternate within each mode, so a change in the machine's load hits both alike.
        for setting in settings:
            results.append(measure_raw(folder, setting, options.transactions))
        for concurrency in levels:
            for setting in settings:
                results.append(measure_units(folder, setting, options.transactions, concurrency))
        print(f"load after: {_load()}")
    _print(results)


if __name__ == "__main__":
    main()
