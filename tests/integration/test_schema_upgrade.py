"""Sagas of OrderSaga v1 already in a store made before schema 2 finish on v1 unchanged, on SQLite and PostgreSQL.

The store is a real schema-1 database: the DDL committed in tests/fixtures (made from schema 1's models by
scripts/gen_schema_fixtures.py), with two sagas in flight written as schema 1's store wrote them (results
as JSON, compensations "", one outbox row keyed by the saga id alone). One waits at its first step; the
other's stock reservation really happened at the inventory service before the orchestrator starts, and its
card is declined, so it must unwind that reservation from the legacy state. The real stack then starts on
that database, migrates it in place and runs both to their end.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy

from devstack.launcher import ManagedProcess
from devstack.stack import LocalStack
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from svckit.idempotency_key import IDEMPOTENCY_HEADER, step_key
from tests.orchestrator_helpers import (
    Clients,
    connect,
    events,
    ledger_kinds,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# What the fixtures' schema_version row says (scripts/gen_schema_fixtures.py APPLIED_AT).
SCHEMA_1_APPLIED_AT = 1_764_633_600.0
V1_STEPS = ["reserve_stock", "charge_payment", "create_shipment", "send_confirmation"]
# Every event type schema 1's orchestrator could write: a v1 saga's history holds nothing else.
V1_EVENT_TYPES = {
    "SagaStarted",
    "StepSucceeded",
    "StepFailed",
    "StepRetryScheduled",
    "CompensationStarted",
    "CompensationSucceeded",
    "CompensationFailed",
    "CompensationRetryScheduled",
    "SagaCompleted",
    "SagaCompensated",
    "SagaNeedsAttention",
    "SagaPaused",
    "SagaResumed",
    "SagaCancelRequested",
    "SagaTerminated",
    "SagaRetried",
    "EffectAfterTerminate",
}
# Schema 1's default saga deadline (DEFAULT_SAGA_DEADLINE_SECONDS).
DEADLINE_SECONDS = 300.0
RESERVE_METHOD = "/sagasuite.inventory.v1.InventoryService/ReserveStock"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orchestrator-schema-1.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[sqlalchemy.Engine]:
    """The test's own connection to the orchestrator's database, holding schema 1 as its fixture creates it."""
    engine = sqlalchemy.create_engine(database_url)
    dialect = "postgresql" if engine.dialect.name == "postgresql" else "sqlite"
    fixture = (FIXTURES / f"orchestrator_schema_1.{dialect}.sql").read_text()
    code = "\n".join(line for line in fixture.splitlines() if not line.startswith("--"))
    with engine.begin() as connection:
        for statement in filter(None, (part.strip() for part in code.split(";\n"))):
            connection.exec_driver_sql(statement.removesuffix(";"))
    yield engine
    engine.dispose()


# -- the sagas, as schema 1's store wrote them --------------------------------------------------


@dataclass
class LegacySaga:
    """One saga in flight as schema 1 left it: its row, its history so far and its one outbox row."""

    saga_id: str
    order: pb.PlaceOrderRequest
    step_index: int
    results: dict[str, bytes]
    # (type, step, attempt, code) of the history written so far, after SagaStarted.
    history: list[tuple[str, str, int, str]]
    lease_owner: str | None
    lease_expires_at: float


def write_legacy(connection: sqlalchemy.Connection, saga: LegacySaga, created_at: float, now: float) -> None:
    payload = saga.order.SerializeToString(deterministic=True)
    history = [("SagaStarted", "", 0, ""), *saga.history]
    connection.execute(
        sqlalchemy.text(
            "INSERT INTO saga (saga_id, saga_type, version, business_key, input, input_hash, status, paused,"
            " cancel_requested, step_index, compensations, results, last_error, trace_context, event_seq,"
            " deadline_at, created_at, updated_at, ended_at) VALUES (:saga_id, 'OrderSaga', 1, :business_key,"
            " :input, :input_hash, 'RUNNING', :no, :no, :step_index, '', :results, '', '', :event_seq,"
            " :deadline_at, :created_at, :updated_at, NULL)"
        ),
        {
            "saga_id": saga.saga_id,
            "business_key": saga.order.order_id,
            "input": payload,
            "input_hash": hashlib.sha256(payload).hexdigest(),
            "no": False,
            "step_index": saga.step_index,
            "results": json.dumps({name: base64.b64encode(data).decode() for name, data in saga.results.items()}),
            "event_seq": len(history),
            "deadline_at": created_at + DEADLINE_SECONDS,
            "created_at": created_at,
            "updated_at": created_at + 0.01 * len(history),
        },
    )
    for seq, (event_type, step, attempt, code) in enumerate(history, start=1):
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO saga_event (saga_id, seq, at, type, step, attempt, code, message, duration_ms, actor)"
                " VALUES (:saga_id, :seq, :at, :type, :step, :attempt, :code, :message, :duration_ms, 'orchestrator')"
            ),
            {
                "saga_id": saga.saga_id,
                "seq": seq,
                "at": created_at + 0.01 * seq,
                "type": event_type,
                "step": step,
                "attempt": attempt,
                "code": code,
                "message": "OrderSaga v1" if event_type == "SagaStarted" else "",
                "duration_ms": 3.25 if event_type == "StepSucceeded" else 0.0,
            },
        )
    connection.execute(
        sqlalchemy.text(
            "INSERT INTO outbox (saga_id, step_index, direction, attempt, first_attempt_at, uncertain, due_at,"
            " lease_owner, lease_expires_at, created_at) VALUES (:saga_id, :step_index, 'action', 1, :at, :no,"
            " :at, :lease_owner, :lease_expires_at, :at)"
        ),
        {
            "saga_id": saga.saga_id,
            "step_index": saga.step_index,
            "at": now - 1.0,
            "no": False,
            "lease_owner": saga.lease_owner,
            "lease_expires_at": saga.lease_expires_at,
        },
    )


def reserve_at_inventory(data_dir: Path, saga_id: str, order: pb.PlaceOrderRequest) -> tuple[bytes, int]:
    """ReserveStock as schema 1's orchestrator sent it, on the inventory service the stack starts later.

    Returns the response bytes as received, and the stock available of the order's one SKU before.
    """
    # The stack runs inventory with DATA_DIR <data_dir>/inventory: this process keeps its database there.
    env = {"HOST": "127.0.0.1", "PORT": "0", "DATA_DIR": str(data_dir / "inventory")}
    inventory = ManagedProcess("inventory", "inventory_svc", env, data_dir / "logs").start()
    try:
        with grpc.insecure_channel(inventory.address) as channel:
            (sku,) = {item.sku for item in order.items}
            stock = channel.unary_unary(
                "/sagasuite.inventory.v1.InventoryService/GetStock",
                request_serializer=inventory_pb.GetStockRequest.SerializeToString,
                response_deserializer=inventory_pb.GetStockResponse.FromString,
            )
            (level,) = stock(inventory_pb.GetStockRequest(skus=[sku]), timeout=10).levels
            # No response deserializer: the bytes are stored as the orchestrator stores them.
            reserve = channel.unary_unary(RESERVE_METHOD, request_serializer=None, response_deserializer=None)
            request = inventory_pb.ReserveStockRequest(order_id=order.order_id, items=order.items)
            key = step_key(saga_id, "reserve_stock", "action")
            response: bytes = reserve(
                request.SerializeToString(deterministic=True), timeout=10, metadata=((IDEMPOTENCY_HEADER, key),)
            )
            (reserved,) = stock(inventory_pb.GetStockRequest(skus=[sku]), timeout=10).levels
            assert reserved.available == level.available - sum(item.quantity for item in order.items)
    finally:
        inventory.stop()
    assert inventory_pb.ReserveStockResponse.FromString(response).reservation.order_id == order.order_id
    return response, level.available


# -- reading the database ----------------------------------------------------------------------


def schema_versions(engine: sqlalchemy.Engine) -> list[tuple[int, float]]:
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT version, applied_at FROM schema_version ORDER BY version")
        return [(int(version), float(applied_at)) for version, applied_at in rows]


def layout(engine: sqlalchemy.Engine) -> dict[str, Any]:
    inspector = sqlalchemy.inspect(engine)
    return {
        "saga": {column["name"] for column in inspector.get_columns("saga")},
        "outbox": {column["name"] for column in inspector.get_columns("outbox")},
        "outbox_key": inspector.get_pk_constraint("outbox")["constrained_columns"],
        "outbox_key_name": inspector.get_pk_constraint("outbox")["name"],
        "tables": set(inspector.get_table_names()),
    }


def outbox_rows(engine: sqlalchemy.Engine, saga_ids: list[str]) -> int:
    with engine.connect() as connection:
        query = sqlalchemy.text("SELECT count(*) FROM outbox WHERE saga_id IN :ids").bindparams(
            sqlalchemy.bindparam("ids", expanding=True)
        )
        return int(connection.execute(query, {"ids": saga_ids}).scalar_one())


# -- the checks ----------------------------------------------------------------------------------


def story(saga: pb.Saga) -> list[tuple[str, str, str]]:
    """The history without retries: each StepRetryScheduled and the failure it retries."""
    history = events(saga)
    retried = {n - 1 for n, event in enumerate(history) if event[0] == "StepRetryScheduled"}
    return [event for n, event in enumerate(history) if event[0] != "StepRetryScheduled" and n not in retried]


def assert_v1_only(saga: pb.Saga) -> None:
    assert saga.definition_version == 1, render(saga)
    assert [step.name for step in saga.steps] == V1_STEPS, render(saga)
    assert {step.kind for step in saga.steps} == {"call"}, render(saga)
    assert not {step.group for step in saga.steps} - {""}, render(saga)
    assert {event.type for event in saga.history} <= V1_EVENT_TYPES, render(saga)
    assert not saga.children and not saga.waits and not saga.parent_saga_id, render(saga)


async def check_completed(clients: Clients, saga_id: str, order: pb.PlaceOrderRequest) -> pb.Saga:
    saga = await wait_for(clients, saga_id, {"COMPLETED", "COMPENSATED", "NEEDS_ATTENTION"}, within=90)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert_v1_only(saga)
    assert story(saga) == [
        ("SagaStarted", "", ""),
        *[("StepSucceeded", step, "OK") for step in V1_STEPS],
        ("SagaCompleted", "", ""),
    ], render(saga)
    # The event schema 1 wrote is still the first, with its message.
    assert (saga.history[0].seq, saga.history[0].message) == (1, "OrderSaga v1"), render(saga)
    assert [step.state for step in saga.steps] == ["succeeded"] * 4, render(saga)
    assert (await clients.reservation(order.order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert ledger_kinds(await clients.ledger(order.order_id)) == ["CHARGE"]
    assert (await clients.shipment(order.order_id)).order_id == order.order_id
    return saga


async def check_compensated(
    clients: Clients, saga_id: str, order: pb.PlaceOrderRequest, available_before: int
) -> pb.Saga:
    saga = await wait_for(clients, saga_id, {"COMPLETED", "COMPENSATED", "NEEDS_ATTENTION"}, within=90)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert_v1_only(saga)
    assert story(saga) == [
        ("SagaStarted", "", ""),
        ("StepSucceeded", "reserve_stock", "OK"),
        ("StepFailed", "charge_payment", "FAILED_PRECONDITION"),
        ("CompensationStarted", "", ""),
        ("CompensationSucceeded", "reserve_stock", "OK"),
        ("SagaCompensated", "", ""),
    ], render(saga)
    # The reservation made before the upgrade was released once, and by its compensation key alone.
    compensations = [e for e in saga.history if e.type.startswith("Compensation") and e.step]
    assert [(e.type, e.step, e.attempt) for e in compensations] == [("CompensationSucceeded", "reserve_stock", 1)]
    assert {step.name: step.state for step in saga.steps} == {
        "reserve_stock": "compensated",
        "charge_payment": "failed",
        # Steps an ended saga never reached read as skipped, as they did on schema 1.
        "create_shipment": "skipped",
        "send_confirmation": "skipped",
    }, render(saga)
    assert (await clients.reservation(order.order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    (sku,) = {item.sku for item in order.items}
    assert (await clients.stock(sku)).available == available_before
    # Declined: no charge, so nothing to refund either.
    assert (await refused(clients.payment_of(order.order_id))).code() == grpc.StatusCode.NOT_FOUND
    assert await clients.ledger(order.order_id) == []
    assert (await refused(clients.shipment(order.order_id))).code() == grpc.StatusCode.NOT_FOUND
    return saga


def history_of(saga: pb.Saga) -> list[tuple[int, str, str, int, str]]:
    return [(e.seq, e.type, e.step, e.attempt, e.code) for e in saga.history]


async def test_v1_sagas_of_a_schema_1_store_finish_on_v1_after_the_upgrade(
    tmp_path: Path, database: sqlalchemy.Engine, database_url: str
) -> None:
    data_dir = tmp_path / "stack"
    assert schema_versions(database) == [(1, SCHEMA_1_APPLIED_AT)]
    before = layout(database)
    assert "progress" not in before["saga"] and "track" not in before["outbox"], before
    assert before["outbox_key"] == ["saga_id"], before

    # Its orchestrator stopped gracefully, which gives up every lease.
    at_step_0 = LegacySaga(uuid.uuid4().hex, order_request(new_order_id("legacy-step-0")), 0, {}, [], None, 0.0)
    declined = order_request(new_order_id("legacy-step-1"), items=[("TEE-007", 3)], token="tok_declined")
    declined_id = uuid.uuid4().hex
    reserved, available_before = reserve_at_inventory(data_dir, declined_id, declined)
    now = time.time()
    # Its orchestrator died holding the charge: the lease it left has expired.
    at_step_1 = LegacySaga(
        declined_id,
        declined,
        1,
        {"reserve_stock": reserved},
        [("StepSucceeded", "reserve_stock", 1, "OK")],
        "schema-1-replica:50050",
        now - 5.0,
    )
    with database.begin() as connection:
        write_legacy(connection, at_step_0, now - 10.0, now)
        write_legacy(connection, at_step_1, now - 20.0, now)

    stack: LocalStack = start_stack(data_dir, database_url=database_url)
    try:
        async with connect(stack) as clients:
            completed = await check_completed(clients, at_step_0.saga_id, at_step_0.order)
            compensated = await check_compensated(clients, at_step_1.saga_id, declined, available_before)

        versions = schema_versions(database)
        assert [version for version, _ in versions] == [1, 2, 3], versions
        assert versions[0] == (1, SCHEMA_1_APPLIED_AT) and versions[1][1] >= now, versions
        after = layout(database)
        assert {"parent_id", "progress"} <= after["saga"], after
        assert {"track", "wait_until"} <= after["outbox"], after
        assert sorted(after["outbox_key"]) == ["saga_id", "track"], after
        if database.dialect.name == "postgresql":
            # Named as in a database created at schema 2, so a later migration finds it by name.
            assert after["outbox_key_name"] == "outbox_pkey", after
        assert "outbox_v1" not in after["tables"], after
        assert outbox_rows(database, [at_step_0.saga_id, at_step_1.saga_id]) == 0

        # A second start finds schema 2 and migrates nothing: the rows stay, the sagas read the same.
        assert stack.orchestrator is not None
        stack.orchestrator.stop()
        stack.orchestrator.restart()
        async with connect(stack) as clients:
            assert history_of(await clients.saga(at_step_0.saga_id)) == history_of(completed)
            assert history_of(await clients.saga(at_step_1.saga_id)) == history_of(compensated)
        assert schema_versions(database) == versions
        assert layout(database) == after
    finally:
        stack.stop()
