"""orchestrator.engine: the pure saga state machine: outcomes, retry limits, the deadline and operator rules."""

from __future__ import annotations

import random
from dataclasses import replace

import grpc
import pytest

from orchestrator.definition import (
    BusinessKeyMismatch,
    DefinitionMissing,
    DefinitionRegistry,
    RetryPolicy,
    SagaDefinition,
    StepKind,
)
from orchestrator.engine import ACTION, COMPENSATION, Command, Engine, Outcome, SagaState, Status, Transition
from orchestrator.sagas.order import ORDER_SAGA, order_key, order_steps
from svckit.errors import FailedPrecondition

T0 = 1_000_000.0
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
RESERVE, CHARGE, SHIP, CONFIRM = range(4)
NAMES = [step.name for step in ORDER_SAGA.steps]
KEY = order_key


def new_saga(deadline_seconds: float = 300.0) -> SagaState:
    return SagaState(
        saga_id="s1",
        saga_type="OrderSaga",
        version=1,
        business_key="order-1",
        input=b"",
        status=Status.RUNNING,
        deadline_at=T0 + deadline_seconds,
        created_at=T0,
        updated_at=T0,
    )


def outcome(code: grpc.StatusCode, message: str = "") -> Outcome:
    return Outcome(code, message, b"response" if code is OK else None, T0, T0)


def types(transition: Transition) -> list[str]:
    return [event.type for event in transition.events]


def status_of(saga: SagaState) -> Status:
    """The saga's status now; mypy would keep an earlier assert's narrowing across the engine's updates."""
    return saga.status


@pytest.fixture
def engine() -> Engine:
    return Engine(random.Random(7))


def started(engine: Engine, saga: SagaState, definition: SagaDefinition = ORDER_SAGA) -> Command:
    command = engine.start(definition, saga, T0).next_command
    assert command is not None
    return command


def advance_to(engine: Engine, saga: SagaState, step_index: int, definition: SagaDefinition = ORDER_SAGA) -> Command:
    """Run the saga forward with successes until its command is the action of step_index."""
    command = started(engine, saga, definition)
    while command.step_index < step_index:
        next_command = engine.on_outcome(definition, saga, command, outcome(OK), T0).next_command
        assert next_command is not None
        command = next_command
    return command


def compensate_all(engine: Engine, saga: SagaState, command: Command | None) -> list[str]:
    """Answer every compensation with OK; the steps compensated, in order."""
    done = []
    while command is not None:
        assert command.direction == COMPENSATION
        done.append(NAMES[command.step_index])
        command = engine.on_outcome(ORDER_SAGA, saga, command, outcome(OK), T0).next_command
    return done


# -- forward -------------------------------------------------------------------------------


def test_start_schedules_the_first_action_now(engine: Engine) -> None:
    saga = new_saga()
    transition = engine.start(ORDER_SAGA, saga, T0)
    assert types(transition) == ["SagaStarted"]
    assert transition.events[0].message == "OrderSaga v1"
    assert transition.next_command == Command("s1", RESERVE, ACTION, 1, T0, due_at=T0)


def test_each_success_moves_on_and_the_last_one_completes(engine: Engine) -> None:
    saga = new_saga()
    command: Command | None = started(engine, saga)
    seen = []
    while command is not None:
        seen.append((command.step_index, command.direction, command.attempt))
        transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(OK), T0 + 1)
        assert transition.events[0].type == "StepSucceeded"
        command = transition.next_command
    assert seen == [(i, ACTION, 1) for i in range(4)]
    assert types(transition) == ["StepSucceeded", "SagaCompleted"]
    assert (saga.status, saga.ended_at, saga.ended) == (Status.COMPLETED, T0 + 1, True)
    assert set(saga.results) == set(NAMES)


def test_idempotency_keys_are_one_per_step_and_direction_whatever_the_attempt() -> None:
    first = Command("s1", CHARGE, ACTION, 1, T0)
    assert first.idempotency_key("charge_payment") == "s1/charge_payment/action"
    assert replace(first, attempt=7).idempotency_key("charge_payment") == "s1/charge_payment/action"
    assert replace(first, direction=COMPENSATION).idempotency_key("charge_payment") == "s1/charge_payment/compensation"


