"""PostgreSQL round trips: how many one order saga costs the orchestrator, and what psycopg's pipeline mode would save.

Two measurements on a real PostgreSQL server (docs/scaling.md quotes both):

- trips: a dispatcher on a fresh database of the server, with in-process fake services (the unit
  tests' `running`), runs one order saga from its start to its end while libpq traces the protocol
  (`pgconn.trace`). The count is the client messages that wait for the server: Query, Sync, Flush.
- pipeline: one psycopg connection runs two small transactions, plain and in a pipeline,
  interleaved N times each: two reads and three inserts, then three reads. It prints p50 and p90 of each.

    .venv/bin/python scripts/pg_round_trips.py postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    .venv/bin/python scripts/pg_round_trips.py URL -n 3000 --only pipeline

Another checkout's code is measured by copying this file into its scripts/ and running it there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

# The checkout's own tests/ (for the unit tests' fake services), and its code before any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import store
from orchestrator.sagas.order import ORDER_SAGA
from svckit.db import Database
from tests.unit.test_dispatcher_batch import order, running

_WAITING_MESSAGES = ("Query", "Sync", "Flush")


def _fresh_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    """A new database on the server, and how to drop it."""
    name = f"roundtrips_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


async def _saga_trips(url: str) -> collections.Counter[str]:
    database = Database(url)
    store.ensure_schema(database)
    dispatcher, _ = await running(database)
    try:
        # One saga first, so that every statement is prepared and the connection is open.
        await dispatcher.start_saga(ORDER_SAGA, "warm-up", order("warm-up"), 300)
        await asyncio.sleep(1.0)
        raw: Any = database._connection.connection.dbapi_connection  # type: ignore[union-attr]
        with tempfile.NamedTemporaryFile("w+", suffix=".trace") as trace:
            raw.pgconn.trace(trace.fileno())
            await dispatcher.start_saga(ORDER_SAGA, "traced", order("traced"), 300)
            status = ""
            # Polled on a connection of its own, so the trace holds the dispatcher's messages alone.
            poller = create_engine(url, poolclass=NullPool)
            try:
                for _ in range(500):
                    with poller.connect() as connection:
                        query = text("SELECT status FROM saga WHERE business_key = 'traced'")
                        status = str(connection.execute(query).scalar())
                    if status == "COMPLETED":
                        break
                    await asyncio.sleep(0.01)
            finally:
                poller.dispose()
            raw.pgconn.untrace()
            trace.seek(0)
            counted: collections.Counter[str] = collections.Counter()
            for line in trace:
                fields = line.split("\t")
                if len(fields) > 3 and fields[1] == "F":  # a message from the client (frontend)
                    counted[fields[3].split()[0]] += 1
        if status != "COMPLETED":
            raise SystemExit(f"the traced saga did not complete: {status}")
        return counted
    finally:
        await dispatcher.stop(5)
        database.close()


def trips(admin_url: str) -> None:
    url, drop = _fresh_database(admin_url)
    try:
        counted = asyncio.run(_saga_trips(url))
    finally:
        drop()
    waits = sum(counted[name] for name in _WAITING_MESSAGES)
    print(f"one order saga (4 steps), the dispatcher's connection: {waits} messages that wait for the server")
    print(f"  by message: {dict(counted)}")
    print("  (the dispatcher's poller and heartbeat included, for as long as the saga ran)")


def pipeline(admin_url: str, repeats: int) -> None:
    url, drop = _fresh_database(admin_url)
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
            connection.execute("CREATE TABLE t (id bigserial PRIMARY KEY, b int)")
            connection.commit()

            def writes(piped: bool) -> None:
                with connection.pipeline() if piped else contextlib.nullcontext():
                    connection.execute("SELECT 1").fetchone()
                    connection.execute("SELECT 1").fetchone()
                    for value in (1, 2, 3):
                        connection.execute("INSERT INTO t (b) VALUES (%s)", (value,))
                connection.commit()

            def reads(piped: bool) -> None:
                with connection.pipeline() if piped else contextlib.nullcontext():
                    for _ in range(3):
                        connection.execute("SELECT 1").fetchone()
                connection.commit()

            cases: dict[str, Callable[[], None]] = {
                "two reads, three inserts, plain": lambda: writes(False),
                "two reads, three inserts, pipeline": lambda: writes(True),
                "three reads, plain": lambda: reads(False),
                "three reads, pipeline": lambda: reads(True),
            }
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(repeats):
                for name, case in cases.items():
                    began = time.perf_counter()
                    case()
                    times[name].append((time.perf_counter() - began) * 1000)
    finally:
        drop()
    print(f"one transaction, {repeats} times each, interleaved; load average {os.getloadavg()[0]:.2f}")
    for name, values in times.items():
        values.sort()
        print(f"  {name:38} p50 {values[len(values) // 2]:.3f} ms  p90 {values[int(len(values) * 0.9)]:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="postgresql+psycopg://user@host:port/db to create the scratch databases from")
    parser.add_argument("-n", type=int, default=1000, help="repeats of each pipeline case")
    parser.add_argument("--only", choices=["trips", "pipeline"], help="run one measurement")
    args = parser.parse_args()
    if args.only in (None, "trips"):
        trips(args.url)
    if args.only in (None, "pipeline"):
        pipeline(args.url, args.n)


if __name__ == "__main__":
    main()
