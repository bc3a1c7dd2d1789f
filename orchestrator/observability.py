"""Saga traces and metrics of the orchestrator: spans that outlive its processes, and Prometheus counters.

One trace per saga. PlaceOrder/StartSaga runs inside the gRPC server span (the caller's traceparent
is its parent); under it the servicer opens the saga span `saga <SagaType>`, whose W3C traceparent
is stored in the saga row (`SagaState.trace_context`) in the same transaction that creates the
saga. Every step attempt is a span `step <name>` (or `compensate <name>`) whose parent is that
stored context, so the attempt is in the saga's trace whichever replica, or whichever incarnation
of one after a kill -9, makes the call; the gRPC client span and the service's server span hang
below it.

Why the saga span is emitted at the start and not at the end: a saga outlives processes, and an
OpenTelemetry span can only be exported by the process that ends it. Ending the saga span when
the start has committed (its duration is the start's handling) means it is exported at once by
the replica that started the saga, with the identity every later step span refers to: the trace
never has orphan step spans while a saga runs, waits for an operator for days, or is resumed
elsewhere, and nothing depends on private SDK hooks to re-create a span with a stored id. The
saga's whole lifetime is shown by a second span, `saga <SagaType> outcome`, child of the saga span,
emitted by whichever replica records the end (COMPLETED, COMPENSATED, TERMINATED) or the stop at
NEEDS_ATTENTION, with its start time set to the saga's creation and attribute saga.status. A
replica killed with calls on the wire loses those step spans (they never ended); the service
spans of those calls still arrive, and the resent attempt gets a new step span in the same trace.

Span attributes: saga.id, saga.type, and order.id (the business key of an OrderSaga; other saga
types carry saga.business_key); the saga span adds saga.version, the step spans saga.step,
saga.attempt, idempotency.key and rpc.grpc.status_code (their name tells action from compensation),
the outcome span saga.status and saga.last_error. Step spans carry no more than that on purpose:
they are the hot path of tracing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Gauge, Histogram

from orchestrator import store
from orchestrator.definition import DefinitionRegistry
from orchestrator.dispatcher import Dispatcher, DispatchObserver
from orchestrator.engine import WAIT_END_EVENTS, Event, Outcome, SagaState, Transition
from orchestrator.status import Direction, EventType, SagaStatus, WaitKind
from svckit.db import Database
from svckit.discovery import Resolver
from svckit.idempotency_key import step_key
from svckit.metrics import LATENCY_BUCKETS
from svckit.telemetry import Tracing

__all__ = ["Observability", "SagaSpan"]

log = logging.getLogger("sagasuite.observability")

_COMPLETION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)

SAGAS_STARTED = Counter("sagasuite_sagas_started", "Sagas started by this replica", ["saga_type"])
SAGAS_COMPLETED = Counter("sagasuite_sagas_completed", "Sagas this replica saw complete", ["saga_type"])
SAGAS_COMPENSATED = Counter("sagasuite_sagas_compensated", "Sagas this replica saw end compensated", ["saga_type"])
SAGAS_NEEDS_ATTENTION = Counter(
    "sagasuite_sagas_needs_attention", "Sagas this replica stopped for an operator (NEEDS_ATTENTION)", ["saga_type"]
)
SAGAS_TERMINATED = Counter("sagasuite_sagas_terminated", "Sagas terminated by an operator", ["saga_type"])
SAGA_START_SECONDS = Histogram(
    "sagasuite_saga_start_seconds",
    "Time to handle PlaceOrder/StartSaga: validate, record the saga and its first command",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
SAGA_COMPLETION_SECONDS = Histogram(
    "sagasuite_saga_completion_seconds",
    "Time from a saga's start to its end, by final status",
    ["saga_type", "status"],
    buckets=_COMPLETION_BUCKETS,
)
STEP_SECONDS = Histogram(
    "sagasuite_saga_step_seconds",
    "Duration of one call of a step (one attempt), by step, direction and gRPC outcome code",
    ["saga_type", "step", "direction", "code"],
    buckets=LATENCY_BUCKETS,
)
STEP_RETRIES = Counter(
    "sagasuite_saga_step_retries", "Retries scheduled after a failed call", ["saga_type", "step", "direction"]
)
OUTBOX_DUE = Gauge("sagasuite_outbox_due_commands", "Outbox commands due now, waiting to be claimed or on the wire")
OUTBOX_OLDEST_DUE_AGE = Gauge("sagasuite_outbox_oldest_due_age_seconds", "How long the oldest due command has been due")
IN_FLIGHT_CALLS = Gauge("sagasuite_dispatcher_in_flight_calls", "Service calls on the wire from this replica")
SAGAS_DEFINITION_MISSING = Gauge(
    "sagasuite_sagas_definition_missing",
    "Sagas not ended whose definition this replica has not loaded (they wait in NEEDS_ATTENTION, DEFINITION_MISSING)",
    ["saga_type", "version"],
)
SAGAS_WAITING = Gauge(
    "sagasuite_sagas_waiting", "Waits (timers, signals, approvals, children) pending, by kind", ["kind"]
)
SAGAS_NEEDING_ATTENTION = Gauge(
    "sagasuite_sagas_needing_attention",
    "Sagas stopped in NEEDS_ATTENTION now, waiting for an operator, by type (read from the database)",
    ["saga_type"],
)
APPROVALS_PENDING = Gauge("sagasuite_approvals_pending", "Approvals waiting for a decision")
OLDEST_APPROVAL_AGE = Gauge("sagasuite_oldest_approval_age_seconds", "How long the oldest pending approval has waited")
APPROVAL_REMINDERS = Counter(
    "sagasuite_approval_reminders", "Approvals that waited past their reminder threshold", ["saga_type", "step"]
)
SIGNALS_RECEIVED = Counter("sagasuite_signals_received", "Signals received by SignalSaga", ["duplicate"])
SIGNAL_DELIVERY_SECONDS = Histogram(
    "sagasuite_signal_delivery_seconds",
    "From a signal's (or decision's) arrival to the wait consuming it",
    ["saga_type"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 60, 3600, float("inf")),
)
SERVICE_UNRESOLVABLE = Gauge(
    "sagasuite_service_unresolvable",
    "1 while a service that a loaded definition calls has no address (static) or no healthy instance (Consul)",
    ["service"],
)
TIMER_LATENESS_SECONDS = Histogram(
    "sagasuite_timer_lateness_seconds",
    "How late a timer fired after its wake-up time",
    ["saga_type"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 30, float("inf")),
)

_ENDING_EVENTS = {
    EventType.SAGA_COMPLETED: SagaStatus.COMPLETED,
    EventType.SAGA_COMPENSATED: SagaStatus.COMPENSATED,
    EventType.SAGA_TERMINATED: SagaStatus.TERMINATED,
    EventType.SAGA_NEEDS_ATTENTION: SagaStatus.NEEDS_ATTENTION,
}
_COUNTERS = {
    SagaStatus.COMPLETED: SAGAS_COMPLETED,
    SagaStatus.COMPENSATED: SAGAS_COMPENSATED,
    SagaStatus.TERMINATED: SAGAS_TERMINATED,
    SagaStatus.NEEDS_ATTENTION: SAGAS_NEEDS_ATTENTION,
}
_RETRY_EVENTS = {
    EventType.STEP_RETRY_SCHEDULED: Direction.ACTION,
    EventType.COMPENSATION_RETRY_SCHEDULED: Direction.COMPENSATION,
}
_START_METHODS = frozenset({"PlaceOrder", "StartSaga"})
_WAIT_SCAN_EVERY = 12
_PROPAGATOR = TraceContextTextMapPropagator()


def _saga_attributes(saga_type: str, business_key: str) -> dict[str, Any]:
    key = "order.id" if saga_type == "OrderSaga" else "saga.business_key"
    return {"saga.type": saga_type, key: business_key}


def _no_instance_reader(resolver: Resolver, service: str) -> Callable[[], float]:
    """1.0 while `resolver` knows no instance of `service`; read in the metrics server's thread at each
    scrape, which is safe because addresses() never blocks and only reads."""

    def read() -> float:
        return 0.0 if resolver.addresses(service) else 1.0

    return read


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class SagaSpan:
    """The span of a saga being started: its traceparent goes into the saga row."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        self.trace_context = carrier.get("traceparent", "")

    def finish(self, saga: SagaState, created: bool) -> None:
        """End the span once the saga is recorded; a start that found an existing saga emits none."""
        server_span = trace.get_current_span()
        server_span.set_attribute("saga.id", saga.saga_id)
        server_span.set_attribute("saga.created", created)
        if created:
            self._span.set_attribute("saga.id", saga.saga_id)
            self._span.set_attribute("saga.version", saga.version)
            self._span.end()