# -- refusals and compensation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        (RESERVE, []),
        (CHARGE, ["reserve_stock"]),
        (SHIP, ["charge_payment", "reserve_stock"]),
    ],
)
def test_a_refusal_compensates_the_steps_before_it_newest_first(
    engine: Engine, failing: int, expected: list[str]
) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, failing)
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED, "no"), T0)
    assert types(transition)[:2] == ["StepFailed", "CompensationStarted"]
    assert "StepRetryScheduled" not in types(transition)
    assert transition.events[0].code == "FAILED_PRECONDITION"
    assert compensate_all(engine, saga, transition.next_command) == expected
    assert saga.status == Status.COMPENSATED and saga.ended


def test_retries_stop_at_maximum_attempts_and_the_unknown_step_is_compensated_too(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    step = ORDER_SAGA.step(CHARGE)
    for attempt in range(1, step.retry.maximum_attempts):
        transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(DEADLINE_EXCEEDED), T0)
        assert types(transition) == ["StepFailed", "StepRetryScheduled"]
        retry = transition.next_command
        assert retry is not None and (retry.step_index, retry.direction, retry.attempt) == (CHARGE, ACTION, attempt + 1)
        assert retry.uncertain and retry.first_attempt_at == T0
        command = retry
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(DEADLINE_EXCEEDED), T0)
    assert types(transition) == ["StepFailed", "CompensationStarted"]
    # The charge may have happened: it is refunded before the stock is released.
    assert compensate_all(engine, saga, transition.next_command) == ["charge_payment", "reserve_stock"]


def test_a_refusal_after_an_unknown_outcome_proves_the_step_did_not_happen(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, SHIP)
    retry = engine.on_outcome(ORDER_SAGA, saga, command, outcome(DEADLINE_EXCEEDED), T0).next_command
    assert retry is not None and retry.uncertain
    # The service answers a known key with its recorded outcome: a refusal under our key (say
    # ORDER_ALREADY_SHIPPED, another saga's shipment) means ours never took effect, so cancelling
    # the shipment would undo somebody else's.
    transition = engine.on_outcome(ORDER_SAGA, saga, retry, outcome(REFUSED, "ORDER_ALREADY_SHIPPED"), T0)
    assert compensate_all(engine, saga, transition.next_command) == ["charge_payment", "reserve_stock"]


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS])
def test_an_internal_answer_may_have_happened_and_is_compensated_too(engine: Engine, code: grpc.StatusCode) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    # Not retried (the participant failed, the same request may fail again)...
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(code, "commit failed"), T0)
    assert types(transition) == ["StepFailed", "CompensationStarted"]
    # ...but its commit may have happened: the charge is refunded before the stock is released.
    assert compensate_all(engine, saga, transition.next_command) == ["charge_payment", "reserve_stock"]


def test_a_step_may_make_internal_retryable_and_it_stays_uncertain(engine: Engine) -> None:
    charge = replace(ORDER_SAGA.step(CHARGE), retryable_codes=frozenset({grpc.StatusCode.INTERNAL}))
    definition = replace(ORDER_SAGA, steps=(ORDER_SAGA.step(RESERVE), charge, *ORDER_SAGA.steps[SHIP:]))
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE, definition)
    retry = engine.on_outcome(definition, saga, command, outcome(grpc.StatusCode.INTERNAL), T0).next_command
    assert retry is not None and retry.direction == ACTION and retry.attempt == 2 and retry.uncertain


def test_an_answer_that_says_nothing_keeps_what_earlier_attempts_left_unknown() -> None:
    step = ORDER_SAGA.step(CHARGE)
    assert step.may_have_happened(grpc.StatusCode.PERMISSION_DENIED, True)
    assert not step.may_have_happened(grpc.StatusCode.PERMISSION_DENIED, False)
    assert not step.may_have_happened(REFUSED, True)
    assert step.may_have_happened(DEADLINE_EXCEEDED, False)


