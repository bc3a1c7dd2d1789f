"""gRPC transport of the orchestrator: validates requests, starts and reports sagas, runs operator calls."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator import store
from orchestrator.auth import AccessControl, TokenSource, audit
from orchestrator.definition import (
    SIGNAL_NAME,
    BusinessKeyMismatch,
    DefinitionRegistry,
    SagaDefinition,
    approval_signal,
)
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import SagaState
from orchestrator.errors import SagaNotFound
from orchestrator.observability import Observability
from orchestrator.status import IN_FLIGHT_STATUSES, OperatorCall, SagaStatus
from orchestrator.store import EventRecord
from orchestrator.views import (
    STATUS_FROM_PB,
    STATUS_TO_PB,
    StatusTracker,
    api_status,
    definition_info_pb,
    event_pb,
    saga_pb,
)
from orchestrator.watch import WatchHub
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from svckit.convert import address_from_pb, lines_from_pb, money_from_pb, timestamp
from svckit.db import Database
from svckit.errors import DomainError, InvalidArgument, RetryableError, abort_call
from svckit.page_token import decode_cursor, encode_cursor
from svckit.server import CallContext, RpcServer, rpc
from svckit.validation import Violations, forbidden_character, quote

__all__ = ["OrchestratorServicer", "validate_place_order"]

log = logging.getLogger("sagasuite.orchestrator")

# The orchestrator's own limits; docs/limits.md lists them with the shared ones of svckit.validation.
MAX_DEADLINE_SECONDS = 7 * 24 * 3600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_SAGA_TYPE_LENGTH = 100
MAX_BUSINESS_KEY_LENGTH = 200
MAX_OPERATOR_REASON_LENGTH = 500
MAX_STATUS_FILTERS = 16
MAX_STEP_NAME_LENGTH = 64
# The start of a saga id (uuid4 hex): what a short id is.
SAGA_ID_PREFIX = re.compile(r"^[0-9a-f]{1,32}$")
STATUS_CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)
MAX_TYPE_URL_LENGTH = 256
# A saga's input is stored with it and read for every step: PlaceOrder's request, or StartSaga's
# packed input, serialized. A valid order is far smaller (about 12 KiB with every field at its limit).
MAX_SAGA_INPUT_BYTES = 64 * 1024
# A signal's payload is stored with the saga until consumed, then as the wait's result.
MAX_SIGNAL_PAYLOAD_BYTES = 64 * 1024
MAX_SIGNAL_ID_LENGTH = 200
# StartSaga's input_json: arrays and objects nested deeper than this are refused before parsing, so
# the parser's recursion never meets a hostile depth. A saga input is a few levels deep.
MAX_INPUT_JSON_DEPTH = 64
# An integer in input_json with more digits than this is refused as such (uint64 takes 20).
MAX_JSON_INTEGER_DIGITS = 40
# A refusal quotes at most this much of the JSON parser's reason, which may quote the input.
MAX_PARSER_REASON_LENGTH = 200
# The three ways StartSaga takes an input, as the proto declares them.
INPUT_FIELDS = ("input", "input_struct", "input_json")


def validate_place_order(request: pb.PlaceOrderRequest) -> None:
    """Refuse an order that any participant would refuse: the services' own rules from svckit.validation,
    on every field the saga forwards, so a participant never meets input it cannot take."""
    violations = Violations()
    violations.identifier("order_id", request.order_id)
    violations.email("customer_email", request.customer_email)
    violations.lines("items", lines_from_pb(request.items))
    violations.money("amount", money_from_pb(request, "amount"))
    violations.payment_token("payment_token", request.payment_token)
    violations.address("shipping_address", address_from_pb(request, "shipping_address"))
    _deadline(violations, request.deadline_seconds)
    violations.raise_if_any()
    # Each field is bounded above, so this holds for any valid order (its unknown fields are
    # dropped on arrival, svckit.server.RequestGuard); it bounds what is stored should either change.
    _input_size("request", request.ByteSize())


def _input_size(field_name: str, size: int) -> None:
    if size > MAX_SAGA_INPUT_BYTES:
        raise InvalidArgument.of(field_name, f"must be at most {MAX_SAGA_INPUT_BYTES} bytes serialized, got {size}")


def _deadline(violations: Violations, seconds: int) -> None:
    if seconds < 0 or seconds > MAX_DEADLINE_SECONDS:
        violations.add("deadline_seconds", f"must be within 0..{MAX_DEADLINE_SECONDS} (0 means the default)")


def _created_bound(violations: Violations, owner: Message, field_name: str) -> float | None:
    """A Timestamp filter as seconds since the epoch, None when unset; out of range is a violation."""
    if not owner.HasField(field_name):
        return None
    stamp: Timestamp = getattr(owner, field_name)
    violations.timestamp(field_name, stamp)
    if violations.failed(f"{field_name}.seconds") or violations.failed(f"{field_name}.nanos"):
        return None
    return stamp.seconds + stamp.nanos / 1e9


def _saga_id(value: str) -> str:
    violations = Violations()
    violations.identifier("saga_id", value)
    violations.raise_if_any()
    return value


class OrchestratorServicer(pb_grpc.OrchestratorServiceServicer):
    """Implements sagasuite.orchestrator.v1.OrchestratorService over the dispatcher and store."""

    def __init__(
        self,
        database: Database,
        registry: DefinitionRegistry,
        dispatcher: Dispatcher,
        default_deadline_seconds: int,
        *,
        observability: Observability | None = None,
        access: AccessControl | None = None,
        watches: WatchHub | None = None,
        rpc_server: RpcServer | None = None,
        order_definition: SagaDefinition | None = None,
    ) -> None:
        self.rpc_server = rpc_server if rpc_server is not None else RpcServer()  # what rpc() reports each call to
        self._database = database
        self._registry = registry
        self._dispatcher = dispatcher
        self._default_deadline = default_deadline_seconds
        # What PlaceOrder starts: ORDER_SAGA_VERSION's OrderSaga, or the latest registered.
        self._order_definition = order_definition
        self._observability = observability
        # Without one, operator calls are refused (no token configured) and everything else is open.
        self._access = access if access is not None else AccessControl(TokenSource())
        if watches is None:
            watches = WatchHub(database)
            dispatcher.feed_watches(watches)
        self._watches = watches

    # -- starting ----------------------------------------------------------------------------

    async def _start(
        self,
        definition: SagaDefinition,
        business_key: str,
        message: object,
        deadline_seconds: int,
        call: CallContext,
    ) -> tuple[SagaState, bool]:
        # With tracing on, the saga span opens here, under the call's server span; its traceparent
        # is stored with the saga so every step, on any replica, continues this trace.
        saga_span = self._observability.begin_saga(definition.name, business_key) if self._observability else None
        saga, created = await self._dispatcher.start_saga(
            definition,
            business_key,
            message,  # type: ignore[arg-type]
            deadline_seconds or definition.deadline or self._default_deadline,
            saga_span.trace_context if saga_span is not None else "",
        )
        if saga_span is not None:
            saga_span.finish(saga, created)
        return saga, created

    @rpc(mutating=False)
    async def PlaceOrder(self, request: pb.PlaceOrderRequest, call: CallContext) -> pb.PlaceOrderResponse:
        saga, created = await self._place_order(request, call, "PlaceOrder")
        return pb.PlaceOrderResponse(saga_id=saga.saga_id, status=api_status(saga), created=created)

    @rpc(mutating=False)
    async def PlaceOrderAndWait(
        self, request: pb.PlaceOrderAndWaitRequest, call: CallContext
    ) -> pb.PlaceOrderAndWaitResponse:
        saga, created = await self._place_order(request.order, call, "PlaceOrderAndWait")
        view = await self._until_settled(saga)
        return pb.PlaceOrderAndWaitResponse(saga_id=saga.saga_id, created=created, saga=view)

    async def _place_order(
        self, request: pb.PlaceOrderRequest, call: CallContext, method: str
    ) -> tuple[SagaState, bool]:
        self._access.authorize(call.grpc_context, "start", method)
        validate_place_order(request)
        definition = self._order_definition or self._registry.latest("OrderSaga")
        business_key = _business_key(definition, request, "")
        return await self._start(definition, business_key, request, request.deadline_seconds, call)

    async def _until_settled(self, saga: SagaState) -> pb.Saga:
        """The saga once it ended or needs attention, as WatchSaga sees it stop (the call's deadline bounds it)."""
        if not (saga.ended or saga.status == SagaStatus.NEEDS_ATTENTION):
            # Past MAX_WATCHERS this raises WatchersExhausted (RESOURCE_EXHAUSTED); the saga runs on.
            subscription = self._watches.subscribe(saga.saga_id)
            try:
                async with contextlib.aclosing(subscription.events(saga.event_seq)) as updates:
                    async for _ in updates:
                        pass
            finally:
                subscription.close()
        # With each step's result (the payment id, the tracking number): what a caller that waits wants.
        return await self._view(saga.saga_id, include_history=False, include_results=True)

    def _starts_on(self, saga_type: str) -> SagaDefinition | None:
        """The definition a new saga of this type starts on: the latest version, or for OrderSaga the
        ORDER_SAGA_VERSION pin (PlaceOrder and StartSaga alike); None for a type not loaded."""
        if saga_type == "OrderSaga" and self._order_definition is not None:
            return self._order_definition
        try:
            return self._registry.latest(saga_type)
        except LookupError:
            return None

    @rpc(mutating=False)
    async def StartSaga(self, request: pb.StartSagaRequest, call: CallContext) -> pb.StartSagaResponse:
        saga, created = await self._start_saga(request, call, "StartSaga")
        return pb.StartSagaResponse(
            saga_id=saga.saga_id,
            status=api_status(saga),
            created=created,
            definition_version=saga.version,
            business_key=saga.business_key,
        )

    @rpc(mutating=False)
    async def StartSagaAndWait(
        self, request: pb.StartSagaAndWaitRequest, call: CallContext
    ) -> pb.StartSagaAndWaitResponse:
        saga, created = await self._start_saga(request.start, call, "StartSagaAndWait")
        view = await self._until_settled(saga)
        return pb.StartSagaAndWaitResponse(
            saga_id=saga.saga_id, created=created, definition_version=saga.version, saga=view
        )

    async def _start_saga(self, request: pb.StartSagaRequest, call: CallContext, method: str) -> tuple[SagaState, bool]:
        self._access.authorize(call.grpc_context, "start", method)
        violations = Violations()
        violations.text("saga_type", request.saga_type, required=True, max_length=MAX_SAGA_TYPE_LENGTH)
        violations.text("business_key", request.business_key, required=False, max_length=MAX_BUSINESS_KEY_LENGTH)
        _deadline(violations, request.deadline_seconds)
        _check_input_given(violations, request)
        violations.raise_if_any()
        definition = self._starts_on(request.saga_type)
        if definition is None:
            known = ", ".join(self._registry.names())
            raise InvalidArgument.of("saga_type", f"unknown saga type {quote(request.saga_type)}; known: {known}")
        message, field_name = _input_message(definition, request)
        if isinstance(message, pb.PlaceOrderRequest):
            validate_place_order(message)
        else:
            # A definition's own input type: no rules known here beyond what every field must satisfy.
            contents = Violations()
            contents.contents("", message)
            contents.raise_if_any()
        # JSON spends more bytes on a value than the wire format, but the message it makes is capped too.
        _input_size(field_name, message.ByteSize())
        # One input entity, one saga: a key other than the one the input derives is refused.
        business_key = _business_key(definition, message, request.business_key)
        return await self._start(definition, business_key, message, request.deadline_seconds, call)

    @rpc(mutating=False)
    async def ListDefinitions(
        self, request: pb.ListDefinitionsRequest, call: CallContext
    ) -> pb.ListDefinitionsResponse:
        self._access.authorize(call.grpc_context, "read", "ListDefinitions")
        violations = Violations()
        violations.text("name", request.name, required=False, max_length=MAX_SAGA_TYPE_LENGTH)
        violations.raise_if_any()
        definitions = sorted(
            (d for d in self._registry.all() if not request.name or d.name == request.name),
            key=lambda d: (d.name, d.version),
        )
        keys = [(d.name, d.version) for d in definitions]
        running = await self._database.transaction(lambda c: store.count_not_ended(c, keys)) if keys else {}
        starts_on = {name: self._starts_on(name) for name in {d.name for d in definitions}}
        return pb.ListDefinitionsResponse(
            definitions=[
                definition_info_pb(d, running=running.get((d.name, d.version), 0), latest=starts_on[d.name] is d)
                for d in definitions
            ]
        )

    # -- reading -----------------------------------------------------------------------------

    async def _load_full(
        self, saga_id: str
    ) -> tuple[SagaState, list[EventRecord], dict[str, store.PendingCommand], list[SagaState]]:
        def work(connection):  # type: ignore[no-untyped-def]
            sagas = store.load_sagas(connection, [saga_id])
            if saga_id not in sagas:
                raise SagaNotFound(saga_id)
            saga = sagas[saga_id]
            children = store.children_of(connection, saga_id) if saga.progress.children else []
            return saga, store.load_events(connection, saga_id), store.load_pendings(connection, saga_id), children

        return await self._database.transaction(work)

    def _definition(self, saga: SagaState) -> SagaDefinition | None:
        try:
            return self._registry.get(saga.saga_type, saga.version)
        except LookupError:
            return None

    async def _view(
        self, saga_id: str, *, include_history: bool, include_data: bool = False, include_results: bool = False
    ) -> pb.Saga:
        saga, events, pendings, children = await self._load_full(saga_id)
        return saga_pb(
            saga,
            self._definition(saga),
            events,
            pendings,
            include_history=include_history,
            include_data=include_data,
            include_results=include_results,
            children=children,
        )

    @rpc(mutating=False)
    async def GetSaga(self, request: pb.GetSagaRequest, call: CallContext) -> pb.GetSagaResponse:
        self._access.authorize(call.grpc_context, "read", "GetSaga", request.saga_id)
        saga = await self._view(_saga_id(request.saga_id), include_history=True, include_data=True)
        return pb.GetSagaResponse(saga=saga)

    @rpc(mutating=False)
    async def ListSagas(self, request: pb.ListSagasRequest, call: CallContext) -> pb.ListSagasResponse:
        self._access.authorize(call.grpc_context, "read", "ListSagas")
        violations = Violations()
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            violations.add("page_size", f"must be within 0..{MAX_PAGE_SIZE}")
        if violations.count("statuses", request.statuses, MAX_STATUS_FILTERS):
            for index, status in enumerate(request.statuses):
                if status not in STATUS_FROM_PB:
                    violations.add(f"statuses[{index}]", f"unknown status {status}")
        violations.text("saga_type", request.saga_type, required=False, max_length=MAX_SAGA_TYPE_LENGTH)
        violations.text("business_key", request.business_key, required=False, max_length=MAX_BUSINESS_KEY_LENGTH)
        created_after = _created_bound(violations, request, "created_after")
        created_before = _created_bound(violations, request, "created_before")
        if request.saga_id_prefix and not SAGA_ID_PREFIX.match(request.saga_id_prefix):
            violations.add("saga_id_prefix", "must be 1-32 lowercase hex characters, the start of a saga id")
        violations.text(
            "business_key_prefix", request.business_key_prefix, required=False, max_length=MAX_BUSINESS_KEY_LENGTH
        )
        violations.text("current_step", request.current_step, required=False, max_length=MAX_STEP_NAME_LENGTH)
        if request.error_code and request.error_code not in STATUS_CODE_NAMES:
            violations.add(
                "error_code",
                f"must be a gRPC status code name such as FAILED_PRECONDITION, got {quote(request.error_code, 40)}",
            )
        violations.raise_if_any()
        # "<created_at>_<saga_id>" of the previous page's last saga (svckit.page_token cursor).
        after = decode_cursor(request.page_token)
        names = {STATUS_FROM_PB[s] for s in request.statuses}
        saga_filter = store.SagaFilter(
            statuses=tuple(sorted(names - {SagaStatus.PAUSED})),
            include_paused=SagaStatus.PAUSED in names,
            saga_type=request.saga_type,
            business_key=request.business_key,
            created_after=created_after,
            created_before=created_before,
            saga_id_prefix=request.saga_id_prefix,
            business_key_prefix=request.business_key_prefix,
            at_steps=self._at_steps(request.saga_type, request.current_step) if request.current_step else None,
            error_code=request.error_code,
        )
        if names and not saga_filter.statuses and not saga_filter.include_paused:
            return pb.ListSagasResponse()
        limit = request.page_size or DEFAULT_PAGE_SIZE
        sagas = await self._database.transaction(lambda c: store.list_sagas(c, saga_filter, limit + 1, after))
        response = pb.ListSagasResponse(sagas=[saga_pb(s, self._definition(s)) for s in sagas[:limit]])
        if len(sagas) > limit:
            last = sagas[limit - 1]
            response.next_page_token = encode_cursor(last.created_at, last.saga_id)
        return response

    def _at_steps(self, saga_type: str, step: str) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
        """Every loaded (type, version, flat indexes) whose node is named step."""
        found = []
        for definition in self._registry.all():
            if saga_type and definition.name != saga_type:
                continue
            indexes = tuple(flat.index for flat in definition.nodes if flat.node.name == step)
            if indexes:
                found.append((definition.name, definition.version, indexes))
        return tuple(found)

    @rpc(mutating=False)
    async def GetSagaStats(self, request: pb.GetSagaStatsRequest, call: CallContext) -> pb.GetSagaStatsResponse:
        self._access.authorize(call.grpc_context, "read", "GetSagaStats")
        violations = Violations()
        created_after = _created_bound(violations, request, "created_after")
        violations.raise_if_any()

        def work(connection):  # type: ignore[no-untyped-def]
            # One created_after for every figure, so they describe the same sagas.
            return (
                store.count_by_status(connection, created_after),
                store.completion_latencies(connection, created_after),
                store.oldest_with_status(connection, sorted(IN_FLIGHT_STATUSES), created_after),
                store.oldest_with_status(connection, [SagaStatus.NEEDS_ATTENTION], created_after),
            )

        counts, latencies, oldest, oldest_attention = await self._database.transaction(work)
        in_flight = sum(counts.get(status, 0) for status in (*IN_FLIGHT_STATUSES, SagaStatus.PAUSED))
        response = pb.GetSagaStatsResponse(
            counts=[pb.StatusCount(status=STATUS_TO_PB[name], count=n) for name, n in sorted(counts.items())],
            in_flight=in_flight,
            needs_attention=counts.get(SagaStatus.NEEDS_ATTENTION, 0),
        )
        if oldest_attention is not None:
            response.oldest_needs_attention.CopyFrom(saga_pb(oldest_attention, self._definition(oldest_attention)))
        if latencies:
            ordered = sorted(latencies)
            response.completion_p50_ms = _percentile(ordered, 0.50) * 1000
            response.completion_p95_ms = _percentile(ordered, 0.95) * 1000
            response.completion_p99_ms = _percentile(ordered, 0.99) * 1000
        if oldest is not None:
            response.oldest_in_flight.CopyFrom(saga_pb(oldest, self._definition(oldest)))
        return response

    async def WatchSaga(
        self, request: pb.WatchSagaRequest, context: grpc.aio.ServicerContext[pb.WatchSagaRequest, pb.WatchSagaResponse]
    ) -> AsyncIterator[pb.WatchSagaResponse]:
        try:
            self._access.authorize(context, "read", "WatchSaga", request.saga_id)
            saga_id = _saga_id(request.saga_id)
            if request.after_seq < 0:
                raise InvalidArgument.of("after_seq", "must not be negative")
            # Valid requests only take a slot; past MAX_WATCHERS this raises WatchersExhausted.
            subscription = self._watches.subscribe(saga_id)
        except (DomainError, RetryableError) as error:
            await abort_call(context, error)
            return
        try:
            tracker = StatusTracker()
            async with contextlib.aclosing(subscription.events(request.after_seq)) as updates:
                async for saga, event in updates:
                    view = event_pb(event)
                    yield pb.WatchSagaResponse(event=view, status=tracker.after(view, api_status(saga)))
        except (DomainError, RetryableError) as error:
            await abort_call(context, error)
        finally:
            # Ended, refused or cancelled by the client: the slot is free again.
            subscription.close()

    # -- operating ---------------------------------------------------------------------------

    async def _operate(
        self,
        operation: OperatorCall,
        saga_id: str,
        call: CallContext,
        reason: str = "",
        *,
        reason_required: bool | None = None,
    ) -> pb.Saga:
        """Authorize first (a refused caller learns nothing about the saga), then validate, act and audit."""
        context = call.grpc_context
        actor = self._access.authorize(context, "operate", operation, saga_id)
        try:
            if reason_required is not None:
                _reason(reason, required=reason_required)
            saga_id = _saga_id(saga_id)
            await self._dispatcher.operate(operation, saga_id, actor, reason)
        except (DomainError, RetryableError) as error:
            audit(actor, operation, saga_id, "failed", peer=context.peer(), error=error)
            raise
        audit(actor, operation, saga_id, "ok", peer=context.peer())
        log.info("operator %s: %s saga %s reason=%s", actor, operation, saga_id, json.dumps(reason[:200]))
        return await self._view(saga_id, include_history=False)

    @rpc(mutating=False)
    async def RetrySaga(self, request: pb.RetrySagaRequest, call: CallContext) -> pb.RetrySagaResponse:
        return pb.RetrySagaResponse(saga=await self._operate(OperatorCall.RETRY, request.saga_id, call))

    @rpc(mutating=False)
    async def PauseSaga(self, request: pb.PauseSagaRequest, call: CallContext) -> pb.PauseSagaResponse:
        saga = await self._operate(OperatorCall.PAUSE, request.saga_id, call, request.reason, reason_required=False)
        return pb.PauseSagaResponse(saga=saga)

    @rpc(mutating=False)
    async def ResumeSaga(self, request: pb.ResumeSagaRequest, call: CallContext) -> pb.ResumeSagaResponse:
        return pb.ResumeSagaResponse(saga=await self._operate(OperatorCall.RESUME, request.saga_id, call))

    @rpc(mutating=False)
    async def CancelSaga(self, request: pb.CancelSagaRequest, call: CallContext) -> pb.CancelSagaResponse:
        saga = await self._operate(OperatorCall.CANCEL, request.saga_id, call, request.reason, reason_required=False)
        return pb.CancelSagaResponse(saga=saga)

    # -- signals and approvals -------------------------------------------------------------------

    @rpc(mutating=False)
    async def SignalSaga(self, request: pb.SignalSagaRequest, call: CallContext) -> pb.SignalSagaResponse:
        actor = self._access.authorize(call.grpc_context, "start", "SignalSaga", request.saga_id)
        violations = Violations()
        if request.saga_id:
            violations.identifier("saga_id", request.saga_id)
            if request.saga_type or request.business_key:
                violations.add("saga_type", "give either saga_id, or saga_type with business_key, not both")
        else:
            violations.text("saga_type", request.saga_type, required=True, max_length=MAX_SAGA_TYPE_LENGTH)
            violations.text("business_key", request.business_key, required=True, max_length=MAX_BUSINESS_KEY_LENGTH)
        violations.text("name", request.name, required=True, max_length=64)
        if not violations.failed("name") and not SIGNAL_NAME.match(request.name):
            violations.add("name", "must be a letter, then up to 63 of A-Z a-z 0-9 _ . -")
        violations.text("signal_id", request.signal_id, required=True, max_length=MAX_SIGNAL_ID_LENGTH)
        _signal_payload(violations, request.payload)
        violations.raise_if_any()
        receipt = await self._dispatcher.signal(
            saga_id=request.saga_id,
            saga_type=request.saga_type,
            business_key=request.business_key,
            name=request.name,
            signal_id=request.signal_id,
            payload=request.payload.SerializeToString(deterministic=True),
            actor=actor,
        )
        if self._observability is not None:
            self._observability.signal_received(request.name, receipt.duplicate)
        return pb.SignalSagaResponse(
            saga_id=receipt.saga.saga_id, received_at=timestamp(receipt.received_at), duplicate=receipt.duplicate
        )

    @rpc(mutating=False)
    async def DecideApproval(self, request: pb.DecideApprovalRequest, call: CallContext) -> pb.DecideApprovalResponse:
        context = call.grpc_context
        action = "approve" if request.approve else "reject"
        credential = self._access.authorize_decision(context, action, request.saga_id)
        try:
            violations = Violations()
            violations.identifier("saga_id", request.saga_id)
            violations.text("step", request.step, required=True, max_length=100)
            violations.text("reason", request.reason, required=False, max_length=MAX_OPERATOR_REASON_LENGTH)
            violations.raise_if_any()
            decision = json.dumps({"approved": request.approve, "reason": request.reason}, sort_keys=True).encode()
            receipt = await self._dispatcher.signal(
                saga_id=request.saga_id,
                name=approval_signal(request.step),
                # One decision per approval: the same decision again is a repeat, the other one a conflict.
                signal_id=approval_signal(request.step),
                payload=struct_pb2.Struct(
                    fields={
                        "approved": struct_pb2.Value(bool_value=request.approve),
                        "reason": struct_pb2.Value(string_value=request.reason),
                        "actor": struct_pb2.Value(string_value=credential.name),
                    }
                ).SerializeToString(deterministic=True),
                actor=credential.name,
                decision=decision,
                dedup=b"approve" if request.approve else b"reject",
                roles=frozenset({credential.role}),
            )
        except (DomainError, RetryableError) as error:
            audit(credential.name, action, request.saga_id, "failed", peer=context.peer(), error=error)
            raise
        audit(credential.name, action, request.saga_id, "ok", peer=context.peer())
        log.info(
            "%s %s approval %s of saga %s reason=%s",
            credential.name,
            action,
            request.step,
            request.saga_id,
            json.dumps(request.reason[:200]),
        )
        return pb.DecideApprovalResponse(
            saga=await self._view(request.saga_id, include_history=False), duplicate=receipt.duplicate
        )

    @rpc(mutating=False)
    async def TerminateSaga(self, request: pb.TerminateSagaRequest, call: CallContext) -> pb.TerminateSagaResponse:
        saga = await self._operate(OperatorCall.TERMINATE, request.saga_id, call, request.reason, reason_required=True)
        return pb.TerminateSagaResponse(saga=saga, steps_maybe_applied=saga.steps_maybe_applied)


def _signal_payload(violations: Violations, payload: struct_pb2.Struct) -> None:
    size = payload.ByteSize()
    if size > MAX_SIGNAL_PAYLOAD_BYTES:
        violations.add("payload", f"must be at most {MAX_SIGNAL_PAYLOAD_BYTES} bytes serialized, got {size}")
        return
    _check_json(violations, payload, "payload")


def _check_json(violations: Violations, value: Message, path: str) -> None:
    """Keys and strings without control characters, numbers finite (JSON has no NaN): at any depth of a Struct."""
    if isinstance(value, struct_pb2.Struct):
        for key, item in value.fields.items():
            position = forbidden_character(key)
            if position is not None:
                violations.add(f"{path}[{quote(key)}]", f"the key holds a control character at position {position}")
                return
            _check_json(violations, item, f"{path}.{key}")
    elif isinstance(value, struct_pb2.ListValue):
        for index, item in enumerate(value.values):
            _check_json(violations, item, f"{path}[{index}]")
    elif isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            violations.add(path, "must be a finite number: JSON has no NaN or infinity")
        elif kind == "string_value":
            position = forbidden_character(value.string_value)
            if position is not None:
                violations.add(path, f"holds a control character at position {position}")
        elif kind in ("struct_value", "list_value"):
            _check_json(violations, getattr(value, kind), path)


def _check_input_given(violations: Violations, request: pb.StartSagaRequest) -> None:
    """Exactly one of input, input_struct and input_json, within its size cap (before anything parses it)."""
    # The two messages are given when set, the JSON text when not empty.
    present = {"input": request.HasField("input"), "input_struct": request.HasField("input_struct")}
    given = [name for name in INPUT_FIELDS if present.get(name, bool(request.input_json))]
    if not given:
        violations.add("input", "is required: give the saga's input as input (an Any), input_struct or input_json")
        return
    if len(given) > 1:
        for name in given:
            violations.add(name, f"give only one of input, input_struct and input_json; got {' and '.join(given)}")
        return
    if request.HasField("input"):
        if len(request.input.type_url) > MAX_TYPE_URL_LENGTH:
            violations.add("input", f"type_url must be at most {MAX_TYPE_URL_LENGTH} characters")
        elif len(request.input.value) > MAX_SAGA_INPUT_BYTES:
            violations.add(
                "input", f"must be at most {MAX_SAGA_INPUT_BYTES} bytes serialized, got {len(request.input.value)}"
            )
    elif request.HasField("input_struct"):
        size = request.input_struct.ByteSize()
        if size > MAX_SAGA_INPUT_BYTES:
            violations.add("input_struct", f"must be at most {MAX_SAGA_INPUT_BYTES} bytes serialized, got {size}")
        else:
            _check_json(violations, request.input_struct, "input_struct")
    else:
        size = len(request.input_json.encode())
        if size > MAX_SAGA_INPUT_BYTES:
            violations.add("input_json", f"must be at most {MAX_SAGA_INPUT_BYTES} bytes of UTF-8, got {size}")
        elif _nests_too_deep(request.input_json):
            violations.add("input_json", f"nests arrays and objects more than {MAX_INPUT_JSON_DEPTH} deep")


def _input_message(definition: SagaDefinition, request: pb.StartSagaRequest) -> tuple[Message, str]:
    """The definition's input message from whichever input field the request gives, and that field's name."""
    message = definition.input_type()
    expected = definition.input_type.DESCRIPTOR.full_name
    if request.HasField("input"):
        if not _unpack(request.input, message):
            raise InvalidArgument.of("input", f"must be a packed {expected}, got {quote(request.input.TypeName(), 96)}")
        return message, "input"
    if request.HasField("input_struct"):
        _parse_json("input_struct", json_format.MessageToDict(request.input_struct), message)
        return message, "input_struct"
    _parse_json("input_json", _load_json(request.input_json), message)
    return message, "input_json"


class _JsonRefused(ValueError):
    """JSON that the standard parser would take but an input must not hold."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # As json_format's own loader, a key given twice is refused (the last one would silently win).
    found: dict[str, Any] = {}
    for key, value in pairs:
        position = forbidden_character(key)
        if position is not None:
            raise _JsonRefused(f"the key {quote(key)} holds a control character at position {position}")
        if key in found:
            raise _JsonRefused(f"the key {quote(key)} is given twice")
        found[key] = value
    return found


def _no_constant(name: str) -> None:
    raise _JsonRefused(f"{name} is not a JSON number (the proto3 JSON mapping spells it as the string {name!r})")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRefused(f"the number {quote(text)} is too large for a double")
    return value


def _bounded_int(text: str) -> int:
    # Short of Python's own digit limit (4300), whose refusal speaks of sys.set_int_max_str_digits().
    if len(text.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
        raise _JsonRefused(f"the integer {quote(text)} has more digits than any integer field takes")
    return int(text)


def _load_json(text: str) -> object:
    """input_json as JSON values; INVALID_ARGUMENT naming input_json with the parser's reason."""
    try:
        return json.loads(
            text,
            object_pairs_hook=_json_object,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except (ValueError, RecursionError) as error:
        # ValueError covers the decoder's errors and our refusals; the depth was checked before.
        raise InvalidArgument.of("input_json", f"is not valid JSON: {_parser_reason(error)}") from None


def _parse_json(field_name: str, value: object, message: Message) -> None:
    """Fill message from JSON values in the proto3 JSON mapping; unknown fields are refused."""
    expected = message.DESCRIPTOR.full_name
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "another value")
        raise InvalidArgument.of(field_name, f"must be a JSON object (a {expected}), got {kind}")
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, OverflowError, RecursionError) as error:
        # ParseDict raises ParseError for what it checks; a conversion it does not guard surfaces as the others.
        raise InvalidArgument.of(field_name, f"is not a {expected}: {_parser_reason(error)}") from None


