"""svckit.db.Database under faults on SQLite and PostgreSQL: poison units, lost commits, lock order, schema races."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy
from sqlalchemy import Column, Connection, Integer, MetaData, String, Table, insert, select, update
from sqlmodel import SQLModel

import inventory_svc.models
import notify_svc.models
import orchestrator.models
import payment_svc.models
import shipping_svc.models
import svckit.idempotency
from svckit.db import Database, declare_row_locks
from svckit.errors import CommitOutcomeUnknown, DatabaseUnavailable, RetryableError
from tests.orchestrator_helpers import fresh_postgres_database
from tests.pg_proxy import CommitFault, PgProxy

# Every table the suite's processes create, so that the schema race below has them all to fight over.
_ALL_MODELS = (inventory_svc.models, notify_svc.models, orchestrator.models, payment_svc.models, shipping_svc.models)
assert _ALL_MODELS and svckit.idempotency

_METADATA = MetaData()
_ITEM = Table(
    "db_faults_item",
    _METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Room for 100 characters, refused past 40 by a CHECK: a value the store cannot hold.
    Column("name", String(100), nullable=False),
    sqlalchemy.CheckConstraint("length(name) <= 40", name="ck_db_faults_item_name"),
)
_COUNTER = Table(
    "db_faults_counter",
    _METADATA,
    Column("name", String(10), primary_key=True),
    Column("value", Integer, nullable=False),
)
_GOOD_UNITS = 40


@pytest.fixture(params=["sqlite-inline", "sqlite-thread", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'faults.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url, inline=request.param == "sqlite-inline")
    _METADATA.create_all(database.engine)
    _install_poisons(database)
    yield database
    database.close()


def _install_poisons(database: Database) -> None:
    """Database-side poisons keyed by a unit's name: one fails the COMMIT, one (SQLite) kills the transaction."""
    with database.engine.begin() as connection:
        if database.is_postgres:
            # Checked at COMMIT: the statement succeeds, the whole transaction's COMMIT fails.
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse_at_commit() RETURNS trigger AS $$ BEGIN "
                "IF NEW.name LIKE 'commit-poison%%' THEN RAISE EXCEPTION 'refused at commit: %%', NEW.name; END IF; "
                "RETURN NULL; END $$ LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON db_faults_item "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit()"
            )
        else:
            # A deferred foreign key is checked at COMMIT, and a RAISE(ROLLBACK) ends the whole transaction.
            connection.exec_driver_sql("CREATE TABLE db_faults_parent (name TEXT PRIMARY KEY)")
            connection.exec_driver_sql(
                "CREATE TABLE db_faults_link (name TEXT REFERENCES db_faults_parent(name) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER link_commit_poison AFTER INSERT ON db_faults_item "
                "WHEN NEW.name LIKE 'commit-poison%' BEGIN INSERT INTO db_faults_link VALUES (NEW.name); END"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER rollback_poison BEFORE INSERT ON db_faults_item WHEN NEW.name LIKE 'rollback-poison%' "
                "BEGIN SELECT RAISE(ROLLBACK, 'poison ended the transaction'); END"
            )


def _insert(name: str) -> Callable[[Connection], int]:
    def work(connection: Connection) -> int:
        return int(connection.execute(insert(_ITEM).values(name=name).returning(_ITEM.c.id)).scalar_one())

    return work


def _insert_then_fail(connection: Connection) -> int:
    connection.execute(insert(_ITEM).values(name="python-poison"))
    raise RuntimeError("the unit failed after its write")


def _insert_swallowing_an_error(connection: Connection) -> int:
    """A unit that catches a failed statement itself, without a savepoint, and carries on."""
    connection.execute(insert(_ITEM).values(name="swallow-poison"))
    try:
        connection.exec_driver_sql("SELECT 1/0")
    except sqlalchemy.exc.DBAPIError:
        pass
    return 0


def _names(database: Database) -> list[str]:
    with database.engine.connect() as connection:
        return sorted(connection.execute(select(_ITEM.c.name)).scalars())


