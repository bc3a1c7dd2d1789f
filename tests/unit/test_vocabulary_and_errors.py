"""The orchestrator's vocabulary (orchestrator.status), its error classes, the idempotency key and page tokens."""

from __future__ import annotations

import random

import grpc
import pytest
from google.rpc import error_details_pb2

from orchestrator.engine import Command, Engine, Outcome, SagaState
from orchestrator.errors import BusinessKeyConflict, IllegalState, SagaNotFound
from orchestrator.sagas.order import ORDER_SAGA
from orchestrator.status import Direction, EventType, OperatorCall, SagaStatus, effective_status
from orchestrator.views import STATUS_FROM_PB, STATUS_TO_PB
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from svckit import page_token
from svckit.errors import DomainError, InvalidArgument, status_from_error
from svckit.idempotency_key import IDEMPOTENCY_HEADER, step_key
from svckit.server import IDEMPOTENCY_HEADER as SERVER_HEADER

T0 = 1_000_000.0


def _saga(status: SagaStatus = SagaStatus.RUNNING, *, paused: bool = False) -> SagaState:
    return SagaState("s1", "OrderSaga", 1, "order-1", b"", status, T0 + 300, T0, T0, paused=paused)


def _info(error: DomainError) -> tuple[grpc.StatusCode, str, dict[str, str], str]:
    """The code, ErrorInfo reason and metadata, and message a client receives for error."""
    status = status_from_error(error)
    info = error_details_pb2.ErrorInfo()
    assert error.details()[0].Unpack(info)
    return status.code, info.reason, dict(info.metadata), error.message


# -- the vocabulary ------------------------------------------------------------------------------


def test_the_stored_strings_stay_what_the_database_holds() -> None:
    assert [str(status) for status in SagaStatus] == [
        "RUNNING",
        "COMPENSATING",
        "COMPLETED",
        "COMPENSATED",
        "NEEDS_ATTENTION",
        "TERMINATED",
        "PAUSED",
    ]
    assert [str(direction) for direction in Direction] == ["action", "compensation"]
    assert str(EventType.EFFECT_AFTER_TERMINATE) == "EffectAfterTerminate"
    assert str(EventType.STEP_FAILED) == "StepFailed"
    assert [str(call) for call in OperatorCall] == ["pause", "resume", "cancel", "terminate", "retry"]


@pytest.mark.parametrize(
    ("stored", "paused", "reported"),
    [
        (SagaStatus.RUNNING, False, SagaStatus.RUNNING),
        (SagaStatus.RUNNING, True, SagaStatus.PAUSED),
        (SagaStatus.COMPENSATING, True, SagaStatus.PAUSED),
        (SagaStatus.NEEDS_ATTENTION, True, SagaStatus.PAUSED),
        (SagaStatus.COMPLETED, True, SagaStatus.COMPLETED),
        (SagaStatus.TERMINATED, True, SagaStatus.TERMINATED),
    ],
)
def test_one_function_says_the_effective_status(stored: SagaStatus, paused: bool, reported: SagaStatus) -> None:
    assert effective_status(str(stored), paused) is reported
    assert _saga(stored, paused=paused).effective_status is reported


def test_every_status_has_its_api_number_by_the_same_name() -> None:
    for status in SagaStatus:
        assert pb.SagaStatus.Name(STATUS_TO_PB[status]) == f"SAGA_STATUS_{status}"
        assert STATUS_FROM_PB[STATUS_TO_PB[status]] is status


# -- the orchestrator's errors -----------------------------------------------------------------


def test_saga_not_found_carries_its_id() -> None:
    error = SagaNotFound("abc")
    assert _info(error) == (grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND", {"saga_id": "abc"}, "no saga abc")
    assert error.saga_id == "abc"


def test_business_key_conflict_names_the_existing_saga() -> None:
    error = BusinessKeyConflict("OrderSaga", "order-1", "s9")
    assert _info(error) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "BUSINESS_KEY_CONFLICT",
        {"saga_id": "s9", "business_key": "order-1"},
        "OrderSaga 'order-1' already exists with a different payload (saga s9)",
    )


def test_an_illegal_operator_call_reports_the_effective_status() -> None:
    engine = Engine(random.Random(3))
    with pytest.raises(IllegalState) as caught:
        engine.pause(_saga(paused=True), None, "ops", "", T0)
    code, reason, metadata, message = _info(caught.value)
    assert (code, reason, metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ILLEGAL_STATE_FOR_PAUSE",
        {"saga_id": "s1", "status": "PAUSED"},
    )
    assert message == (
        "cannot pause saga s1 in status PAUSED: pause applies to only a running or compensating saga that is not paused"
    )
    assert caught.value.operation == "pause" and caught.value.status == "PAUSED"