class Observability(DispatchObserver):
    """Tracing and metrics of the orchestrator; either may be off, and both cost nothing when off."""

    def __init__(self, tracing: Tracing | None, *, metrics: bool) -> None:
        self._tracer = tracing.tracer("sagasuite.orchestrator") if tracing is not None else None
        self._metrics = metrics
        self._step_seconds: dict[tuple[str, str, str, str], Histogram] = {}
        self._start_seconds: dict[str, Histogram] = {}
        # Definitions found missing at start, whose saga counts the outbox watch keeps current.
        self._missing_definitions: set[tuple[str, int]] = set()
        # The definitions, to tell a wait's kind from its step for the waiting-sagas gauges.
        self._registry: DefinitionRegistry | None = None
        # Every saga type the needs-attention gauge has had a series for: a type with none left reads 0.
        self._attention_types: set[str] = set()
        # The last check of the services the definitions call: those that could not be resolved, and all.
        self._unresolvable: dict[str, str] = {}
        self._checked_services: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self._tracer is not None or self._metrics

    @property
    def tracing(self) -> bool:
        return self._tracer is not None

    # -- wiring ------------------------------------------------------------------------------

    def observer(self) -> DispatchObserver | None:
        """The dispatcher observer, or None when there is nothing to observe."""
        return self if self.enabled else None

    def wrap_call(self) -> Any:
        """The dispatcher's wrap_call hook (a step span around each call), or None with tracing off."""
        return self._step_span if self._tracer is not None else None

    def bind(self, dispatcher: Dispatcher) -> None:
        """Report the dispatcher's in-flight calls, read at scrape time."""
        self._registry = dispatcher.registry
        if self._metrics:
            IN_FLIGHT_CALLS.set_function(lambda: dispatcher.in_flight)

    async def watch_outbox(self, database: Database, interval: float) -> None:
        """Keep the outbox and needs-attention gauges current, the waits' every twelfth round (a background task)."""
        rounds = 0
        while True:
            try:
                # One transaction a round: the outbox's due index and the saga table's status index, each a range.
                (due, oldest_age), attention = await database.transaction(
                    lambda c: (store.outbox_depth(c, time.time()), store.needs_attention_by_type(c))
                )
                OUTBOX_DUE.set(due)
                OUTBOX_OLDEST_DUE_AGE.set(oldest_age)
                self._set_needing_attention(attention)
                # Waits are counted by one scan of their rows: every twelfth round, so that a
                # million parked sagas cost a scan a minute, not one every few seconds.
                rounds += 1
                if self._metrics and self._registry is not None and rounds % _WAIT_SCAN_EVERY == 1:
                    await self._report_waits(database)
                if self._missing_definitions:
                    missing = sorted(self._missing_definitions)
                    counts = await database.transaction(lambda c, keys=missing: store.count_not_ended(c, keys))  # type: ignore[misc]
                    self._set_missing(counts)
            except Exception:
                log.exception("reading the outbox depth failed; will try again")
            await asyncio.sleep(interval)

    def _set_needing_attention(self, counts: Mapping[str, int]) -> None:
        """One series per saga type: those counted, those loaded (0 rather than no data), those counted before."""
        if not self._metrics:
            return
        types = set(counts) | self._attention_types
        if self._registry is not None:
            types.update(self._registry.names())
        for saga_type in sorted(types):
            SAGAS_NEEDING_ATTENTION.labels(saga_type).set(counts.get(saga_type, 0))
        self._attention_types = types

    async def _report_waits(self, database: Database) -> None:
        assert self._registry is not None
        registry = self._registry
        rows = await database.transaction(store.waits_by_step)
        by_kind = {kind: 0 for kind in WaitKind}
        approvals, oldest = 0, 0.0
        now = time.time()
        for saga_type, version, step_index, count, since in rows:
            definition = registry.find(saga_type, version)
            if definition is None or step_index >= len(definition.nodes):
                continue
            kind = definition.node(step_index).node_kind
            if kind in by_kind:
                by_kind[WaitKind(kind)] += count
            if kind == WaitKind.APPROVAL:
                approvals += count
                oldest = max(oldest, now - since)
        for kind, count in by_kind.items():
            SAGAS_WAITING.labels(kind).set(count)
        APPROVALS_PENDING.set(approvals)
        OLDEST_APPROVAL_AGE.set(oldest)

    # -- services the definitions call ------------------------------------------------------

    @property
    def unresolvable_services(self) -> dict[str, str]:
        """The services the last `report_unresolvable` was told cannot be resolved, each with the reason."""
        return dict(self._unresolvable)

    def report_unresolvable(
        self,
        unresolvable: Mapping[str, str],
        callers: Mapping[str, Iterable[str]],
        resolver: Resolver | None = None,
    ) -> None:
        """Report a check of every service the definitions in force call (`svckit.discovery.unresolvable`).

        `callers` maps each of those services to the definitions that call it ("LoyaltySaga v1"), and
        `unresolvable` those that could not be resolved to the reason. Each unresolvable one gets a
        WARNING line naming it, its callers and the reason, with metrics on or off. The gauge
        `sagasuite_service_unresolvable` gets one series per service in `callers`; a service no longer
        called loses its series. Given the `resolver`, the gauge is read from it at each scrape, so it
        falls to 0 once an instance appears; otherwise it stays what this check found.
        """
        for service in sorted(unresolvable):
            called_by = ", ".join(sorted(callers.get(service, ()))) or "no loaded definition"
            log.warning(
                "service %r cannot be resolved (called by %s); its steps fail with UNAVAILABLE until it can: %s",
                service,
                called_by,
                unresolvable[service],
            )
        for service in sorted(set(self._unresolvable) - set(unresolvable)):
            if service in callers:
                log.info("service %r can be resolved now", service)
        self._unresolvable = dict(unresolvable)
        checked = set(callers) | set(unresolvable)
        if self._metrics:
            # Every series is made afresh: a series read from a resolver ignores set() ever after.
            for service in self._checked_services:
                with contextlib.suppress(KeyError):
                    SERVICE_UNRESOLVABLE.remove(service)
            for service in sorted(checked):
                gauge = SERVICE_UNRESOLVABLE.labels(service)
                if resolver is not None:
                    gauge.set_function(_no_instance_reader(resolver, service))
                else:
                    gauge.set(1.0 if service in unresolvable else 0.0)
        self._checked_services = checked

    def rpc_observer(self, method: str, code: str, elapsed_ms: float, replayed: bool) -> None:
        """An RpcServer observer: the start latency of PlaceOrder and StartSaga."""
        if method not in _START_METHODS:
            return
        histogram = self._start_seconds.get(method)
        if histogram is None:
            histogram = self._start_seconds[method] = SAGA_START_SECONDS.labels(method)
        histogram.observe(elapsed_ms / 1000)

    # -- spans ---------------------------------------------------------------------------------

    def begin_saga(self, saga_type: str, business_key: str) -> SagaSpan | None:
        """Open the saga span under the current (server) span, or None with tracing off."""
        if self._tracer is None:
            return None
        span = self._tracer.start_span(
            f"saga {saga_type}", kind=SpanKind.INTERNAL, attributes=_saga_attributes(saga_type, business_key)
        )
        return SagaSpan(span)

    @staticmethod
    def _saga_context(saga: SagaState) -> Context:
        if not saga.trace_context:
            # Started with tracing off: its spans are traces of their own.
            return Context()
        return _PROPAGATOR.extract({"traceparent": saga.trace_context}, context=Context())

    def _step_span(self, saga: SagaState, step: str, direction: str, attempt: int) -> AbstractContextManager[Any]:
        assert self._tracer is not None
        attributes = _saga_attributes(saga.saga_type, saga.business_key)
        attributes.update(
            {
                "saga.id": saga.saga_id,
                "saga.step": step,
                "saga.attempt": attempt,
                "idempotency.key": step_key(saga.saga_id, step, direction),
            }
        )
        name = f"step {step}" if direction == Direction.ACTION else f"compensate {step}"
        return self._tracer.start_as_current_span(
            name, context=self._saga_context(saga), kind=SpanKind.INTERNAL, attributes=attributes
        )

    def _outcome_span(self, saga: SagaState, status: str, now: float) -> None:
        assert self._tracer is not None
        attributes = _saga_attributes(saga.saga_type, saga.business_key)
        attributes.update({"saga.id": saga.saga_id, "saga.version": saga.version, "saga.status": status})
        if saga.last_error and status != SagaStatus.COMPLETED:
            attributes["saga.last_error"] = saga.last_error
        span = self._tracer.start_span(
            f"saga {saga.saga_type} outcome",
            context=self._saga_context(saga),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=_ns(saga.created_at),
        )
        if status == SagaStatus.NEEDS_ATTENTION:
            span.set_status(Status(StatusCode.ERROR, saga.last_error))
        span.end(end_time=_ns(saga.ended_at or now))

    # -- DispatchObserver --------------------------------------------------------------------

    def saga_started(self, saga: SagaState) -> None:
        if self._metrics:
            SAGAS_STARTED.labels(saga.saga_type).inc()

    def saga_changed(self, saga: SagaState, transition: Transition) -> None:
        for event in transition.events:
            status = _ENDING_EVENTS.get(event.type)
            if status is not None:
                if self._metrics:
                    _COUNTERS[status].labels(saga.saga_type).inc()
                    if status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
                        SAGA_COMPLETION_SECONDS.labels(saga.saga_type, status).observe(
                            max(0.0, (saga.ended_at or event.at) - saga.created_at)
                        )
                if self._tracer is not None:
                    self._outcome_span(saga, status, event.at)
            elif self._metrics and event.type in _RETRY_EVENTS:
                STEP_RETRIES.labels(saga.saga_type, event.step, _RETRY_EVENTS[event.type]).inc()
            elif self._metrics and event.type == EventType.APPROVAL_REMINDER:
                # The WARNING line is the dispatcher's: it is written with metrics off too.
                APPROVAL_REMINDERS.labels(saga.saga_type, event.step).inc()
            elif self._metrics and event.type == EventType.TIMER_FIRED:
                TIMER_LATENESS_SECONDS.labels(saga.saga_type).observe(event.duration_ms / 1000)
            elif self._metrics and event.type in (EventType.SIGNAL_CONSUMED, EventType.APPROVAL_DECIDED):
                SIGNAL_DELIVERY_SECONDS.labels(saga.saga_type).observe(event.duration_ms / 1000)

        if self._tracer is not None:
            for event in transition.events:
                if event.type in WAIT_END_EVENTS:
                    self._wait_span(saga, event)

    def _wait_span(self, saga: SagaState, event: Event) -> None:
        """A wait as one span under the saga's: from when it began to its end (fired, consumed, timed out)."""
        assert self._tracer is not None
        attributes = _saga_attributes(saga.saga_type, saga.business_key)
        attributes.update({"saga.id": saga.saga_id, "saga.step": event.step, "saga.wait.outcome": event.type})
        if event.code:
            attributes["saga.wait.code"] = event.code
        span = self._tracer.start_span(
            f"wait {event.step}",
            context=self._saga_context(saga),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=_ns(event.since or event.at),
        )
        if event.type == EventType.WAIT_TIMED_OUT:
            span.set_status(Status(StatusCode.ERROR, event.message))
        span.end(end_time=_ns(event.at))

    def child_trace_context(self, parent: SagaState, step: str, child_type: str) -> str:
        """A span for the parent's child step, under the parent's saga span: the child's spans go under it."""
        if self._tracer is None:
            return parent.trace_context
        attributes = _saga_attributes(parent.saga_type, parent.business_key)
        attributes.update({"saga.id": parent.saga_id, "saga.step": step, "saga.child.type": child_type})
        span = self._tracer.start_span(
            f"child {step}", context=self._saga_context(parent), kind=SpanKind.INTERNAL, attributes=attributes
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        span.end()
        return carrier.get("traceparent", parent.trace_context)

    def signal_received(self, name: str, duplicate: bool) -> None:
        if self._metrics:
            SIGNALS_RECEIVED.labels("true" if duplicate else "false").inc()

    def definitions_missing(self, counts: dict[tuple[str, int], int]) -> None:
        self._missing_definitions.update(counts)
        self._set_missing(counts)

    def _set_missing(self, counts: dict[tuple[str, int], int]) -> None:
        if self._metrics:
            for (saga_type, version), count in counts.items():
                SAGAS_DEFINITION_MISSING.labels(saga_type, str(version)).set(count)

    def call_finished(self, saga: SagaState, step: str, direction: str, outcome: Outcome) -> None:
        if self._metrics:
            key = (saga.saga_type, step, direction, outcome.code.name)
            histogram = self._step_seconds.get(key)
            if histogram is None:
                histogram = self._step_seconds[key] = STEP_SECONDS.labels(*key)
            histogram.observe(outcome.duration_ms / 1000)
        if self._tracer is not None:
            # Called inside the step span (see Dispatcher._call).
            span = trace.get_current_span()
            span.set_attribute("rpc.grpc.status_code", outcome.code.value[0])
            if not outcome.ok:
                span.set_status(Status(StatusCode.ERROR, f"{outcome.code.name}: {outcome.message}"))
