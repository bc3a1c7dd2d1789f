"""Metrics and logs an operator can use, from a real stack: /metrics of every process, WARNING lines, quiet polling."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from devstack.launcher import ManagedProcess, ProcessFailed
from devstack.otlp_receiver import KIND_SERVER, OtlpReceiver
from devstack.stack import LocalStack, StackConfig
from orchestrator import store
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from svckit.db import Database
from tests.contract.test_dashboard import PROMETHEUS_SERIES, SERIES_SUFFIXES, dashboard_metric_names
from tests.grpc_helpers import keyed
from tests.orchestrator_helpers import (
    OPERATOR_TOKEN,
    connect,
    frozen,
    new_order_id,
    order_request,
    refused,
    status_name,
    wait_for,
    wait_until,
)

_METRICS_PORT = re.compile(r"METRICS port=(\d+)")
# The first confirmation of a "flaky-" order fails once and is retried; that of a "stuck-" order is
# refused for good, so its saga stops in NEEDS_ATTENTION (and again after each operator retry).
FAULTS = {
    "notify": (
        "SendConfirmation:fail_first=1,order_contains=flaky-;"
        "SendConfirmation:error_rate=1,code=FAILED_PRECONDITION,order_contains=stuck-"
    ),
}
ORCHESTRATOR_SERVICE = "sagasuite.orchestrator.v1.OrchestratorService"
# The polled, read-only calls of svckit.telemetry.DEFAULT_QUIET_METHODS, by the span name the instrumentation gives.
QUIET_SPANS = frozenset(
    {
        f"/{ORCHESTRATOR_SERVICE}/GetSagaStats",
        f"/{ORCHESTRATOR_SERVICE}/ListSagas",
        f"/{ORCHESTRATOR_SERVICE}/GetSaga",
        f"/{ORCHESTRATOR_SERVICE}/ListDefinitions",
        "/grpc.health.v1.Health/Check",
    }
)
QUIET_METHODS = ("GetSagaStats", "ListSagas", "GetSaga", "ListDefinitions")


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalStack]:
    config = StackConfig(
        tmp_path_factory.mktemp("metrics"),
        # Traced, to show which calls get no span; exported at once, so a test waits for little.
        common_env={
            "METRICS_PORT": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
        orchestrator_env={"OUTBOX_METRICS_INTERVAL_SECONDS": "0.1", "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}"},
        service_env={name: {"FAULTS": spec} for name, spec in FAULTS.items()},
    )
    with LocalStack(config) as started:
        yield started


def metrics_port(process: ManagedProcess) -> int:
    """The port the process printed on its METRICS line (the latest start's)."""
    ports = _METRICS_PORT.findall(process.log_path.read_text())
    assert ports, f"{process.name} printed no METRICS line:\n{process.log_tail()}"
    return int(ports[-1])


class Scrape:
    """One scrape of a process's /metrics, parsed."""

    def __init__(self, process: ManagedProcess) -> None:
        url = f"http://127.0.0.1:{metrics_port(process)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            self.text = response.read().decode()
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of name whose labels include the given ones (0 when there is none)."""
        return sum(v for n, sample_labels, v in self.samples if n == name and labels.items() <= sample_labels.items())


def scrape_all(stack: LocalStack) -> dict[str, Scrape]:
    return {name: Scrape(process) for name, process in stack.processes().items()}


def delta(before: dict[str, Scrape], after: dict[str, Scrape], process: str, name: str, **labels: str) -> float:
    return after[process].value(name, **labels) - before[process].value(name, **labels)


async def test_counts_match_a_known_set_of_sagas(stack: LocalStack) -> None:
    before = scrape_all(stack)
    async with connect(stack) as clients:
        saga_ids = [
            await clients.place(order_request(new_order_id("plain"))),
            await clients.place(order_request(new_order_id("plain"))),
            await clients.place(order_request(new_order_id("flaky"))),
        ]
        declined = await clients.place(order_request(new_order_id("declined"), token="tok_declined"))
        for saga_id in saga_ids:
            await wait_for(clients, saga_id, {"COMPLETED"})
        await wait_for(clients, declined, {"COMPENSATED"})
    after = scrape_all(stack)

    def orchestrator(name: str, **labels: str) -> float:
        return delta(before, after, "orchestrator", name, **labels)

    saga = {"saga_type": "OrderSaga"}
    assert orchestrator("sagasuite_sagas_started_total", **saga) == 4
    assert orchestrator("sagasuite_sagas_completed_total", **saga) == 3
    assert orchestrator("sagasuite_sagas_compensated_total", **saga) == 1
    assert orchestrator("sagasuite_sagas_needs_attention_total", **saga) == 0
    assert orchestrator("sagasuite_saga_completion_seconds_count", status="COMPLETED") == 3
    assert orchestrator("sagasuite_saga_completion_seconds_count", status="COMPENSATED") == 1
    assert orchestrator("sagasuite_saga_start_seconds_count", method="PlaceOrder") == 4
    assert orchestrator("sagasuite_rpc_calls_total", method="PlaceOrder", code="OK") == 4
    assert orchestrator("sagasuite_saga_step_retries_total", step="send_confirmation", direction="action") == 1
    assert orchestrator("sagasuite_saga_step_retries_total") == 1

    def steps(step: str, direction: str, code: str) -> float:
        return orchestrator("sagasuite_saga_step_seconds_count", step=step, direction=direction, code=code)

    assert steps("reserve_stock", "action", "OK") == 4
    assert steps("charge_payment", "action", "OK") == 3
    assert steps("charge_payment", "action", "FAILED_PRECONDITION") == 1
    assert steps("reserve_stock", "compensation", "OK") == 1
    assert steps("create_shipment", "action", "OK") == 3
    assert steps("send_confirmation", "action", "UNAVAILABLE") == 1
    assert steps("send_confirmation", "action", "OK") == 3
    assert orchestrator("sagasuite_saga_step_seconds_count") == 4 + 4 + 1 + 3 + 4

    def calls(process: str, method: str, code: str) -> float:
        return delta(before, after, process, "sagasuite_rpc_calls_total", method=method, code=code)

    assert calls("inventory", "ReserveStock", "OK") == 4
    assert calls("inventory", "ReleaseStock", "OK") == 1
    assert calls("payment", "Charge", "OK") == 3
    assert calls("payment", "Charge", "FAILED_PRECONDITION") == 1
    assert calls("shipping", "CreateShipment", "OK") == 3
    assert calls("notify", "SendConfirmation", "UNAVAILABLE") == 1
    assert calls("notify", "SendConfirmation", "OK") == 3
    assert delta(before, after, "notify", "sagasuite_rpc_duration_seconds_count", method="SendConfirmation") == 4
    for name in ("inventory", "payment", "shipping", "notify"):
        assert delta(before, after, name, "sagasuite_rpc_idempotent_replays_total") == 0


async def test_rpc_series_name_the_service_that_answered_and_no_created_series_are_exported(stack: LocalStack) -> None:
    async with connect(stack) as clients:
        # One saga: every process answers at least one call.
        await wait_for(clients, await clients.place(order_request(new_order_id("plain"))), {"COMPLETED"})
    rpc_series = ("sagasuite_rpc_calls_total", "sagasuite_rpc_duration_seconds_count")
    for process, scrape in scrape_all(stack).items():
        services = {labels.get("service") for name, labels, _ in scrape.samples if name in rpc_series}
        assert services == {process}, f"{process}: {services}"
        assert "_created" not in scrape.text, f"{process} exports _created series"


async def test_a_service_counts_idempotent_replays(stack: LocalStack) -> None:
    before = scrape_all(stack)
    order_id = new_order_id("replayed")
    request = payment_pb.ChargeRequest(
        order_id=order_id, amount=Money(currency_code="EUR", minor_units=500), payment_token="tok_visa"
    )
    async with connect(stack) as clients:
        first = await clients.payment.Charge(request, metadata=keyed(f"key-{order_id}"))
        again = await clients.payment.Charge(request, metadata=keyed(f"key-{order_id}"))
    assert again == first
    after = scrape_all(stack)
    assert delta(before, after, "payment", "sagasuite_rpc_calls_total", method="Charge", code="OK") == 2
    assert delta(before, after, "payment", "sagasuite_rpc_idempotent_replays_total", method="Charge") == 1


async def test_outbox_and_in_flight_gauges_follow_a_call_on_the_wire(stack: LocalStack) -> None:
    async with connect(stack) as clients:

        async def on_the_wire() -> bool:
            scrape = Scrape(stack.processes()["orchestrator"])
            return (
                scrape.value("sagasuite_dispatcher_in_flight_calls") >= 1
                and scrape.value("sagasuite_outbox_due_commands") >= 1
                and scrape.value("sagasuite_outbox_oldest_due_age_seconds") > 0
            )

        # Shipping is frozen: the shipment call stays on the wire (and is retried) until the gauges show it.
        with frozen(stack.services["shipping"]):
            saga_id = await clients.place(order_request(new_order_id("slow")))
            await wait_until(on_the_wire, "the stuck shipment call in the orchestrator's gauges")
        await wait_for(clients, saga_id, {"COMPLETED"})

        async def drained() -> bool:
            scrape = Scrape(stack.processes()["orchestrator"])
            return (
                scrape.value("sagasuite_dispatcher_in_flight_calls") == 0
                and scrape.value("sagasuite_outbox_due_commands") == 0
                and scrape.value("sagasuite_outbox_oldest_due_age_seconds") == 0
            )

        await wait_until(drained, "empty outbox gauges once every saga has ended")


def test_metrics_are_off_unless_a_port_is_set(start_process: object) -> None:
    process = start_process("notify_svc", "notify-no-metrics")  # type: ignore[operator]
    assert "METRICS port=" not in process.log_path.read_text()


# -- NEEDS_ATTENTION: one WARNING line per stop, and a gauge ----------------------------------------


def warnings_about(process: ManagedProcess, saga_id: str) -> list[str]:
    return [line for line in process.log_path.read_text().splitlines() if " WARNING " in line and saga_id in line]


async def test_a_saga_that_needs_attention_is_logged_once_per_stop_and_counted_in_a_gauge(stack: LocalStack) -> None:
    orchestrator = stack.processes()["orchestrator"]
    attention = {"saga_type": "OrderSaga"}
    before = Scrape(orchestrator).value("sagasuite_sagas_needing_attention", **attention)
    order_id = new_order_id("stuck")
    async with connect(stack) as clients:
        saga_id = await clients.place(order_request(order_id))
        await wait_for(clients, saga_id, {"NEEDS_ATTENTION"})

        async def counted(expected: float) -> bool:
            return Scrape(orchestrator).value("sagasuite_sagas_needing_attention", **attention) == expected

        await wait_until(lambda: counted(before + 1), "the stopped saga in the needs-attention gauge")
        (line,) = warnings_about(orchestrator, saga_id)
        for part in (f"saga {saga_id} ", "OrderSaga", order_id, "at step send_confirmation", "FAILED_PRECONDITION"):
            assert part in line, f"{part!r} not in {line}"

        # Rounds of the metrics loop and polls of the saga pass; a retry that fails again is a second stop.
        await clients.orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id), timeout=10)

        def stopped_twice(saga: pb.Saga) -> bool:
            stops = [event for event in saga.history if event.type == "SagaNeedsAttention"]
            return status_name(saga.status) == "NEEDS_ATTENTION" and len(stops) == 2

        await wait_for(clients, saga_id, stopped_twice)

        async def second_line() -> bool:
            return len(warnings_about(orchestrator, saga_id)) >= 2

        await wait_until(second_line, "the second stop's WARNING line")
        await wait_until(lambda: counted(before + 1), "the gauge after the second stop: one saga, not one per stop")
        assert len(warnings_about(orchestrator, saga_id)) == 2

        await clients.orchestrator.TerminateSaga(
            pb.TerminateSagaRequest(saga_id=saga_id, reason="test over"), timeout=10
        )
        await wait_until(lambda: counted(before), "the gauge once the saga is terminated")


def test_the_needs_attention_count_reads_an_index_not_the_saga_table(tmp_path: Path) -> None:
    """At 100k sagas a scan of the table on SQLite blocks the event loop: the gauge's query must not scan."""
    database = Database(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    try:
        store.ensure_schema(database)
        statements: list[tuple[str, Any]] = []

        def capture(_conn: object, _cursor: object, statement: str, parameters: Any, *_: object) -> None:
            statements.append((statement, parameters))

        event.listen(database.engine, "before_cursor_execute", capture)
        database.transaction_sync(store.needs_attention_by_type)
        event.remove(database.engine, "before_cursor_execute", capture)
        (statement, parameters) = statements[-1]
        plan = database.transaction_sync(
            lambda connection: [
                str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            ]
        )
    finally:
        database.close()
    assert any("USING" in step and "INDEX" in step for step in plan), plan
    assert not [step for step in plan if step.startswith("SCAN saga")], plan


# -- polling stays out of the log and the traces, and in the metrics --------------------------------------


async def test_polled_reads_and_health_checks_log_no_info_line_and_make_no_span(
    stack: LocalStack, receiver: OtlpReceiver
) -> None:
    orchestrator = stack.processes()["orchestrator"]
    before = Scrape(orchestrator)
    async with connect(stack) as clients:
        health = health_pb2_grpc.HealthStub(clients.channels[0])
        for _ in range(5):
            await clients.orchestrator.GetSagaStats(pb.GetSagaStatsRequest(), timeout=10)
            await clients.orchestrator.ListSagas(pb.ListSagasRequest(page_size=5), timeout=10)
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        await clients.orchestrator.ListDefinitions(pb.ListDefinitionsRequest(), timeout=10)
        # A refused read still says so at INFO.
        unknown = "0" * 32
        missing = await refused(clients.orchestrator.GetSaga(pb.GetSagaRequest(saga_id=unknown), timeout=10))
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        # A call that changes something, after them: its line and span come after theirs.
        order_id = new_order_id("after-polling")
        saga_id = await clients.place(order_request(order_id))
        await wait_for(clients, saga_id, {"COMPLETED"})
    place_order = f"/{ORCHESTRATOR_SERVICE}/PlaceOrder"
    spans = receiver.wait_for(
        lambda found: any(s.name == place_order and s.attributes.get("saga.id") == saga_id for s in found),
        what="the PlaceOrder span of the order placed after the polling",
    )
    quiet = sorted(f"{s.service}:{s.name}" for s in spans if s.kind == KIND_SERVER and s.name in QUIET_SPANS)
    assert not quiet, quiet
    lines = orchestrator.log_path.read_text().splitlines()
    assert any("method=PlaceOrder " in line and "code=OK" in line for line in lines)
    for method in QUIET_METHODS:
        # Not these calls' only: every GetSaga the module's tests polled with, since the stack started.
        logged = [line for line in lines if f"method={method} " in line and " code=OK " in line]
        assert not logged, f"{method} logged at INFO:\n" + "\n".join(logged[:5])
    assert any("method=GetSaga key=- code=NOT_FOUND" in line for line in lines)
    # Every call is counted all the same.
    after = Scrape(orchestrator)

    def calls(method: str, code: str = "OK") -> float:
        labels = {"service": "orchestrator", "method": method, "code": code}
        return after.value("sagasuite_rpc_calls_total", **labels) - before.value("sagasuite_rpc_calls_total", **labels)

    assert calls("GetSagaStats") == 5 and calls("ListSagas") == 5 and calls("ListDefinitions") == 1
    assert calls("GetSaga", "NOT_FOUND") == 1


def test_a_quiet_method_that_is_not_a_full_name_stops_the_process(start_process: object) -> None:
    with pytest.raises(ProcessFailed) as failed:
        start_process("notify_svc", "notify-bad-quiet", QUIET_METHODS="GetSagaStats")  # type: ignore[operator]
    assert "configuration error" in str(failed.value) and "QUIET_METHODS: 'GetSagaStats'" in str(failed.value)
    assert "Traceback" not in str(failed.value)


# -- the Grafana dashboard asks for what the processes export -----------------------------------------


def test_every_metric_the_dashboard_queries_is_served_by_a_process_of_the_stack(stack: LocalStack) -> None:
    served: set[str] = set()
    for scrape in scrape_all(stack).values():
        for family in text_string_to_metric_families(scrape.text):
            # A labelled metric nobody has touched yet is served as its HELP and TYPE lines alone.
            served |= {family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",))}
            served |= {sample.name for sample in family.samples}
    missing = dashboard_metric_names() - served - PROMETHEUS_SERIES
    assert not missing, f"the dashboard queries metrics no process serves: {sorted(missing)}"