@pytest.mark.parametrize("call", list(OperatorCall))
def test_every_operator_call_has_its_refusal(call: OperatorCall) -> None:
    engine = Engine(random.Random(3))
    ended = _saga(SagaStatus.COMPLETED)
    refusals = {
        OperatorCall.PAUSE: lambda: engine.pause(ended, None, "ops", "", T0),
        OperatorCall.RESUME: lambda: engine.resume(ended, None, "ops", T0),
        OperatorCall.CANCEL: lambda: engine.cancel(ORDER_SAGA, ended, None, False, "ops", "", T0),
        OperatorCall.TERMINATE: lambda: engine.terminate(ended, "ops", "", T0),
        OperatorCall.RETRY: lambda: engine.retry(ended, "ops", T0),
    }
    with pytest.raises(IllegalState) as caught:
        refusals[call]()
    assert caught.value.reason == f"ILLEGAL_STATE_FOR_{call.upper()}"


# -- the idempotency key ---------------------------------------------------------------------


def test_one_key_per_saga_step_and_direction_whatever_the_attempt() -> None:
    assert IDEMPOTENCY_HEADER == SERVER_HEADER == "idempotency-key"
    assert step_key("s1", "reserve_stock", Direction.COMPENSATION) == "s1/reserve_stock/compensation"
    first = Command("s1", 0, Direction.ACTION, 1, T0)
    fifth = Command("s1", 0, Direction.ACTION, 5, T0)
    assert first.idempotency_key("reserve_stock") == fifth.idempotency_key("reserve_stock") == "s1/reserve_stock/action"


def test_the_engine_records_events_and_commands_in_the_vocabulary() -> None:
    engine = Engine(random.Random(3))
    saga = _saga()
    command = engine.start(ORDER_SAGA, saga, T0).next_command
    assert command is not None and command.direction is Direction.ACTION
    failed = engine.on_outcome(ORDER_SAGA, saga, command, Outcome(grpc.StatusCode.FAILED_PRECONDITION), T0)
    assert [event.type for event in failed.events] == [
        EventType.STEP_FAILED,
        EventType.COMPENSATION_STARTED,
        EventType.SAGA_COMPENSATED,
    ]
    assert saga.status is SagaStatus.COMPENSATED


# -- page tokens --------------------------------------------------------------------------------


def test_page_tokens_round_trip_in_the_formats_clients_hold() -> None:
    assert page_token.decode_sequence("") is None
    assert page_token.decode_sequence(page_token.encode_sequence(42)) == 42
    assert page_token.decode_sequence(str(2**63 - 1)) == 2**63 - 1
    assert page_token.decode_offset("") == 0 and page_token.decode_offset(page_token.encode_offset(40)) == 40
    assert page_token.decode_cursor("") is None
    assert page_token.encode_cursor(1712345678.25, "abc") == "1712345678.25_abc"
    assert page_token.decode_cursor(page_token.encode_cursor(1712345678.25, "abc")) == (1712345678.25, "abc")
    assert page_token.decode_cursor("1e-05_abc") == (1e-05, "abc")


@pytest.mark.parametrize(
    ("decode", "token"),
    [
        (page_token.decode_sequence, "0"),
        (page_token.decode_sequence, "-1"),
        (page_token.decode_sequence, "\u00b2"),
        (page_token.decode_sequence, str(2**63)),
        (page_token.decode_sequence, "9" * 5000),
        (page_token.decode_offset, "4.0"),
        (page_token.decode_offset, "9" * 19),
        (page_token.decode_cursor, "not-a-token"),
        (page_token.decode_cursor, "1.5_a\x00b"),
        (page_token.decode_cursor, "1" * 400 + "_abc"),
        (page_token.decode_cursor, "9" * 90 + "e999_abc"),
    ],
)
def test_a_bad_page_token_is_invalid_argument_naming_page_token(decode: object, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode(token)  # type: ignore[operator]
    assert [(v.field, v.reason) for v in caught.value.violations] == [
        ("page_token", "is not a token returned by a previous page")
    ]
    assert status_from_error(caught.value).code is grpc.StatusCode.INVALID_ARGUMENT