async def _in_one_batch(database: Database, works: list[Callable[[Connection], Any]]) -> list[Any]:
    """Run works as units of one batch: a gate unit holds the database thread while they queue."""
    gate = threading.Event()
    gate_task = None
    if not database.inline:
        gate_task = asyncio.ensure_future(database.transaction(lambda _c: gate.wait(30)))
        await asyncio.sleep(0.05)  # the gate unit is on the database thread now
    tasks = [asyncio.ensure_future(database.transaction(work)) for work in works]
    await asyncio.sleep(0)  # every unit is queued
    gate.set()
    if gate_task is not None:
        await gate_task
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_poison_units_fail_alone_and_the_rest_of_their_batch_commits(database: Database) -> None:
    poisons: dict[str, Callable[[Connection], Any]] = {
        "check": _insert("check-poison-" + "x" * 60),  # refused by the CHECK constraint
        "python": _insert_then_fail,
        "swallowed": _insert_swallowing_an_error,
        "commit": _insert("commit-poison-1"),  # refused only when the batch commits
    }
    if database.is_postgres:
        poisons["nul"] = _insert("nul-poison-\x00")  # PostgreSQL text cannot hold NUL
    else:
        poisons["rollback"] = _insert("rollback-poison-1")  # ends SQLite's whole transaction
    good = [f"good-{index}" for index in range(_GOOD_UNITS)]
    works: list[Callable[[Connection], Any]] = [_insert(name) for name in good[:20]]
    works += list(poisons.values())
    works += [_insert(name) for name in good[20:]]
    results = await _in_one_batch(database, works)

    good_results = results[:20] + results[20 + len(poisons) :]
    failures = [result for result in good_results if isinstance(result, BaseException)]
    assert not failures, f"{len(failures)} good units failed, e.g. {failures[0]!r}"
    poison_results = dict(zip(poisons, results[20 : 20 + len(poisons)], strict=True))
    if not database.is_postgres:
        # On SQLite a swallowed statement error leaves the transaction intact: that unit is fine.
        assert not isinstance(poison_results.pop("swallowed"), BaseException)
        good.append("swallow-poison")
    for name, result in poison_results.items():
        assert isinstance(result, BaseException), f"poison unit {name} succeeded"
    # Everything reported done is durable, and nothing of a failed unit is.
    assert _names(database) == sorted(good)


async def test_a_batch_whose_connection_breaks_before_commit_runs_again(postgres_url: str) -> None:
    proxy = PgProxy().start()
    database = Database(proxy.url(postgres_url))
    try:
        _METADATA.create_all(database.engine)
        reached = threading.Event()
        go_on = threading.Event()
        attempts = []

        def work(connection: Connection) -> int:
            attempts.append(1)
            connection.execute(insert(_ITEM).values(name="after-cut"))
            if len(attempts) == 1:
                reached.set()
                go_on.wait(30)
            return int(connection.execute(select(sqlalchemy.func.count()).select_from(_ITEM)).scalar_one())

        task = asyncio.ensure_future(database.transaction(work))
        assert await asyncio.to_thread(reached.wait, 30)
        proxy.cut_all()  # the transaction is open, nothing committed: the server rolls it back
        await asyncio.sleep(0.2)
        go_on.set()
        assert await task == 1
        assert len(attempts) == 2
        assert _names(database) == ["after-cut"]
    finally:
        database.close()
        proxy.close()


@pytest.mark.parametrize(
    ("fault", "committed"),
    [(CommitFault.DROP_COMMIT_REPLY, True), (CommitFault.CUT_BEFORE_COMMIT, False)],
    ids=["reply-dropped", "cut-before-commit"],
)
async def test_a_lost_commit_is_an_unknown_outcome_not_a_failure(
    postgres_url: str, fault: CommitFault, committed: bool
) -> None:
    proxy = PgProxy().start()
    database = Database(proxy.url(postgres_url))
    try:
        _METADATA.create_all(database.engine)
        proxy.arm(fault)
        with pytest.raises(CommitOutcomeUnknown) as unknown:
            await database.transaction(_insert("lost"))
        assert isinstance(unknown.value, RetryableError)
        assert unknown.value.code == grpc.StatusCode.UNAVAILABLE
        assert "retry with the same idempotency key" in unknown.value.message
        assert _names(database) == (["lost"] if committed else [])
        # The broken connection is replaced: the next unit commits normally.
        assert await database.transaction(_insert("next")) > 0
        assert _names(database) == sorted(["next", *(["lost"] if committed else [])])
    finally:
        database.close()
        proxy.close()