def test_a_retry_waits_its_backoff_with_jitter(engine: Engine) -> None:
    saga = new_saga()
    command = started(engine, saga)
    retry = engine.on_outcome(ORDER_SAGA, saga, command, outcome(UNAVAILABLE), T0 + 5).next_command
    assert retry is not None and retry.due_at is not None
    policy = ORDER_SAGA.step(RESERVE).retry
    low, high = policy.initial_interval * (1 - policy.jitter), policy.initial_interval * (1 + policy.jitter)
    assert low <= retry.due_at - (T0 + 5) <= high


def test_retry_policy_backoff_is_exponential_and_capped() -> None:
    policy = RetryPolicy(initial_interval=0.1, backoff=2.0, maximum_interval=1.0, jitter=0.0)
    rng = random.Random(1)
    assert [round(policy.delay(n, rng), 6) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittery = RetryPolicy(initial_interval=1.0, jitter=0.2)
    delays = [jittery.delay(1, rng) for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays) and len(set(delays)) > 1


def test_no_retry_once_the_step_budget_would_be_spent(engine: Engine) -> None:
    tight = replace(ORDER_SAGA.step(RESERVE), budget=1.0, retry=RetryPolicy(initial_interval=0.4, jitter=0.0))
    definition = SagaDefinition("Tight", 1, ORDER_SAGA.input_type, (tight, *ORDER_SAGA.steps[1:]), KEY)
    saga = new_saga()
    command = started(engine, saga, definition)
    retry = engine.on_outcome(definition, saga, command, outcome(UNAVAILABLE), T0 + 0.5).next_command
    assert retry is not None and retry.direction == ACTION  # 0.5 + 0.4 s fits in the 1 s budget
    transition = engine.on_outcome(definition, saga, retry, outcome(UNAVAILABLE), T0 + 0.9)
    assert types(transition) == ["StepFailed", "CompensationStarted"]  # 0.9 + 0.8 s does not
    assert transition.next_command is not None and transition.next_command.direction == COMPENSATION


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED],
)
def test_transient_codes_are_retried(code: grpc.StatusCode) -> None:
    assert ORDER_SAGA.step(CHARGE).is_retryable(code)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        REFUSED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
def test_terminal_codes_are_not_retried(code: grpc.StatusCode) -> None:
    assert not ORDER_SAGA.step(CHARGE).is_retryable(code)


def test_a_step_may_override_the_classification() -> None:
    step = replace(
        ORDER_SAGA.step(CHARGE),
        retryable_codes=frozenset({grpc.StatusCode.NOT_FOUND}),
        non_retryable_codes=frozenset({UNAVAILABLE}),
    )
    assert step.is_retryable(grpc.StatusCode.NOT_FOUND)
    assert not step.is_retryable(UNAVAILABLE)
    assert step.is_retryable(DEADLINE_EXCEEDED)


# -- the saga deadline -----------------------------------------------------------------------


def test_a_retryable_failure_past_the_saga_deadline_compensates(engine: Engine) -> None:
    saga = new_saga(deadline_seconds=10)
    command = advance_to(engine, saga, CHARGE)
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(DEADLINE_EXCEEDED), T0 + 10)
    assert types(transition) == ["StepFailed", "CompensationStarted"]
    assert transition.events[1].message == "saga deadline passed"
    assert compensate_all(engine, saga, transition.next_command) == ["charge_payment", "reserve_stock"]


def test_no_retry_that_would_start_after_the_saga_deadline(engine: Engine) -> None:
    saga = new_saga(deadline_seconds=10)
    command = advance_to(engine, saga, RESERVE)
    # The retry would be due about 50 ms later, past the deadline 10 ms away.
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(UNAVAILABLE), T0 + 9.99)
    assert types(transition) == ["StepFailed", "CompensationStarted"]


# -- past the pivot --------------------------------------------------------------------------


