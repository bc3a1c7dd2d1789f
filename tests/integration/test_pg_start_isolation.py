"""A start that loses a business-key race is answered with the winner's saga at every isolation level.

At REPEATABLE READ and SERIALIZABLE the losing transaction's snapshot never shows the winner's saga:
trying again in that transaction (after a savepoint) fails the same way, so the dispatcher hands
the conflict to svckit.db, which runs the batch again in a new transaction, where the lookup finds
the winner. Before that the loser was answered UNAVAILABLE ("the saga store met a conflict; retry").

The race is made deterministic: an outside transaction inserts the key's saga and holds its COMMIT
until both replicas' starts wait on the unique index behind it (pg_blocking_pids), so both lose.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from orchestrator import store
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import SagaState, Status
from orchestrator.sagas.order import ORDER_SAGA
from svckit.db import Database
from tests.orchestrator_helpers import fresh_postgres_database
from tests.unit.test_dispatcher_batch import order, running

# Generous: the machine may be busy; every wait ends as soon as its condition holds.
WITHIN = 30.0
SNAPSHOT_LEVELS = ["REPEATABLE READ", "SERIALIZABLE"]


@pytest.fixture(params=[*SNAPSHOT_LEVELS, "READ COMMITTED"], ids=lambda level: level.lower().replace(" ", "_"))
def level_url(request: pytest.FixtureRequest, postgres_admin_url: str) -> Iterator[tuple[str, str]]:
    """A fresh store whose database runs every transaction at one isolation level."""
    level: str = request.param
    with fresh_postgres_database(postgres_admin_url) as url:
        admin = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            name = url.rsplit("/", 1)[1]
            connection.execute(text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{level.lower()}'"))
        admin.dispose()
        database = Database(url)
        try:
            store.ensure_schema(database)
        finally:
            database.close()
        yield level, url


@pytest.fixture
async def replicas(level_url: tuple[str, str]) -> AsyncIterator[tuple[list[Dispatcher], list[Database]]]:
    _, url = level_url
    databases = [Database(url), Database(url)]
    started: list[Dispatcher] = []
    try:
        for replica, database in zip(("replica-a", "replica-b"), databases, strict=True):
            dispatcher, _ = await running(database, replica_id=replica)
            started.append(dispatcher)
        yield started, databases
    finally:
        for dispatcher in started:
            await dispatcher.stop(5)
        for database in databases:
            database.close()


def _saga_of(key: str, saga_id: str) -> SagaState:
    now = time.time()
    return SagaState(
        saga_id=saga_id,
        saga_type=ORDER_SAGA.name,
        version=ORDER_SAGA.version,
        business_key=key,
        input=order(key).SerializeToString(deterministic=True),
        status=Status.RUNNING,
        deadline_at=now + 300,
        created_at=now,
        updated_at=now,
    )


def _blocked_backends(url: str) -> int:
    watcher = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with watcher.connect() as connection:
            query = text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"
            )
            return int(connection.execute(query).scalar_one())
    finally:
        watcher.dispose()


async def test_two_starts_that_both_lose_the_key_race_are_answered_with_the_winner(
    level_url: tuple[str, str], replicas: tuple[list[Dispatcher], list[Database]]
) -> None:
    level, url = level_url
    dispatchers, _ = replicas
    key = "order-race"
    payload = order(key).SerializeToString(deterministic=True)
    winner = create_engine(url, poolclass=NullPool)
    try:
        with winner.connect() as connection:
            transaction = connection.begin()
            store.insert_saga(connection, _saga_of(key, "saga-winner"), hashlib.sha256(payload).hexdigest())
            starts = [asyncio.ensure_future(d.start_saga(ORDER_SAGA, key, order(key), 300)) for d in dispatchers]
            deadline = time.monotonic() + WITHIN
            # Both starts looked the key up (nothing committed yet) and now wait on the unique index.
            while await asyncio.to_thread(_blocked_backends, url) < 2:
                assert time.monotonic() < deadline, "the two starts never waited behind the winner"
                assert not any(start.done() for start in starts), [start.result() for start in starts if start.done()]
                await asyncio.sleep(0.01)
            transaction.commit()
        replies = await asyncio.wait_for(asyncio.gather(*starts, return_exceptions=True), WITHIN)
    finally:
        winner.dispose()
    for reply in replies:
        assert not isinstance(reply, BaseException), f"{level}: {reply!r}"
        saga, created = reply
        assert (saga.saga_id, created) == ("saga-winner", False), level


async def test_two_replicas_starting_the_same_keys_answer_each_start_with_its_one_saga(
    level_url: tuple[str, str], replicas: tuple[list[Dispatcher], list[Database]]
) -> None:
    level, _ = level_url
    dispatchers, databases = replicas
    keys = [f"order-{n}" for n in range(20)]
    replies = await asyncio.gather(
        *(d.start_saga(ORDER_SAGA, key, order(key), 300) for key in keys for d in dispatchers),
        return_exceptions=True,
    )
    rows = databases[0].transaction_sync(lambda c: c.execute(text("SELECT business_key, saga_id FROM saga")).all())
    sagas = {str(key): str(saga_id) for key, saga_id in rows}
    assert sorted(sagas) == sorted(keys)
    for key, reply in zip([key for key in keys for _ in dispatchers], replies, strict=True):
        # No start is told to retry: the loser of each race is given the winner's saga.
        assert not isinstance(reply, BaseException), f"{level}: {reply!r}"
        assert reply[0].saga_id == sagas[key]
    deadline = time.monotonic() + WITHIN
    while (ended := _completed(databases[0])) != len(keys):
        assert time.monotonic() < deadline, f"{ended} of {len(keys)} sagas completed"
        await asyncio.sleep(0.05)


def _completed(database: Database) -> int:
    query = text("SELECT count(*) FROM saga WHERE status = 'COMPLETED'")
    return int(database.transaction_sync(lambda c: c.execute(query).scalar_one()))