async def test_an_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    proxy = PgProxy().start()
    url = proxy.url("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    proxy.close()  # nothing listens on the port any more
    database = Database(url)
    try:
        with pytest.raises(DatabaseUnavailable) as unavailable:
            await database.transaction(lambda c: c.exec_driver_sql("SELECT 1").scalar())
        assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        database.close()


def test_processes_creating_the_schema_together_do_not_collide(postgres_admin_url: str) -> None:
    """Several processes (here: threads, each with its own engine) start on an empty database at once."""
    creators = 6
    for attempt in range(10):
        with fresh_postgres_database(postgres_admin_url) as url:
            barrier = threading.Barrier(creators)
            errors: list[BaseException] = []

            def create(
                url: str = url, barrier: threading.Barrier = barrier, errors: list[BaseException] = errors
            ) -> None:
                database = Database(url)
                try:
                    barrier.wait(30)
                    database.create_schema()
                except BaseException as error:
                    errors.append(error)
                finally:
                    database.close()

            threads = [threading.Thread(target=create) for _ in range(creators)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, f"try {attempt + 1}: {errors[0]!r}"
            engine = sqlalchemy.create_engine(url)
            try:
                tables = set(sqlalchemy.inspect(engine).get_table_names())
            finally:
                engine.dispose()
            assert set(SQLModel.metadata.tables) <= tables


def _deadlocks_detected(url: str) -> int:
    """PostgreSQL's deadlock count for the database, once every other client has left (their stats are flushed then)."""
    name = url.rsplit("/", 1)[1]
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            others = sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
            )
            for _ in range(300):
                if not connection.execute(others, {"name": name}).scalar_one():
                    break
                threading.Event().wait(0.1)
            query = sqlalchemy.text("SELECT deadlocks FROM pg_stat_database WHERE datname = :name")
            return int(connection.execute(query, {"name": name}).scalar_one())
    finally:
        engine.dispose()


async def test_batches_of_two_processes_take_shared_row_locks_in_one_order(postgres_url: str) -> None:
    """Two batches that each lock x and y, in opposite orders, on two "processes" (Databases) at once."""
    first, second = Database(postgres_url), Database(postgres_url)
    try:
        _METADATA.create_all(first.engine)
        with first.engine.begin() as connection:
            connection.execute(insert(_COUNTER), [{"name": "x", "value": 0}, {"name": "y", "value": 0}])
        both_hold_one = threading.Barrier(2, timeout=30)

        def bump(name: str, *, then_wait: bool = False) -> Callable[[Connection], str]:
            def work(connection: Connection) -> str:
                declare_row_locks(connection, [f"counter/{name}"])
                connection.execute(update(_COUNTER).where(_COUNTER.c.name == name).values(value=_COUNTER.c.value + 1))
                if then_wait:
                    both_hold_one.wait()  # each batch now holds its first row
                return name

            return work

        results = await asyncio.gather(
            _in_one_batch(first, [bump("x", then_wait=True), bump("y")]),
            _in_one_batch(second, [bump("y", then_wait=True), bump("x")]),
        )
        assert list(results) == [["x", "y"], ["y", "x"]]
    finally:
        first.close()
        second.close()
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert dict(connection.execute(select(_COUNTER.c.name, _COUNTER.c.value)).all()) == {"x": 2, "y": 2}
    finally:
        engine.dispose()
    # The second batch's "x" came after its "y": it was put back and led the next batch instead of waiting.
    assert _deadlocks_detected(postgres_url) == 0
