"""svckit.idempotency on real SQLite and PostgreSQL: atomic effects, replays, refusals, and keyed() servicer methods."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue
from sqlalchemy import Connection, func, insert, select, update
from sqlmodel import Field, SQLModel

from svckit.db import Database
from svckit.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    IdempotencyKeyReused,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from svckit.idempotency import Effect as KeyedEffect
from svckit.idempotency import IdempotencyRecord, IdempotencyStore, KeyedServicer, OrderEffectRefusal, keyed
from svckit.server import RpcServer

RETENTION_SECONDS = 3600.0


class _EffectRow(SQLModel, table=True):
    """One applied effect: a row the guarded call writes."""

    __tablename__ = "test_idempotency_store_effect_row"

    id: int | None = Field(default=None, primary_key=True)
    note: str


_EFFECTS = _EffectRow.__table__  # type: ignore[attr-defined]
_RECORDS = IdempotencyRecord.__table__  # type: ignore[attr-defined]


class Effect:
    """A guarded effect that writes one row and answers with its id; counts how often it ran."""

    def __init__(self, note: str = "charge", *, fail_with: Exception | None = None, seconds: float = 0.0) -> None:
        self.note = note
        self.fail_with = fail_with
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, connection: Connection) -> Int64Value:
        with self._lock:
            self.calls += 1
        row_id = connection.execute(insert(_EFFECTS).values(note=self.note).returning(_EFFECTS.c.id)).scalar_one()
        if self.seconds:
            time.sleep(self.seconds)
        if self.fail_with is not None:
            raise self.fail_with
        return Int64Value(value=row_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'idempotency.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def _open(url: str) -> Database:
    database = Database(url)
    SQLModel.metadata.create_all(database.engine, tables=[_RECORDS, _EFFECTS])
    return database


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    database = _open(database_url)
    yield database
    database.close()


@pytest.fixture
def store(database: Database) -> IdempotencyStore:
    return IdempotencyStore(database, retention_seconds=RETENTION_SECONDS)


def _effect_rows(database: Database) -> list[str]:
    with database.engine.connect() as connection:
        return list(connection.execute(select(_EFFECTS.c.note).order_by(_EFFECTS.c.id)).scalars())


def _record_keys(database: Database) -> list[str]:
    with database.engine.connect() as connection:
        return list(connection.execute(select(_RECORDS.c.key).order_by(_RECORDS.c.key)).scalars())


def _request(text: str = "order-1") -> StringValue:
    return StringValue(value=text)


async def _run(
    store: IdempotencyStore,
    key: str,
    effect: Callable[[Connection], Int64Value],
    request: StringValue | None = None,
    method: str = "Charge",
    deadline: float | None = None,
) -> Any:
    return await store.execute(key, method, request or _request(), effect, Int64Value, deadline=deadline)


async def test_effect_and_record_commit_together(store: IdempotencyStore, database: Database) -> None:
    effect = Effect()
    result = await _run(store, "k-1", effect)
    assert not result.replayed
    assert isinstance(result.response, Int64Value) and result.response.value > 0
    assert effect.calls == 1
    assert _effect_rows(database) == ["charge"]
    assert _record_keys(database) == ["k-1"]


async def test_error_in_the_effect_after_its_write_leaves_neither(store: IdempotencyStore, database: Database) -> None:
    with pytest.raises(RuntimeError, match="crash after write"):
        await _run(store, "k-1", Effect(fail_with=RuntimeError("crash after write")))
    assert _effect_rows(database) == []
    assert _record_keys(database) == []
    # Nothing was recorded, so the same key runs the effect on the next try.
    result = await _run(store, "k-1", Effect())
    assert not result.replayed
    assert _effect_rows(database) == ["charge"]


async def test_error_writing_the_record_rolls_back_the_effect(store: IdempotencyStore, database: Database) -> None:
    # A trigger in the database itself refuses the record, after the effect has been written.
    with database.engine.begin() as connection:
        if database.is_postgres:
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse_record() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'record write failed'; END $$ LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_record "
                "FOR EACH ROW EXECUTE FUNCTION refuse_record()"
            )
        else:
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_record "
                "BEGIN SELECT RAISE(ABORT, 'record write failed'); END"
            )
    effect = Effect()
    with pytest.raises(Exception, match="record write failed"):
        await _run(store, "k-1", effect)
    assert effect.calls >= 1
    assert _effect_rows(database) == []
    assert _record_keys(database) == []


async def test_replay_returns_the_stored_response_without_running_the_effect(
    store: IdempotencyStore, database: Database
) -> None:
    first = await _run(store, "k-1", Effect())
    again_effect = Effect("must not run")
    again = await _run(store, "k-1", again_effect)
    assert again.replayed
    assert again.response == first.response
    assert again_effect.calls == 0
    assert _effect_rows(database) == ["charge"]
    # Another key is another call.
    other = await _run(store, "k-2", Effect("second"), request=_request("order-2"))
    assert not other.replayed and other.response != first.response


def _describe(error: DomainError) -> tuple[Any, ...]:
    return (
        type(error),
        error.code,
        error.message,
        getattr(error, "reason", None),
        getattr(error, "metadata", None),
        getattr(error, "violations", None),
        [detail.SerializeToString() for detail in error.details()],
    )


async def _assert_refusal_replays(store: IdempotencyStore, database: Database, refusal: DomainError) -> None:
    key = f"refused-{type(refusal).__name__}"
    rows_before = _effect_rows(database)
    with pytest.raises(DomainError) as first:
        await _run(store, key, Effect(fail_with=refusal))
    assert first.value is refusal
    # The refusal is on record; the writes the effect made before refusing are not.
    assert key in _record_keys(database)
    assert _effect_rows(database) == rows_before

    again_effect = Effect("must not run")
    with pytest.raises(DomainError) as again:
        await _run(store, key, again_effect)
    assert again_effect.calls == 0
    assert _describe(again.value) == _describe(refusal)


async def test_refusal_is_stored_and_replayed_with_the_same_reason(store: IdempotencyStore, database: Database) -> None:
    for refusal in (
        FailedPrecondition("OUT_OF_STOCK", "LAMP-3 has 1 left", {"sku": "LAMP-3"}),
        NotFound("ORDER_NOT_FOUND", "no order order-1"),
        AlreadyExists("ALREADY_SHIPPED", "order-1 was shipped"),
        InvalidArgument([FieldViolation("items[0].quantity", "must be at least 1"), FieldViolation("x", "y")]),
    ):
        await _assert_refusal_replays(store, database, refusal)
    assert _effect_rows(database) == []


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(PermissionDenied("NOT_ALLOWED", "no refunds for you"), id="permission-denied"),
        pytest.param(Unauthenticated("NO_CREDENTIALS", "who are you"), id="unauthenticated"),
    ],
)
async def test_access_refusal_replays_with_its_own_code(
    store: IdempotencyStore, database: Database, refusal: DomainError
) -> None:
    await _assert_refusal_replays(store, database, refusal)


async def test_same_key_with_a_different_request_is_refused(store: IdempotencyStore, database: Database) -> None:
    await _run(store, "k-1", Effect(), request=_request("order-1"))
    for request, method in ((_request("order-2"), "Charge"), (_request("order-1"), "Refund")):
        effect = Effect("must not run")
        with pytest.raises(IdempotencyKeyReused) as caught:
            await _run(store, "k-1", effect, request=request, method=method)
        assert effect.calls == 0
        assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
        assert caught.value.metadata == {"idempotency_key": "k-1"}
        assert "k-1" in caught.value.message
    assert _effect_rows(database) == ["charge"]


async def test_a_passed_deadline_rolls_everything_back(store: IdempotencyStore, database: Database) -> None:
    with pytest.raises(DeadlineExceeded):
        await _run(store, "k-1", Effect(), deadline=time.monotonic() - 1)
    # The deadline passes while the effect works.
    with pytest.raises(DeadlineExceeded):
        await _run(store, "k-2", Effect(seconds=0.05), deadline=time.monotonic() + 0.01)
    # A refusal reached after the deadline is not recorded either.
    with pytest.raises(DeadlineExceeded):
        await _run(store, "k-3", Effect(fail_with=FailedPrecondition("NO", "no")), deadline=time.monotonic() - 1)
    assert _effect_rows(database) == []
    assert _record_keys(database) == []
    # Nothing was recorded, so a retry with time to spare runs the effect.
    result = await _run(store, "k-1", Effect(), deadline=time.monotonic() + 30)
    assert not result.replayed
    assert _effect_rows(database) == ["charge"]


async def test_a_deadline_passed_before_the_work_starts_runs_no_effect(store: IdempotencyStore) -> None:
    # A call queued past its deadline (behind a batch, or retried after a deadlock) takes no locks.
    effect = Effect()
    with pytest.raises(DeadlineExceeded, match="before the work started"):
        await _run(store, "k-late", effect, deadline=time.monotonic() - 1)
    assert effect.calls == 0


async def test_delete_expired_removes_only_records_older_than_the_retention(
    store: IdempotencyStore, database: Database
) -> None:
    for key in ("old-1", "old-2", "edge", "new"):
        await _run(store, key, Effect(key), request=_request(key))
    now = time.time()
    ages = {"old-1": RETENTION_SECONDS * 2, "old-2": RETENTION_SECONDS + 60, "edge": RETENTION_SECONDS - 60}
    with database.engine.begin() as connection:
        for key, age in ages.items():
            connection.execute(update(_RECORDS).where(_RECORDS.c.key == key).values(created_at=now - age))
    assert await store.delete_expired() == 2
    assert _record_keys(database) == ["edge", "new"]
    assert await store.delete_expired() == 0
    # A forgotten key is a new call; a kept one still replays.
    assert not (await _run(store, "old-1", Effect("again"), request=_request("old-1"))).replayed
    assert (await _run(store, "edge", Effect("must not run"), request=_request("edge"))).replayed


async def test_concurrent_duplicates_on_one_store_execute_once(store: IdempotencyStore, database: Database) -> None:
    effect = Effect(seconds=0.002)
    results = await asyncio.gather(*(_run(store, "k-1", effect) for _ in range(20)))
    assert effect.calls == 1
    assert sum(not result.replayed for result in results) == 1
    assert len({result.response.value for result in results}) == 1
    assert _effect_rows(database) == ["charge"]
    assert _record_keys(database) == ["k-1"]


def test_two_processes_worth_of_stores_execute_each_key_once(database: Database, database_url: str) -> None:
    """Two Database/IdempotencyStore pairs on two threads (as two replicas would) race on the same keys."""
    keys = [f"k-{index}" for index in range(10)]
    barrier = threading.Barrier(2)
    responses: dict[int, dict[str, int]] = {}
    failures: list[BaseException] = []

    def replica(number: int) -> None:
        try:
            other = _open(database_url)
            try:
                store = IdempotencyStore(other, retention_seconds=RETENTION_SECONDS)
                effect = Effect(f"replica-{number}", seconds=0.005)

                async def run_all() -> dict[str, int]:
                    barrier.wait(timeout=30)
                    results = await asyncio.gather(*(_run(store, key, effect, _request(key)) for key in keys))
                    return {key: result.response.value for key, result in zip(keys, results, strict=True)}

                responses[number] = asyncio.run(run_all())
            finally:
                other.close()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=replica, args=(number,)) for number in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert responses[1] == responses[2]
    assert len(_effect_rows(database)) == len(keys)
    assert _record_keys(database) == sorted(keys)
    with database.engine.connect() as connection:
        applied = set(connection.execute(select(_EFFECTS.c.id)).scalars())
        assert applied == set(responses[1].values())
        assert connection.execute(select(func.count()).select_from(_RECORDS)).scalar_one() == len(keys)


class _Aborted(Exception):
    """What the fake context's abort() raises, as grpc's own does: the call ends there."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _CallContext:
    """The little of a grpc.aio.ServicerContext that rpc() reads: metadata, the deadline, abort."""

    def __init__(self, key: str) -> None:
        self._metadata = (("idempotency-key", key),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        raise _Aborted(code, details)


class _Parts:
    """What a servicer takes from its service process."""

    def __init__(self, database: Database, store: IdempotencyStore) -> None:
        self.database = database
        self.idempotency = store
        self.rpc_server = RpcServer()


class _Servicer(KeyedServicer):
    """One keyed method, its effect swapped per test; counts the commits it is told of."""

    def __init__(self, parts: _Parts, effect: Effect) -> None:
        super().__init__(parts)
        self.effect = effect
        self.commits = 0

    def _committed(self) -> None:
        self.commits += 1

    @keyed(Int64Value, committed=_committed)
    def Charge(self, request: StringValue) -> KeyedEffect[Int64Value]:
        if not request.value:
            raise InvalidArgument.of("value", "is required")
        return self.effect


async def _charge(servicer: _Servicer, key: str, request: StringValue) -> Int64Value:
    response: Int64Value = await servicer.Charge(request, _CallContext(key))
    return response


async def test_a_keyed_method_runs_its_effect_once_and_is_told_of_that_commit_only(
    store: IdempotencyStore, database: Database
) -> None:
    servicer = _Servicer(_Parts(database, store), Effect())
    first = await _charge(servicer, "k-1", _request())
    again = await _charge(servicer, "k-1", _request())
    assert again == first
    assert servicer.effect.calls == 1
    assert servicer.commits == 1  # a replay is not a commit of this call
    assert _effect_rows(database) == ["charge"]
    with pytest.raises(_Aborted) as reused:
        await _charge(servicer, "k-1", _request("order-2"))
    assert reused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.effect.calls == 1 and servicer.commits == 1


async def test_a_keyed_method_refuses_before_the_transaction_and_is_not_told_of_a_refusal(
    store: IdempotencyStore, database: Database
) -> None:
    servicer = _Servicer(_Parts(database, store), Effect(fail_with=FailedPrecondition("OUT_OF_STOCK", "none left")))
    with pytest.raises(_Aborted) as invalid:
        await _charge(servicer, "k-bad", _request(""))
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.effect.calls == 0
    assert _record_keys(database) == []  # a request refused at the edge leaves no record
    for _ in range(2):  # the refusal, then its replay
        with pytest.raises(_Aborted) as refused:
            await _charge(servicer, "k-refused", _request())
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.effect.calls == 1
    assert servicer.commits == 0
    assert _record_keys(database) == ["k-refused"]


class _Undone(OrderEffectRefusal):
    REASON = "ORDER_UNDONE"
    MESSAGE = "order {order_id} was undone; it cannot be done again"


class _Done(OrderEffectRefusal):
    REASON = "ORDER_ALREADY_DONE"
    MESSAGE = "order {order_id} already has thing {record_id}"
    RECORD_ID = "thing_id"


def test_an_order_effect_refusal_says_its_reason_and_names_its_record_only_when_told() -> None:
    undone, done = _Undone("order-1", "thing-7"), _Done("order-1", "thing-7")
    assert (undone.reason, undone.message, undone.metadata) == (
        "ORDER_UNDONE",
        "order order-1 was undone; it cannot be done again",
        {"order_id": "order-1"},
    )
    assert (done.reason, done.message, done.metadata) == (
        "ORDER_ALREADY_DONE",
        "order order-1 already has thing thing-7",
        {"order_id": "order-1", "thing_id": "thing-7"},
    )
    assert done.code == undone.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (done.order_id, done.record_id) == ("order-1", "thing-7")