def test_past_the_pivot_failures_retry_then_need_attention_and_never_compensate(engine: Engine) -> None:
    saga = new_saga(deadline_seconds=1)
    command = advance_to(engine, saga, CONFIRM)
    step = ORDER_SAGA.step(CONFIRM)
    now = T0 + 5  # past the saga deadline: the confirmation is retried all the same
    for _ in range(step.retry.maximum_attempts - 1):
        transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(UNAVAILABLE), now)
        assert types(transition) == ["StepFailed", "StepRetryScheduled"]
        assert transition.next_command is not None
        command = transition.next_command
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(UNAVAILABLE), now)
    assert types(transition) == ["StepFailed", "SagaNeedsAttention"]
    assert transition.next_command is None
    assert saga.status == Status.NEEDS_ATTENTION and not saga.ended
    assert saga.compensations == [] and "send_confirmation" in saga.last_error


def test_past_the_pivot_a_refusal_needs_attention_at_once(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CONFIRM)
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED, "bad recipient"), T0)
    assert types(transition) == ["StepFailed", "SagaNeedsAttention"]
    assert transition.next_command is None and saga.status == Status.NEEDS_ATTENTION


# -- compensations ---------------------------------------------------------------------------


def test_compensation_failures_retry_then_need_attention_and_retry_resumes_compensating(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, SHIP)
    compensation = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0).next_command
    assert compensation is not None and compensation.step_index == CHARGE
    transition = engine.on_outcome(ORDER_SAGA, saga, compensation, outcome(UNAVAILABLE), T0)
    assert types(transition) == ["CompensationFailed", "CompensationRetryScheduled"]
    compensation = transition.next_command
    assert compensation is not None and (compensation.step_index, compensation.attempt) == (CHARGE, 2)
    transition = engine.on_outcome(ORDER_SAGA, saga, compensation, outcome(grpc.StatusCode.INTERNAL), T0)
    assert types(transition) == ["CompensationFailed", "SagaNeedsAttention"]
    assert saga.status == Status.NEEDS_ATTENTION and saga.compensations == [CHARGE, RESERVE]
    assert "charge_payment compensation" in saga.last_error

    retried = engine.retry(saga, "ops", T0 + 60)
    assert types(retried) == ["SagaRetried"] and retried.events[0].actor == "ops"
    assert status_of(saga) == Status.COMPENSATING
    assert retried.next_command == Command("s1", CHARGE, COMPENSATION, 1, T0 + 60, due_at=T0 + 60)
    assert compensate_all(engine, saga, retried.next_command) == ["charge_payment", "reserve_stock"]
    assert status_of(saga) == Status.COMPENSATED


def test_compensations_give_up_after_their_maximum_attempts(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    compensation = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0).next_command
    attempts = 0
    while compensation is not None:
        attempts += 1
        compensation = engine.on_outcome(ORDER_SAGA, saga, compensation, outcome(UNAVAILABLE), T0).next_command
    assert attempts == ORDER_SAGA.step(RESERVE).compensation_retry.maximum_attempts
    assert saga.status == Status.NEEDS_ATTENTION


def test_retry_of_a_forward_step_that_needs_attention_runs_it_again(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CONFIRM)
    engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0)
    retried = engine.retry(saga, "ops", T0 + 9)
    assert saga.status == Status.RUNNING
    assert retried.next_command == Command("s1", CONFIRM, ACTION, 1, T0 + 9, due_at=T0 + 9)
    transition = engine.on_outcome(ORDER_SAGA, saga, retried.next_command, outcome(OK), T0 + 10)
    assert types(transition) == ["StepSucceeded", "SagaCompleted"] and status_of(saga) == Status.COMPLETED


# -- operator calls --------------------------------------------------------------------------


def refusal_reason(call: object) -> str:
    assert isinstance(call, FailedPrecondition)
    return call.reason