_JSON_KINDS: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
_JSON_STRUCTURE = re.compile(r'[\\"\[\]{}]')


def _nests_too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than MAX_INPUT_JSON_DEPTH deep in JSON text (outside strings)."""
    if text.count("[") + text.count("{") <= MAX_INPUT_JSON_DEPTH:
        return False  # too few brackets to nest too deep: most inputs end here
    depth = 0
    in_string = False
    escaped_at = -1
    for match in _JSON_STRUCTURE.finditer(text):
        at, character = match.start(), match.group()
        if at == escaped_at:
            continue
        if in_string:
            if character == "\\":
                escaped_at = at + 1
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            if depth > MAX_INPUT_JSON_DEPTH:
                return True
        elif character in "]}":
            depth -= 1
    return False


def _parser_reason(error: BaseException) -> str:
    """A parser's message fit for a refusal: unprintable characters escaped, at most a short length."""
    # json_format breaks its line before the list of a message's fields: read as a space.
    text = (str(error) or type(error).__name__).replace("\n", " ")
    cut = len(text) > MAX_PARSER_REASON_LENGTH
    shown = "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c
        for c in text[:MAX_PARSER_REASON_LENGTH]
    )
    return shown + (f"... ({len(text)} characters)" if cut else "")


def _business_key(definition: SagaDefinition, message: Message, given: str) -> str:
    """The saga's business key: the one the definition derives from the input, which a given key must equal."""
    where = f"is empty, and the key {definition.name} derives from the input" if not given else "cannot be checked"
    try:
        key = definition.business_key_of(message)
    except (DomainError, RetryableError):
        raise
    except Exception as error:
        # A declared derivation (a YAML definition's jq expression, say) may fail on an input it did not expect.
        reason = f"{where}: {definition.name} cannot derive its key from this input: {_parser_reason(error)}"
        raise InvalidArgument.of("business_key", reason) from None
    if given:
        if given != key:
            raise BusinessKeyMismatch(definition.name, given, key)
        return given
    position = forbidden_character(key)
    if not key.strip():
        reason = f"{where} is empty too: give business_key, or the input field it derives from"
    elif len(key) > MAX_BUSINESS_KEY_LENGTH:
        reason = f"{where} is {len(key)} characters long; at most {MAX_BUSINESS_KEY_LENGTH} are allowed"
    elif position is not None:
        reason = f"{where} holds a control character at position {position}"
    else:
        return key
    raise InvalidArgument.of("business_key", reason)


def _reason(reason: str, *, required: bool) -> None:
    violations = Violations()
    violations.text("reason", reason, required=required, max_length=MAX_OPERATOR_REASON_LENGTH)
    violations.raise_if_any()


def _unpack(packed: any_pb2.Any, message: object) -> bool:
    try:
        return packed.Unpack(message)  # type: ignore[arg-type]
    except DecodeError:
        return False


def _percentile(ordered: list[float], fraction: float) -> float:
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]