def saga_in(status: Status, *, paused: bool = False, step_index: int = 0) -> SagaState:
    saga = new_saga()
    saga.status, saga.paused, saga.step_index = status, paused, step_index
    if status in (Status.COMPLETED, Status.COMPENSATED, Status.TERMINATED):
        saga.ended_at = T0
    return saga


def apply(engine: Engine, operation: str, saga: SagaState) -> Transition:
    pending = Command(saga.saga_id, saga.step_index, ACTION, 1, T0, due_at=T0)
    if operation == "pause":
        return engine.pause(saga, pending, "ops", "", T0)
    if operation == "resume":
        return engine.resume(saga, pending, "ops", T0)
    if operation == "cancel":
        return engine.cancel(ORDER_SAGA, saga, pending, False, "ops", "", T0)
    if operation == "terminate":
        return engine.terminate(saga, "ops", "why", T0)
    return engine.retry(saga, "ops", T0)


STATES = {
    "running": lambda: saga_in(Status.RUNNING, step_index=CHARGE),
    "running past the pivot": lambda: saga_in(Status.RUNNING, step_index=CONFIRM),
    "paused": lambda: saga_in(Status.RUNNING, paused=True, step_index=CHARGE),
    "compensating": lambda: saga_in(Status.COMPENSATING),
    "needs attention": lambda: saga_in(Status.NEEDS_ATTENTION, step_index=CONFIRM),
    "completed": lambda: saga_in(Status.COMPLETED, step_index=CONFIRM),
    "compensated": lambda: saga_in(Status.COMPENSATED),
    "terminated": lambda: saga_in(Status.TERMINATED),
}
LEGAL = {
    "pause": {"running", "running past the pivot", "compensating"},
    "resume": {"paused"},
    "cancel": {"running", "paused"},
    "terminate": {"running", "running past the pivot", "paused", "compensating", "needs attention"},
    "retry": {"needs attention"},
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("operation", list(LEGAL))
def test_operator_calls_are_legal_only_in_their_states(engine: Engine, operation: str, state: str) -> None:
    saga = STATES[state]()
    if state in LEGAL[operation]:
        transition = apply(engine, operation, saga)
        assert transition.events and transition.events[0].actor == "ops"
        return
    before = replace(saga)
    with pytest.raises(FailedPrecondition) as refused:
        apply(engine, operation, saga)
    assert refused.value.reason == f"ILLEGAL_STATE_FOR_{operation.upper()}"
    shown = "PAUSED" if saga.paused else saga.status
    assert f"in status {shown}" in refused.value.message
    assert saga == before


def test_pause_holds_the_next_command_and_resume_releases_it(engine: Engine) -> None:
    saga = new_saga()
    command = started(engine, saga)
    paused = engine.pause(saga, command, "ops", "look", T0 + 1)
    assert types(paused) == ["SagaPaused"] and paused.events[0].message == "look"
    assert saga.paused and paused.next_command is command and command.due_at is None
    # The call that was on the wire finishes; the next one waits.
    next_command = engine.on_outcome(ORDER_SAGA, saga, command, outcome(OK), T0 + 2).next_command
    assert next_command is not None and next_command.step_index == CHARGE and next_command.due_at is None
    resumed = engine.resume(saga, next_command, "ops", T0 + 3)
    assert types(resumed) == ["SagaResumed"] and not saga.paused
    assert resumed.next_command is next_command and next_command.due_at == T0 + 3


def test_cancel_with_a_call_on_the_wire_lets_its_outcome_start_the_compensation(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    transition = engine.cancel(ORDER_SAGA, saga, command, True, "ops", "customer asked", T0)
    assert types(transition) == ["SagaCancelRequested"] and transition.next_command is command
    assert saga.cancel_requested and saga.status == Status.RUNNING
    # The charge succeeded after all: it is refunded, and nothing is retried or sent forward.
    after = engine.on_outcome(ORDER_SAGA, saga, command, outcome(OK), T0)
    assert types(after) == ["StepSucceeded", "CompensationStarted"]
    assert compensate_all(engine, saga, after.next_command) == ["charge_payment", "reserve_stock"]


def test_cancel_stops_the_retries_of_a_call_on_the_wire(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    engine.cancel(ORDER_SAGA, saga, command, True, "ops", "", T0)
    after = engine.on_outcome(ORDER_SAGA, saga, command, outcome(UNAVAILABLE), T0)
    assert types(after) == ["StepFailed", "CompensationStarted"]
    assert after.events[1].message == "cancelled"
    assert compensate_all(engine, saga, after.next_command) == ["charge_payment", "reserve_stock"]


@pytest.mark.parametrize(
    ("uncertain", "expected"), [(False, ["reserve_stock"]), (True, ["charge_payment", "reserve_stock"])]
)
def test_cancel_with_nothing_on_the_wire_compensates_at_once(
    engine: Engine, uncertain: bool, expected: list[str]
) -> None:
    saga = new_saga()
    pending = advance_to(engine, saga, CHARGE)
    pending.uncertain = uncertain  # a retry after an unknown outcome: the charge may have happened
    transition = engine.cancel(ORDER_SAGA, saga, pending, False, "ops", "", T0)
    assert types(transition) == ["SagaCancelRequested", "CompensationStarted"]
    assert compensate_all(engine, saga, transition.next_command) == expected


def test_terminate_records_the_reason_and_sends_nothing_more(engine: Engine) -> None:
    saga = new_saga()
    advance_to(engine, saga, SHIP)
    transition = engine.terminate(saga, "ops", "fraud", T0 + 4)
    assert types(transition) == ["SagaTerminated"] and transition.events[0].message == "fraud"
    assert transition.next_command is None
    assert (saga.status, saga.ended_at, saga.compensations) == (Status.TERMINATED, T0 + 4, [])
    assert "fraud" in saga.last_error


def test_a_call_on_the_wire_at_terminate_is_recorded_when_it_returns_and_never_undone(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    engine.terminate(saga, "ops", "fraud", T0 + 1)
    after = engine.on_outcome(ORDER_SAGA, saga, command, outcome(OK), T0 + 2)
    assert types(after) == ["EffectAfterTerminate"] and after.next_command is None
    assert (after.events[0].step, after.events[0].code) == ("charge_payment", "OK")
    assert after.events[0].message == "effect applied after terminate; not compensated"
    assert saga.status == Status.TERMINATED and saga.results["charge_payment"] == b"response"


@pytest.mark.parametrize(
    ("code", "event_type"),
    [(DEADLINE_EXCEEDED, "EffectAfterTerminate"), (grpc.StatusCode.UNKNOWN, "EffectAfterTerminate"),
     (REFUSED, "StepFailed")],
)  # fmt: skip
def test_a_call_at_terminate_that_fails_is_recorded_as_unknown_or_as_refused(
    engine: Engine, code: grpc.StatusCode, event_type: str
) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, SHIP)
    engine.terminate(saga, "ops", "fraud", T0 + 1)
    after = engine.on_outcome(ORDER_SAGA, saga, command, outcome(code, "lost"), T0 + 2)
    assert types(after) == [event_type] and after.next_command is None
    assert saga.status == Status.TERMINATED
    if event_type == "EffectAfterTerminate":
        assert "may stand; not compensated" in after.events[0].message


def test_a_compensation_on_the_wire_at_terminate_is_recorded_too(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CHARGE)
    compensation = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0).next_command
    assert compensation is not None and compensation.direction == COMPENSATION
    engine.terminate(saga, "ops", "stop", T0 + 1)
    after = engine.on_outcome(ORDER_SAGA, saga, compensation, outcome(OK), T0 + 2)
    assert types(after) == ["CompensationSucceeded"] and after.next_command is None
    assert saga.status == Status.TERMINATED


def test_a_saga_whose_definition_is_missing_waits_for_an_operator(engine: Engine) -> None:
    saga = new_saga()
    advance_to(engine, saga, CHARGE)
    transition = engine.definition_missing(saga, "no saga definition OrderSaga v1 is registered", T0 + 1)
    assert types(transition) == ["SagaNeedsAttention"] and transition.events[0].code == "DEFINITION_MISSING"
    assert saga.status == Status.NEEDS_ATTENTION and saga.last_error.startswith("DEFINITION_MISSING: ")
    assert transition.next_command is None


def test_a_paused_saga_that_needs_attention_is_reported_as_such(engine: Engine) -> None:
    saga = new_saga()
    command = advance_to(engine, saga, CONFIRM)
    engine.pause(saga, command, "ops", "", T0)
    # The confirmation on the wire is refused: the saga now waits for an operator, not for resume.
    engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0)
    assert saga.status == Status.NEEDS_ATTENTION and not saga.paused
    retried = engine.retry(saga, "ops", T0 + 1)
    assert retried.next_command is not None and retried.next_command.due_at == T0 + 1


# -- definitions -----------------------------------------------------------------------------


def test_definitions_are_checked_when_built() -> None:
    reserve, charge, _ship, confirm = order_steps()
    with pytest.raises(ValueError, match="unique"):
        SagaDefinition("Bad", 1, ORDER_SAGA.input_type, (reserve, reserve), KEY)
    with pytest.raises(ValueError, match="before retriable"):
        SagaDefinition("Bad", 1, ORDER_SAGA.input_type, (reserve, confirm, charge), KEY)
    with pytest.raises(ValueError, match="needs a compensation"):
        SagaDefinition("Bad", 1, ORDER_SAGA.input_type, (replace(reserve, compensation=None),), KEY)
    assert ORDER_SAGA.pivot_index == SHIP
    notify_only = (replace(confirm, kind=StepKind.RETRIABLE),)
    only_retriable = SagaDefinition("Notify", 1, ORDER_SAGA.input_type, notify_only, KEY)
    assert only_retriable.pivot_index == -1


def test_the_registry_starts_new_sagas_on_the_latest_version_and_keeps_old_ones() -> None:
    reserve, charge, ship, confirm = order_steps()
    v2 = SagaDefinition("OrderSaga", 2, ORDER_SAGA.input_type, (charge, reserve, ship, confirm), KEY)
    registry = DefinitionRegistry([ORDER_SAGA, v2])
    assert registry.latest("OrderSaga") is v2
    assert registry.get("OrderSaga", 1) is ORDER_SAGA
    assert registry.names() == ["OrderSaga"]
    with pytest.raises(LookupError):
        registry.get("OrderSaga", 3)
    with pytest.raises(LookupError):
        registry.latest("GiftCardSaga")
    with pytest.raises(ValueError, match="registered already"):
        registry.register(SagaDefinition("OrderSaga", 2, ORDER_SAGA.input_type, (reserve,), KEY))


def test_a_missing_version_is_refused_with_its_reason() -> None:
    registry = DefinitionRegistry([ORDER_SAGA])
    with pytest.raises(DefinitionMissing) as missing:
        registry.get("LoyaltySaga", 1)
    assert missing.value.reason == "DEFINITION_MISSING" and missing.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (missing.value.saga_type, missing.value.version) == ("LoyaltySaga", 1)
    assert registry.find("LoyaltySaga", 1) is None and registry.keys() == {("OrderSaga", 1)}


def test_a_definition_declares_its_business_key_and_a_start_under_another_is_refused() -> None:
    reserve = ORDER_SAGA.step(RESERVE)
    with pytest.raises(ValueError, match="business_key"):
        SagaDefinition("NoKey", 1, ORDER_SAGA.input_type, (reserve,))
    order = ORDER_SAGA.input_type(order_id="X")
    assert ORDER_SAGA.business_key_of(order) == "X"
    ORDER_SAGA.check_business_key("X", order)
    with pytest.raises(BusinessKeyMismatch) as mismatch:
        ORDER_SAGA.check_business_key("X-again", order)
    assert [v.field for v in mismatch.value.violations] == ["business_key"]
    assert "'X'" in mismatch.value.message and "'X-again'" in mismatch.value.message
