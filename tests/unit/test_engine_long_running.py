"""orchestrator.engine, long-running nodes: timers, signal waits, approvals, children, parallel groups, conditions."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest
from google.protobuf import struct_pb2

from orchestrator.definition import (
    Approval,
    ChildSaga,
    Node,
    OnTimeout,
    Parallel,
    RetryPolicy,
    SagaContext,
    SagaDefinition,
    Step,
    StepKind,
    Timer,
    WaitForSignal,
    approval_signal,
    rpc,
)
from orchestrator.engine import (
    ACTION,
    COMPENSATION,
    ChildStart,
    Command,
    Engine,
    Event,
    Others,
    Outcome,
    Progress,
    SagaState,
    Status,
    Transition,
    child_past_pivot,
    compensation_order,
)
from orchestrator.sagas.order import (
    CREATE_SHIPMENT,
    ORDER_SAGA,
    RESERVE_STOCK,
    SEND_CONFIRMATION,
    order_key,
    refund,
)
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

T0 = 1_000_000.0
HOUR = 3600.0
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INTERNAL = grpc.StatusCode.INTERNAL
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
INPUT = PlaceOrderRequest(order_id="order-1", payment_token="tok-input")

POSITIVE = "the timeout must be a positive, finite number of seconds"
POSITIVE_DURATION = "the duration must be a positive, finite number of seconds"


# -- definitions -------------------------------------------------------------------------------


def call(
    name: str,
    *,
    kind: StepKind = StepKind.COMPENSATABLE,
    when: Callable[[SagaContext], bool] | None = None,
    attempts: int | None = None,
) -> Step:
    """A call step named name: compensatable (ReserveStock/ReleaseStock) or retriable (SendConfirmation)."""
    step = replace(SEND_CONFIRMATION if kind is StepKind.RETRIABLE else RESERVE_STOCK, name=name, when=when)
    return replace(step, retry=RetryPolicy(maximum_attempts=attempts)) if attempts is not None else step


def define(*nodes: Node, deadline: float | None = None, name: str = "LongRunning") -> SagaDefinition:
    return SagaDefinition(name, 1, PlaceOrderRequest, tuple(nodes), order_key, deadline=deadline)


def charge_with_signalled_token(s: SagaContext) -> payment.ChargeRequest:
    # A later step's request builder reads the payload the wait consumed.
    return payment.ChargeRequest(order_id=s.input.order_id, payment_token=str(s.signal("await_payment")["token"]))


CHARGE = Step(
    "charge",
    action=rpc("payment", payment, "Charge", charge_with_signalled_token),
    compensation=rpc("payment", payment, "Refund", refund),
)
NOTIFY = call("notify", kind=StepKind.RETRIABLE)


def signalled(on_timeout: OnTimeout = OnTimeout.COMPENSATE, deadline: float | None = None) -> SagaDefinition:
    """a, a wait for payment_ok (10 min), charge (the pivot, reading the signal), notify."""
    wait = WaitForSignal("await_payment", timeout=600, signal="payment_ok", on_timeout=on_timeout)
    return define(call("a"), wait, CHARGE, NOTIFY, deadline=deadline)


def raises(s: SagaContext) -> bool:
    raise ZeroDivisionError("division by zero")


def never(s: SagaContext) -> bool:
    return False


# -- a saga driven by hand -----------------------------------------------------------------------


def new_saga(definition: SagaDefinition, deadline_seconds: float = HOUR, saga_id: str = "s1") -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_type=definition.name,
        version=definition.version,
        business_key="order-1",
        input=INPUT.SerializeToString(),
        status=Status.RUNNING,
        deadline_at=T0 + deadline_seconds,
        created_at=T0,
        updated_at=T0,
    )


def outcome(code: grpc.StatusCode, at: float = T0, response: bytes = b"") -> Outcome:
    return Outcome(code, "" if code is OK else "no", response if code is OK else None, at, at)


def types(transition: Transition | list[Event]) -> list[str]:
    events = transition.events if isinstance(transition, Transition) else transition
    return [event.type for event in events]


def index_of(definition: SagaDefinition, name: str) -> int:
    return next(flat.index for flat in definition.nodes if flat.node.name == name)


def name_of(definition: SagaDefinition, index: int) -> str:
    return definition.nodes[index].node.name


def status_of(saga: SagaState) -> Status:
    """The saga's status now; mypy would keep an earlier assert's narrowing across the engine's updates."""
    return saga.status


def struct(**fields: str | bool) -> bytes:
    payload = struct_pb2.Struct()
    payload.update(fields)
    return payload.SerializeToString(deterministic=True)


class Run:
    """One saga driven by hand: its pending commands by track, as its outbox rows would hold them.

    A command is taken off (the dispatcher's fence deletes its row) before its outcome or wake is
    applied, so Others holds only the other tracks, as in the dispatcher.
    """

    def __init__(self, engine: Engine, definition: SagaDefinition, deadline_seconds: float = HOUR) -> None:
        self.engine, self.definition = engine, definition
        self.saga = new_saga(definition, deadline_seconds)
        self.pending: dict[str, Command] = {}
        self.events: list[Event] = []
        self.last = self.apply(engine.start(definition, self.saga, T0))

    def apply(self, transition: Transition) -> Transition:
        for track in transition.drop:
            self.pending.pop(track, None)
        for command in transition.commands():
            self.pending[command.track] = command
        self.events += transition.events
        self.last = transition
        return transition

    def command(self, name: str) -> Command:
        index = index_of(self.definition, name)
        found = [command for command in self.pending.values() if command.step_index == index]
        assert len(found) == 1, f"{name} has no pending command: {self.pending}"
        return found[0]

    def others(self, track: str, wire: bool) -> Others:
        """The other tracks' commands; with wire, every call among them (not a wait) is on the wire."""
        commands = {other: command for other, command in self.pending.items() if other != track}
        calls = {other for other, command in commands.items() if self.is_call(command)}
        return Others(commands, frozenset(calls if wire else ()))

    def is_call(self, command: Command) -> bool:
        return isinstance(self.definition.node(command.step_index), Step)

    def take(self, name: str) -> Command:
        command = self.command(name)
        del self.pending[command.track]
        return command

    def answer(
        self, name: str, code: grpc.StatusCode = OK, *, at: float = T0, wire: bool = False, response: bytes = b""
    ) -> Transition:
        command = self.take(name)
        others = self.others(command.track, wire)
        return self.apply(
            self.engine.on_outcome(self.definition, self.saga, command, outcome(code, at, response), at, others)
        )

    def wake(self, name: str, *, at: float, wire: bool = False, child: SagaState | None = None) -> Transition:
        command = self.take(name)
        others = self.others(command.track, wire)
        return self.apply(self.engine.on_wake(self.definition, self.saga, command, at, others, child))

    def signal(self, name: str, payload: bytes, *, at: float, signal_id: str = "sig-1") -> Transition:
        return self.apply(self.engine.receive_signal(self.saga, name, signal_id, payload, "sender", at))

    def decide(self, step: str, approved: bool, *, at: float, actor: str = "alice", reason: str = "") -> Transition:
        """What DecideApproval records: the decision as its payload and as the engine's decision bytes."""
        payload = struct(approved=approved, reason=reason, actor=actor)
        decision = json.dumps({"approved": approved, "reason": reason}, sort_keys=True).encode()
        name = approval_signal(step)
        return self.apply(self.engine.receive_signal(self.saga, name, name, payload, actor, at, decision))

    def compensate_all(self, at: float = T0) -> list[str]:
        """Answer every compensation call with OK; the steps compensated, in order."""
        done = []
        while (command := self.pending.get("")) is not None and command.direction == COMPENSATION:
            assert set(self.pending) == {""}, f"compensating while other tracks are pending: {self.pending}"
            del self.pending[""]
            done.append(name_of(self.definition, command.step_index))
            self.apply(self.engine.on_outcome(self.definition, self.saga, command, outcome(OK, at), at))
        return done

    def context(self) -> SagaContext:
        saga = self.saga
        return self.definition.context(saga.saga_id, saga.input, saga.results, saga.business_key)


@pytest.fixture
def engine() -> Engine:
    return Engine(random.Random(7))


# -- 1. refused at load --------------------------------------------------------------------------

A, B, C = call("a"), call("b"), call("c")
ONE_SHOT = SagaDefinition("OneShot", 1, PlaceOrderRequest, (call("x"),), order_key)


@pytest.mark.parametrize(
    ("nodes", "deadline", "message"),
    [
        ((WaitForSignal("w", timeout=0), A), None, f"w: {POSITIVE}"),
        ((WaitForSignal("w", timeout=math.nan), A), None, f"w: {POSITIVE}"),
        ((Approval("ap", timeout=-5), A), None, f"ap: {POSITIVE}"),
        ((Timer("t", duration=0), A), None, f"t: {POSITIVE_DURATION}"),
        ((WaitForSignal("w", timeout=61), A), 60.0, r"w: the timeout \(61 s\) exceeds the saga deadline \(60 s\)"),
        ((Approval("ap", timeout=120), A), 60.0, r"ap: the timeout \(120 s\) exceeds the saga deadline \(60 s\)"),
        ((Timer("t", duration=90), A), 60.0, r"t: the duration \(90 s\) exceeds the saga deadline \(60 s\)"),
        ((Timer("t", duration=5, until=lambda s: T0), A), None, "timer t needs exactly one of duration or until"),
        ((Timer("t"), A), None, "timer t needs exactly one of duration or until"),
        ((Parallel("outer", ((A,), (Parallel("inner", ((B,), (C,))),))),), None,
         "parallel group inner is inside another; groups do not nest"),
        ((Parallel("g", ((A,),)),), None, "parallel group g needs at least two non-empty branches"),
        ((Parallel("g", ((A,), ())),), None, "parallel group g needs at least two non-empty branches"),
        ((Parallel("g", ((A,), (call("r", kind=StepKind.RETRIABLE),))),), None,
         "step r is retriable, which a parallel branch cannot hold"),
        ((Parallel("g", ((A, B), (call("b"),))),), None, "step names must be unique; b appear more than once"),
        ((A, Parallel("g", ((call("a"),), (B,)))), None, "step names must be unique; a appear more than once"),
        ((Parallel("g", ((WaitForSignal("w", timeout=5, on_timeout=OnTimeout.FAIL),), (A,))),), None,
         "wait w in a parallel branch cannot fail for an operator on timeout"),
        ((A, Approval("ap", timeout=60)), None, r"approval ap comes after the pivot \(a\)"),
        ((A, WaitForSignal("w", timeout=60), NOTIFY), None, r"signal w comes after the pivot \(a\)"),
        ((Approval("ap", timeout=60, remind_after=60), A), None,
         "approval ap: remind_after must be positive and shorter than its timeout"),
        ((Approval("ap", timeout=60, remind_after=90), A), None,
         "approval ap: remind_after must be positive and shorter than its timeout"),
        ((WaitForSignal("w", timeout=5, signal="9lives"), A), None, "wait w: signal name '9lives' must match"),
        ((ChildSaga("kid", ONE_SHOT, build_input=lambda s: s.input),), None,
         "child step kid cannot start its own definition"),
    ],
)  # fmt: skip
def test_a_definition_that_breaks_a_rule_is_refused_naming_the_problem(
    nodes: tuple[Node, ...], deadline: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        SagaDefinition("OneShot", 1, PlaceOrderRequest, nodes, order_key, deadline=deadline)
    assert str(refused.value).startswith("OneShot v1: ")


def test_what_the_rules_allow_loads() -> None:
    # After the pivot: a wait that continues or fails, and a timer, whose until is not checked at load.
    define(A, WaitForSignal("w", timeout=30, on_timeout=OnTimeout.CONTINUE), Timer("t", until=lambda s: T0 + 1e9),
           WaitForSignal("v", timeout=60, on_timeout=OnTimeout.FAIL), NOTIFY, deadline=60.0)  # fmt: skip
    # Waits exactly as long as the deadline, and an approval before the pivot with a shorter reminder.
    define(Timer("t", duration=60), Approval("ap", timeout=60, remind_after=59), A, deadline=60.0)
    # A signal wait in a branch may compensate or continue on timeout.
    definition = define(Parallel("g", ((WaitForSignal("w", timeout=5), A), (B,))))
    assert definition.pivot_index == index_of(definition, "b")


def test_a_compensating_wait_or_approval_in_any_branch_loads() -> None:
    define(Parallel("g", ((A,), (WaitForSignal("w", timeout=5),))))
    define(Parallel("g", ((A,), (Approval("ap", timeout=5),))))


def test_an_infinite_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match=f"w: {POSITIVE}"):
        define(A, WaitForSignal("w", timeout=math.inf, on_timeout=OnTimeout.FAIL), NOTIFY)


def test_an_approval_in_a_definition_without_compensatable_steps_does_not_name_another_step_as_pivot() -> None:
    with pytest.raises(ValueError) as refused:
        define(Approval("ap", timeout=60), NOTIFY)
    assert "(notify)" not in str(refused.value)


# -- 2. timers -----------------------------------------------------------------------------------

TIMED = define(call("a"), Timer("cool_off", duration=60), call("b"), NOTIFY)


def test_a_timer_is_stored_with_its_wake_time_and_due_then(engine: Engine) -> None:
    run = Run(engine, TIMED)
    transition = run.answer("a", at=T0 + 1)
    assert types(transition) == ["StepSucceeded", "WaitStarted"]
    assert transition.events[1].message == "timer fires at 1970-01-12T13:47:41Z"  # T0 + 61 s
    assert transition.next_command == Command(
        "s1", index_of(TIMED, "cool_off"), ACTION, 1, T0 + 1, due_at=T0 + 61, wait_until=T0 + 61
    )


def test_a_timer_woken_early_is_put_back_at_its_wake_time(engine: Engine) -> None:
    run = Run(engine, TIMED)
    run.answer("a")
    transition = run.wake("cool_off", at=T0 + 10)
    again = transition.next_command
    assert transition.events == [] and again is not None
    assert (again.step_index, again.due_at, again.wait_until) == (index_of(TIMED, "cool_off"), T0 + 60, T0 + 60)


def test_a_timer_that_fires_records_how_late_it_is_and_moves_on(engine: Engine) -> None:
    run = Run(engine, TIMED)
    run.answer("a")
    transition = run.wake("cool_off", at=T0 + 60.25)
    assert types(transition) == ["TimerFired"]
    fired = transition.events[0]
    assert (fired.step, fired.message, fired.duration_ms) == ("cool_off", "250 ms late", 250.0)
    assert fired.since == T0  # when the wait began: the start of its span
    assert transition.next_command == Command("s1", index_of(TIMED, "b"), ACTION, 1, T0 + 60.25, due_at=T0 + 60.25)


def test_a_timer_until_a_time_past_is_due_at_once_and_fires_late(engine: Engine) -> None:
    definition = define(Timer("until", until=lambda s: T0 - 5), call("a"))
    run = Run(engine, definition)
    assert run.last.next_command is not None and run.last.next_command.due_at == T0 - 5
    assert types(run.wake("until", at=T0)) == ["TimerFired"]
    assert run.last.events[0].message == "5000 ms late" and run.command("a").direction == ACTION


def test_a_timer_whose_wake_time_cannot_be_computed_needs_attention(engine: Engine) -> None:
    definition = define(call("a"), Timer("until", until=lambda s: float(s.signal("nothing")["at"])), call("b"))
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "SagaNeedsAttention"] and transition.next_command is None
    assert run.saga.last_error.startswith("until: its wake-up time failed: LookupError: ")


def test_a_timer_before_the_pivot_is_cut_by_the_saga_deadline_and_then_compensates(engine: Engine) -> None:
    run = Run(engine, TIMED, deadline_seconds=30)
    run.answer("a")
    timer = run.command("cool_off")
    assert timer.wait_until == timer.due_at == T0 + 30
    transition = run.wake("cool_off", at=T0 + 30)
    assert types(transition) == ["TimerFired", "CompensationStarted"]
    assert transition.events[1].message == "saga deadline passed"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_a_timer_after_the_pivot_is_not_capped_and_the_saga_goes_on(engine: Engine) -> None:
    definition = define(call("a"), Timer("cool_off", duration=60), NOTIFY)
    run = Run(engine, definition, deadline_seconds=30)
    run.answer("a")
    assert run.command("cool_off").wait_until == T0 + 60
    assert types(run.wake("cool_off", at=T0 + 60)) == ["TimerFired"]
    assert run.command("notify").direction == ACTION


def test_a_timer_in_any_branch_of_a_group_that_can_compensate_is_capped(engine: Engine) -> None:
    definition = define(Parallel("g", ((call("a"),), (Timer("t", duration=60),))), NOTIFY)
    run = Run(engine, definition, deadline_seconds=30)
    assert run.command("t").wait_until == T0 + 30


# -- 3. signal waits -----------------------------------------------------------------------------


def test_a_signal_before_the_wait_is_kept_and_consumed_when_the_wait_begins(engine: Engine) -> None:
    definition = signalled()
    run = Run(engine, definition)
    received = run.signal("payment_ok", struct(token="tok-signal"), at=T0 + 1)
    assert types(received) == ["SignalReceived"] and received.next_command is None
    assert received.events[0].message == "payment_ok (sig-1)" and received.events[0].actor == "sender"
    assert [signal["id"] for signal in run.saga.progress.signals] == ["sig-1"]

    transition = run.answer("a", at=T0 + 3)
    assert types(transition) == ["StepSucceeded", "WaitStarted", "SignalConsumed"]
    assert transition.events[2].duration_ms == 2000.0  # from receipt to consumption
    # No wait row: the next command is the charge itself.
    assert transition.commands() == [Command("s1", index_of(definition, "charge"), ACTION, 1, T0 + 3, due_at=T0 + 3)]
    assert run.saga.progress.signals == []
    assert run.context().signal("await_payment") == {"token": "tok-signal"}


def test_a_signal_during_the_wait_is_consumed_when_the_wait_wakes(engine: Engine) -> None:
    definition = signalled()
    run = Run(engine, definition)
    run.answer("a")
    wait = run.command("await_payment")
    assert (wait.wait_until, wait.due_at) == (T0 + 600, T0 + 600)
    assert run.signal("payment_ok", struct(token="tok-signal"), at=T0 + 5).next_command is None
    transition = run.wake("await_payment", at=T0 + 5.5)
    assert types(transition) == ["SignalConsumed"]
    consumed = transition.events[0]
    assert (consumed.step, consumed.code, consumed.message) == ("await_payment", "OK", "signal payment_ok (sig-1)")
    assert (consumed.actor, consumed.duration_ms) == ("sender", 500.0)
    assert run.command("charge").direction == ACTION


def test_a_kept_signal_beats_the_timeout_and_signals_are_consumed_oldest_first(engine: Engine) -> None:
    run = Run(engine, signalled())
    run.answer("a")
    run.signal("payment_ok", struct(token="first"), at=T0 + 1, signal_id="sig-1")
    run.signal("payment_ok", struct(token="second"), at=T0 + 2, signal_id="sig-2")
    assert types(run.wake("await_payment", at=T0 + 5000)) == ["SignalConsumed"]
    assert run.context().signal("await_payment") == {"token": "first"}
    assert [signal["id"] for signal in run.saga.progress.signals] == ["sig-2"]


def test_a_later_request_builder_reads_the_signal_payload(engine: Engine) -> None:
    definition = signalled()
    run = Run(engine, definition)
    run.answer("a")
    run.signal("payment_ok", struct(token="tok-signal"), at=T0 + 1)
    run.wake("await_payment", at=T0 + 1)
    request = definition.step(run.command("charge").step_index).action.build_request(run.context())
    assert request == payment.ChargeRequest(order_id="order-1", payment_token="tok-signal")


def test_a_spurious_wake_puts_the_wait_back_until_its_timeout(engine: Engine) -> None:
    run = Run(engine, signalled())
    run.answer("a")
    transition = run.wake("await_payment", at=T0 + 5)
    assert transition.events == [] and transition.next_command is not None
    assert (transition.next_command.due_at, transition.next_command.wait_until) == (T0 + 600, T0 + 600)


def test_a_wait_that_times_out_with_compensate_unwinds(engine: Engine) -> None:
    run = Run(engine, signalled(OnTimeout.COMPENSATE))
    run.answer("a")
    transition = run.wake("await_payment", at=T0 + 600)
    assert types(transition) == ["WaitTimedOut", "CompensationStarted"]
    assert transition.events[0].code == "DEADLINE_EXCEEDED"
    assert run.saga.last_error == "await_payment: signal payment_ok timed out at 1970-01-12T13:56:40Z"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_a_wait_that_times_out_with_continue_goes_on_without_a_result(engine: Engine) -> None:
    run = Run(engine, signalled(OnTimeout.CONTINUE))
    run.answer("a")
    transition = run.wake("await_payment", at=T0 + 600)
    assert types(transition) == ["WaitTimedOut"]
    assert run.command("charge").direction == ACTION and run.saga.status == Status.RUNNING
    assert not run.context().has_result("await_payment")


def test_a_wait_that_times_out_with_fail_needs_attention(engine: Engine) -> None:
    run = Run(engine, signalled(OnTimeout.FAIL))
    run.answer("a")
    transition = run.wake("await_payment", at=T0 + 600)
    assert types(transition) == ["WaitTimedOut", "SagaNeedsAttention"]
    assert transition.next_command is None and run.pending == {}
    assert run.saga.status == Status.NEEDS_ATTENTION and run.saga.compensations == []


@pytest.mark.parametrize("on_timeout", list(OnTimeout))
def test_a_wait_before_the_pivot_cut_by_the_saga_deadline_compensates_whatever_it_says(
    engine: Engine, on_timeout: OnTimeout
) -> None:
    run = Run(engine, signalled(on_timeout), deadline_seconds=100)
    run.answer("a")
    assert run.command("await_payment").wait_until == T0 + 100
    assert types(run.wake("await_payment", at=T0 + 100)) == ["WaitTimedOut", "CompensationStarted"]
    assert run.compensate_all() == ["a"]


def test_a_wait_after_the_pivot_that_times_out_with_fail_never_unwinds(engine: Engine) -> None:
    definition = define(call("a"), WaitForSignal("w", timeout=600, on_timeout=OnTimeout.FAIL), NOTIFY)
    run = Run(engine, definition, deadline_seconds=60)
    run.answer("a")
    assert run.command("w").wait_until == T0 + 600  # not capped after the pivot
    assert types(run.wake("w", at=T0 + 600)) == ["WaitTimedOut", "SagaNeedsAttention"]
    assert run.saga.compensations == []


def test_a_continue_wait_after_the_pivot_goes_on_even_past_the_saga_deadline(engine: Engine) -> None:
    definition = define(call("a"), WaitForSignal("w", timeout=600, on_timeout=OnTimeout.CONTINUE), NOTIFY)
    run = Run(engine, definition, deadline_seconds=60)
    run.answer("a")
    assert types(run.wake("w", at=T0 + 600)) == ["WaitTimedOut"]
    assert run.command("notify").direction == ACTION and run.saga.status == Status.RUNNING


# -- 4. approvals --------------------------------------------------------------------------------

REVIEWED = define(call("a"), Approval("review", timeout=HOUR, role="reviewer", remind_after=600), call("b"), NOTIFY)


def test_an_approval_waits_for_its_reminder_first_then_its_timeout(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    transition = run.answer("a")
    assert transition.events[1].message == "approval by reviewer, times out at 1970-01-12T14:46:40Z"
    review = run.command("review")
    assert (review.due_at, review.wait_until, review.attempt) == (T0 + 600, T0 + HOUR, 1)


def test_an_approval_approved_goes_on_with_the_decider_as_actor(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    run.answer("a")
    run.decide("review", True, at=T0 + 100, reason="looks fine")
    transition = run.wake("review", at=T0 + 100)
    assert types(transition) == ["ApprovalDecided"]
    decided = transition.events[0]
    assert (decided.code, decided.actor, decided.message) == ("APPROVED", "alice", "approved: looks fine")
    assert run.command("b").direction == ACTION
    assert run.context().signal("review") == {"approved": True, "reason": "looks fine", "actor": "alice"}


def test_an_approval_rejected_compensates(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    run.answer("a")
    run.decide("review", False, at=T0 + 100, actor="bob", reason="too risky")
    transition = run.wake("review", at=T0 + 100)
    assert types(transition) == ["ApprovalDecided", "CompensationStarted"]
    assert (transition.events[0].code, transition.events[0].actor) == ("REJECTED", "bob")
    assert run.saga.last_error == "review rejected by bob: too risky"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_a_decision_before_the_approval_is_kept_and_applied_when_it_begins(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    run.decide("review", True, at=T0)
    transition = run.answer("a", at=T0 + 1)
    assert types(transition) == ["StepSucceeded", "WaitStarted", "ApprovalDecided"]
    assert run.command("b").direction == ACTION


def test_the_reminder_fires_once_and_the_approval_then_waits_for_its_timeout(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    run.answer("a")
    transition = run.wake("review", at=T0 + 600)
    assert types(transition) == ["ApprovalReminder"]
    assert transition.events[0].message == ("waiting since 1970-01-12T13:46:40Z; times out at 1970-01-12T14:46:40Z")
    review = run.command("review")
    assert (review.attempt, review.due_at, review.wait_until, review.first_attempt_at) == (2, T0 + HOUR, T0 + HOUR, T0)
    assert run.wake("review", at=T0 + 1200).events == []  # woken again: no second reminder
    assert run.command("review").attempt == 2
    transition = run.wake("review", at=T0 + HOUR)
    assert types(transition) == ["WaitTimedOut", "CompensationStarted"]
    assert types(run.events).count("ApprovalReminder") == 1
    assert run.compensate_all() == ["a"]


def test_an_approval_woken_before_its_reminder_keeps_the_reminder_time(engine: Engine) -> None:
    run = Run(engine, REVIEWED)
    run.answer("a")
    transition = run.wake("review", at=T0 + 100)
    assert transition.next_command is not None and transition.next_command.due_at == T0 + 600


def test_a_kept_rejection_in_a_branch_stops_the_other_branches_first(engine: Engine) -> None:
    definition = define(Parallel("g", ((call("a"), Approval("review", timeout=HOUR)), (call("b"),))))
    run = Run(engine, definition)
    run.decide("review", False, at=T0)
    transition = run.answer("a", wire=True)
    assert types(transition) == ["StepSucceeded", "WaitStarted", "ApprovalDecided", "BranchesStopping"]
    assert run.saga.status == Status.COMPENSATING and transition.commands() == []
    assert types(run.answer("b")) == ["StepSucceeded", "CompensationStarted"]
    assert run.compensate_all() == ["b", "a"]


# -- 5. parallel groups --------------------------------------------------------------------------

# a, then branch 1 (b1, b2) beside branch 2 (c1), then d and e. c1 gives up after one attempt, so
# an UNAVAILABLE answer is its last.
GROUPED = define(
    call("a"),
    Parallel("g", ((call("b1"), call("b2")), (call("c1", attempts=1),))),
    call("d"),
    call("e"),
)
G, B1, B2, C1 = (index_of(GROUPED, name) for name in ("g", "b1", "b2", "c1"))


def test_entering_a_group_puts_one_command_per_branch(engine: Engine) -> None:
    run = Run(engine, GROUPED)
    transition = run.answer("a", at=T0 + 1)
    assert types(transition) == ["StepSucceeded", "BranchesStarted"]
    assert (transition.events[1].step, transition.events[1].message) == ("g", "2 branches")
    assert transition.commands() == [
        Command("s1", B1, ACTION, 1, T0 + 1, due_at=T0 + 1, track="1"),
        Command("s1", C1, ACTION, 1, T0 + 1, due_at=T0 + 1, track="2"),
    ]
    assert (run.saga.progress.group, run.saga.progress.branches) == (G, {"1": B1, "2": C1})


def test_a_group_completes_only_when_every_branch_has(engine: Engine) -> None:
    run = Run(engine, GROUPED)
    run.answer("a")
    transition = run.answer("c1", wire=True)
    assert types(transition) == ["StepSucceeded"] and transition.commands() == []
    transition = run.answer("b1", wire=True)
    assert types(transition) == ["StepSucceeded"] and [c.track for c in transition.commands()] == ["1"]
    transition = run.answer("b2")
    assert types(transition) == ["StepSucceeded", "BranchesCompleted"]
    assert run.command("d").track == "" and (run.saga.progress.group, run.saga.progress.branches) == (-1, {})
    run.answer("d")
    assert types(run.answer("e")) == ["StepSucceeded", "SagaCompleted"]


def test_a_branch_whose_first_step_is_skipped_still_waits_for_the_others(engine: Engine) -> None:
    definition = define(
        call("a"),
        Parallel("g", ((call("b1", when=never), call("b2")), (call("c1"),), (call("x", when=never),))),
        call("d"),
    )
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "BranchesStarted", "StepSkipped", "StepSkipped"]
    assert sorted(run.pending) == ["1", "2"] and run.command("b2").track == "1"
    assert types(run.answer("c1", wire=True)) == ["StepSucceeded"]
    assert types(run.answer("b2")) == ["StepSucceeded", "BranchesCompleted"]
    assert run.command("d").track == ""


def test_a_group_whose_branches_are_all_skipped_completes_at_once(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((call("b", when=never),), (call("c", when=never),))), call("d"))
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "BranchesStarted", "StepSkipped", "StepSkipped", "BranchesCompleted"]
    assert list(run.pending) == [""] and run.command("d").direction == ACTION


@pytest.mark.parametrize(
    ("code", "expected"), [(OK, ["c1", "a"]), (UNAVAILABLE, ["c1", "a"]), (REFUSED, ["a"])]
)  # fmt: skip
def test_a_branch_failure_drains_the_calls_on_the_wire_before_compensating(
    engine: Engine, code: grpc.StatusCode, expected: list[str]
) -> None:
    run = Run(engine, GROUPED)
    run.answer("a")
    transition = run.answer("b1", REFUSED, wire=True)
    assert types(transition) == ["StepFailed", "BranchesStopping"]
    assert transition.events[1].message == "b1 failed: FAILED_PRECONDITION"
    assert transition.commands() == [] and transition.drop == []
    assert run.saga.status == Status.COMPENSATING and run.saga.progress.draining and run.saga.compensations == []
    # The call on the wire is recorded, whatever it answers, and then compensation begins.
    transition = run.answer("c1", code)
    assert types(transition)[1:] == ["CompensationStarted"]
    assert transition.events[1].message == "b1 failed: FAILED_PRECONDITION"
    assert run.saga.progress.draining == ""
    assert run.compensate_all() == expected and status_of(run.saga) == Status.COMPENSATED


def test_compensation_waits_for_every_call_on_the_wire(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((call("b"),), (call("c"),), (call("x"),))))
    run = Run(engine, definition)
    run.answer("a")
    assert types(run.answer("b", REFUSED, wire=True)) == ["StepFailed", "BranchesStopping"]
    assert types(run.answer("c", wire=True)) == ["StepSucceeded"] and run.pending == {"3": run.command("x")}
    assert types(run.answer("x")) == ["StepSucceeded", "CompensationStarted"]
    assert run.compensate_all() == ["x", "c", "a"]


def test_a_timer_in_a_branch_cut_by_the_saga_deadline_fails_the_group(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((Timer("t", duration=600), call("b1")), (call("c1"),))), call("d"))
    run = Run(engine, definition, deadline_seconds=30)
    run.answer("a")
    assert run.command("t").wait_until == T0 + 30
    transition = run.wake("t", at=T0 + 30, wire=True)
    assert types(transition) == ["TimerFired", "BranchesStopping"]
    assert run.saga.progress.draining == "saga deadline passed"
    run.answer("c1", at=T0 + 31)
    assert run.compensate_all() == ["c1", "a"]


def test_a_branch_failure_drops_the_other_branches_commands_not_on_the_wire(engine: Engine) -> None:
    run = Run(engine, GROUPED)
    run.answer("a")
    transition = run.answer("b1", REFUSED)
    assert types(transition) == ["StepFailed", "CompensationStarted"]
    assert transition.drop == ["2"] and list(run.pending) == [""]
    assert run.compensate_all() == ["a"]


def test_a_dropped_command_whose_last_answer_was_unknown_is_compensated(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((call("b1"),), (call("c1"),))), call("d"))
    run = Run(engine, definition)
    run.answer("a")
    retry = run.answer("c1", UNAVAILABLE).next_command  # retried later: the charge may have happened
    assert retry is not None and retry.uncertain and retry.track == "2"
    transition = run.answer("b1", REFUSED)
    assert transition.drop == ["2"]
    assert run.compensate_all() == ["c1", "a"]


def test_a_branch_failure_in_the_transition_that_enters_the_group_withdraws_the_commands_it_placed(
    engine: Engine,
) -> None:
    definition = define(call("a"), Parallel("g", ((call("b1"),), (call("c1", when=raises),))))
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "BranchesStarted", "CompensationStarted"]
    assert [(c.step_index, c.direction) for c in transition.commands()] == [(index_of(definition, "a"), COMPENSATION)]
    assert run.saga.last_error == "c1: its condition failed: ZeroDivisionError: division by zero"
    assert run.compensate_all() == ["a"]


@pytest.mark.parametrize(
    ("done", "expected"),
    [
        # the docs' example: A, B1, C1, B2, D completed in that order
        ([("a", ""), ("b1", "1"), ("c1", "2"), ("b2", "1"), ("d", "")], ["d", "b2", "b1", "c1", "a"]),
        ([("a", ""), ("c1", "2"), ("b1", "1"), ("b2", "1"), ("d", "")], ["d", "b2", "b1", "c1", "a"]),
        ([("a", ""), ("b1", "1"), ("b2", "1"), ("c1", "2"), ("d", "")], ["d", "c1", "b2", "b1", "a"]),
        ([("a", ""), ("b1", "1"), ("c1", "2"), ("b2", "1"), ("d", ""), ("e", "")], ["e", "d", "b2", "b1", "c1", "a"]),
        # the docs' other example: C1 fails after A and B1 completed
        ([("a", ""), ("b1", "1")], ["b1", "a"]),
        ([("a", ""), ("b1", "1"), ("c1", "2")], ["c1", "b1", "a"]),
        ([("b1", "1"), ("c1", "2"), ("b2", "1")], ["b2", "b1", "c1"]),
        ([("a", "")], ["a"]),
        ([], []),
    ],
)
def test_compensation_order_is_after_the_group_then_branches_by_last_completion_then_before(
    done: list[tuple[str, str]], expected: list[str]
) -> None:
    entries: list[list[object]] = [[index_of(GROUPED, name), track] for name, track in done]
    assert [name_of(GROUPED, index) for index in compensation_order(GROUPED, entries)] == expected


@pytest.mark.parametrize(
    ("answers", "wire", "expected"),
    [
        ([("a", OK), ("b1", OK), ("c1", OK), ("b2", OK), ("d", OK), ("e", REFUSED)], True,
         ["d", "b2", "b1", "c1", "a"]),
        ([("a", OK), ("c1", OK), ("b1", OK), ("b2", OK), ("d", OK), ("e", REFUSED)], True,
         ["d", "b2", "b1", "c1", "a"]),
        ([("a", OK), ("b1", OK), ("b2", OK), ("c1", OK), ("d", OK), ("e", REFUSED)], True,
         ["d", "c1", "b2", "b1", "a"]),
        # an unknown outcome is compensated; a definite refusal is not
        ([("a", OK), ("b1", OK), ("b2", OK), ("c1", UNAVAILABLE)], True, ["c1", "b2", "b1", "a"]),
        ([("a", OK), ("b1", OK), ("b2", OK), ("c1", INTERNAL)], True, ["c1", "b2", "b1", "a"]),
        ([("a", OK), ("b1", OK), ("b2", OK), ("c1", REFUSED)], True, ["b2", "b1", "a"]),
        # c1 fails with b2 pending, not yet sent: b2 is withdrawn (the docs' example)
        ([("a", OK), ("b1", OK), ("c1", REFUSED)], False, ["b1", "a"]),
        # ... and with b2 on the wire: b2 is finished and recorded first
        ([("a", OK), ("b1", OK), ("c1", REFUSED), ("b2", OK)], True, ["b2", "b1", "a"]),
        ([("a", OK), ("b1", OK), ("c1", REFUSED), ("b2", UNAVAILABLE)], True, ["b2", "b1", "a"]),
        ([("a", OK), ("b1", OK), ("c1", REFUSED), ("b2", REFUSED)], True, ["b1", "a"]),
        ([("a", OK), ("b1", REFUSED), ("c1", UNAVAILABLE)], True, ["c1", "a"]),
        ([("a", OK), ("b1", REFUSED), ("c1", REFUSED)], True, ["a"]),
    ],
)  # fmt: skip
def test_a_full_run_compensates_in_the_documented_order(
    engine: Engine, answers: list[tuple[str, grpc.StatusCode]], wire: bool, expected: list[str]
) -> None:
    run = Run(engine, GROUPED)
    for step, (name, code) in enumerate(answers):
        run.answer(name, code, at=T0 + step, wire=wire)
    assert run.saga.status == Status.COMPENSATING
    assert run.compensate_all(at=T0 + 100) == expected
    assert status_of(run.saga) == Status.COMPENSATED and run.pending == {}


# -- 6. conditions -------------------------------------------------------------------------------


def test_a_skipped_node_is_recorded_and_never_compensated(engine: Engine) -> None:
    definition = define(call("a", when=never), call("b"), call("c"))
    run = Run(engine, definition)
    assert types(run.last) == ["SagaStarted", "StepSkipped"]
    skipped = run.last.events[1]
    assert (skipped.step, skipped.message) == ("a", "condition false")
    assert run.saga.progress.skipped == [0] and run.command("b").direction == ACTION
    run.answer("b")
    run.answer("c", REFUSED)
    assert run.compensate_all() == ["b"]


def test_a_condition_reads_the_stored_input(engine: Engine) -> None:
    vip = define(call("a", when=lambda s: s.input.order_id.startswith("vip")), call("b"))
    run = Run(engine, vip)
    assert types(run.last) == ["SagaStarted", "StepSkipped"]
    assert not run.context().has_result("a")


def test_a_false_condition_on_a_group_skips_the_whole_group(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((call("b"),), (call("c"),)), when=never), call("d"))
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "StepSkipped"] and transition.events[1].step == "g"
    assert list(run.pending) == [""] and run.command("d").direction == ACTION


def test_a_condition_that_raises_on_the_main_track_needs_attention(engine: Engine) -> None:
    definition = define(call("a"), call("b", when=raises), call("c"))
    run = Run(engine, definition)
    transition = run.answer("a")
    assert types(transition) == ["StepSucceeded", "SagaNeedsAttention"]
    assert transition.next_command is None and run.saga.compensations == []
    assert run.saga.last_error == "b: its condition failed: ZeroDivisionError: division by zero"
    assert run.saga.step_index == index_of(definition, "b")


def test_a_condition_that_raises_in_a_branch_unwinds_the_group(engine: Engine) -> None:
    definition = define(call("a"), Parallel("g", ((call("b1"), call("b2", when=raises)), (call("c1"),))))
    run = Run(engine, definition)
    run.answer("a")
    transition = run.answer("b1", wire=True)
    assert types(transition) == ["StepSucceeded", "BranchesStopping"]
    assert run.saga.progress.draining == "b2: its condition failed: ZeroDivisionError: division by zero"
    run.answer("c1")
    assert run.compensate_all() == ["c1", "b1", "a"]


def test_retry_of_a_step_whose_condition_raised_evaluates_the_condition_again(engine: Engine) -> None:
    definition = define(call("a"), call("b", when=raises), call("c"))
    run = Run(engine, definition)
    run.answer("a")
    retried = engine.retry(run.saga, "ops", T0 + 5, definition)
    assert types(retried) == ["SagaRetried", "SagaNeedsAttention"] and retried.next_command is None


# -- 7. child sagas ------------------------------------------------------------------------------

KID = SagaDefinition("Kid", 1, PlaceOrderRequest, (CREATE_SHIPMENT, SEND_CONFIRMATION), order_key, deadline=600)
PARENT = define(call("a"), ChildSaga("kid", KID, build_input=lambda s: s.input), call("b"), NOTIFY, name="Parent")
SHIPMENT = shipping.CreateShipmentResponse(shipment=shipping.Shipment(order_id="order-1", tracking_number="TRK-1"))


def child_in(status: Status, *, step_index: int = 1, parent_id: str = "s1") -> SagaState:
    child = new_saga(KID, saga_id="c1")
    child.status, child.step_index, child.parent_id = status, step_index, parent_id
    child.last_error = "why it ended"
    if status == Status.COMPLETED:
        child.results = {"create_shipment": SHIPMENT.SerializeToString(), "send_confirmation": b""}
    return child


def started_child(engine: Engine, deadline_seconds: float = HOUR) -> Run:
    run = Run(engine, PARENT, deadline_seconds)
    run.answer("a")
    run.engine.child_started(run.saga, "kid", child_in(Status.RUNNING, step_index=0), T0, True)
    return run


def test_entering_a_child_step_starts_the_child_and_waits_until_the_saga_deadline(engine: Engine) -> None:
    run = Run(engine, PARENT)
    transition = run.answer("a", at=T0 + 1)
    assert transition.start_child == ChildStart(KID, "order-1", INPUT.SerializeToString(), T0 + 601, node_name="kid")
    wait = transition.next_command
    assert wait is not None and wait.step_index == index_of(PARENT, "kid")
    assert (wait.wait_until, wait.due_at) == (T0 + HOUR, T0 + HOUR)
    event = engine.child_started(run.saga, "kid", child_in(Status.RUNNING, step_index=0), T0 + 1, True)
    assert (event.type, event.message) == ("ChildStarted", "started child Kid c1 (order-1)")
    assert run.saga.progress.children == {"kid": "c1"}


def test_a_child_deadline_is_the_parents_when_that_comes_first(engine: Engine) -> None:
    run = Run(engine, PARENT, deadline_seconds=100)
    start = run.answer("a").start_child
    assert start is not None and start.deadline_at == T0 + 100


def test_a_completed_child_stores_its_result_and_the_parent_goes_on(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + 10, child=child_in(Status.COMPLETED))
    assert types(transition) == ["ChildEnded"] and transition.events[0].code == "COMPLETED"
    assert run.command("b").direction == ACTION
    child = run.context().child("kid")
    assert child.result("create_shipment").shipment.tracking_number == "TRK-1"
    assert (child.saga_id, child.input.order_id) == ("c1", "order-1")
    assert [index for index, _ in run.saga.progress.done] == [index_of(PARENT, "a"), index_of(PARENT, "kid")]


def test_a_compensated_child_fails_the_step_and_the_parent_unwinds_without_it(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + 10, child=child_in(Status.COMPENSATED))
    assert types(transition) == ["ChildEnded", "CompensationStarted"]
    assert transition.events[0].code == "COMPENSATED"
    assert transition.events[1].message == "kid failed: child COMPENSATED"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_a_terminated_child_leaves_the_parent_for_an_operator(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + 10, child=child_in(Status.TERMINATED))
    assert types(transition) == ["ChildEnded", "SagaNeedsAttention"] and transition.next_command is None
    assert run.saga.status == Status.NEEDS_ATTENTION and run.saga.compensations == []
    assert "was terminated" in run.saga.last_error and "its effects may stand" in run.saga.last_error


@pytest.mark.parametrize("status", [Status.RUNNING, Status.NEEDS_ATTENTION, Status.COMPENSATING])
def test_a_parent_keeps_waiting_for_a_child_that_has_not_ended(engine: Engine, status: Status) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + 10, child=child_in(status))
    assert transition.events == [] and transition.next_command is not None
    assert transition.next_command.due_at == T0 + HOUR


def test_a_child_that_is_missing_or_anothers_fails_the_step(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + 10, child=child_in(Status.COMPLETED, parent_id="somebody-else"))
    assert types(transition) == ["StepFailed", "CompensationStarted"]
    assert transition.events[0].code == "FAILED_PRECONDITION"
    assert run.compensate_all() == ["a"]


def test_a_child_not_ended_by_the_deadline_is_compensated_with_the_rest(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.wake("kid", at=T0 + HOUR, child=child_in(Status.RUNNING, step_index=0))
    assert types(transition) == ["WaitTimedOut", "CompensationStarted"]
    assert run.saga.compensations == [index_of(PARENT, "kid"), index_of(PARENT, "a")]


def test_a_child_past_its_own_pivot_at_the_deadline_needs_attention(engine: Engine) -> None:
    run = started_child(engine)
    running = child_in(Status.RUNNING, step_index=1)
    node = PARENT.node(index_of(PARENT, "kid"))
    assert isinstance(node, ChildSaga) and child_past_pivot(node, running)
    transition = run.wake("kid", at=T0 + HOUR, child=running)
    assert types(transition) == ["WaitTimedOut", "SagaNeedsAttention"]


@pytest.mark.parametrize(
    ("status", "step_index", "past"),
    [(Status.RUNNING, 0, False), (Status.RUNNING, 1, True), (Status.COMPLETED, 1, False),
     (Status.COMPENSATING, 1, False)],
)  # fmt: skip
def test_child_past_pivot(status: Status, step_index: int, past: bool) -> None:
    node = ChildSaga("kid", KID, build_input=lambda s: s.input)
    assert child_past_pivot(node, child_in(status, step_index=step_index)) is past


def test_compensating_a_completed_child_waits_for_it_to_compensate(engine: Engine) -> None:
    run = started_child(engine)
    run.wake("kid", at=T0 + 10, child=child_in(Status.COMPLETED))
    run.answer("b", REFUSED, at=T0 + 20)
    undo = run.command("kid")
    assert (undo.direction, undo.due_at, undo.wait_until) == (COMPENSATION, T0 + 20, T0 + 20 + 24 * HOUR)
    transition = run.wake("kid", at=T0 + 21, child=child_in(Status.COMPENSATING))
    assert transition.events == []
    again = run.command("kid")
    assert (again.direction, again.due_at, again.wait_until) == (COMPENSATION, T0 + 20 + 24 * HOUR, T0 + 20 + 24 * HOUR)
    transition = run.wake("kid", at=T0 + 30, child=child_in(Status.COMPENSATED))
    assert types(transition) == ["CompensationSucceeded"]
    assert transition.events[0].message == "child c1 is COMPENSATED"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_a_child_that_needs_attention_while_compensating_stops_the_parent(engine: Engine) -> None:
    run = started_child(engine)
    run.wake("kid", at=T0 + 10, child=child_in(Status.COMPLETED))
    run.answer("b", REFUSED, at=T0 + 20)
    transition = run.wake("kid", at=T0 + 21, child=child_in(Status.NEEDS_ATTENTION))
    assert types(transition) == ["CompensationFailed", "SagaNeedsAttention"]
    assert run.saga.last_error == "kid compensation: child c1 needs attention: why it ended"
    assert run.saga.compensations == [index_of(PARENT, "kid"), index_of(PARENT, "a")]


# A child with two compensatable steps and a retriable one, run to its end.
UNDONE_KID = define(call("x1"), call("x2"), call("x3", kind=StepKind.RETRIABLE), name="UndoneKid")


def completed_child(engine: Engine) -> Run:
    child = Run(engine, UNDONE_KID)
    for name in ("x1", "x2", "x3"):
        child.answer(name, at=T0 + 1)
    assert child.saga.status == Status.COMPLETED and child.saga.ended_at == T0 + 1
    return child


def test_unwinding_a_completed_child_compensates_its_steps_newest_first(engine: Engine) -> None:
    child = completed_child(engine)
    transition = child.apply(engine.unwind_child(UNDONE_KID, child.saga, Others(), "orchestrator", T0 + 50))
    assert types(transition) == ["SagaCancelRequested", "CompensationStarted"]
    assert transition.events[0].message == "its parent compensates"
    assert child.saga.status == Status.COMPENSATING
    assert child.compensate_all(at=T0 + 60) == ["x2", "x1"]
    assert status_of(child.saga) == Status.COMPENSATED and child.saga.ended_at == T0 + 60


def test_a_completed_child_being_unwound_has_not_ended(engine: Engine) -> None:
    child = completed_child(engine)
    engine.unwind_child(UNDONE_KID, child.saga, Others(), "orchestrator", T0 + 50)
    assert child.saga.ended_at is None


def test_unwinding_a_child_that_ended_otherwise_changes_nothing(engine: Engine) -> None:
    child = child_in(Status.COMPENSATED)
    transition = engine.unwind_child(KID, child, Others(), "orchestrator", T0)
    assert types(transition) == ["SagaCancelRequested"] and transition.commands() == []
    assert child.status == Status.COMPENSATED


# -- 8. operator calls on waiting sagas ------------------------------------------------------------

# Branch 1 waits on a timer, branch 2 calls c1.
TIMED_GROUP = define(call("a"), Parallel("g", ((Timer("t", duration=60), call("b1")), (call("c1"),))), call("d"))


def test_pause_holds_every_command_not_on_the_wire_and_resume_makes_them_due(engine: Engine) -> None:
    run = Run(engine, TIMED_GROUP)
    entered = run.answer("a")
    assert entered.events[2].message == "branch 1: timer fires at 1970-01-12T13:47:40Z"
    timer, c1 = run.command("t"), run.command("c1")
    paused = engine.pause(run.saga, Others(dict(run.pending), frozenset({"2"})), "ops", "look", T0 + 10)
    assert types(paused) == ["SagaPaused"]
    assert paused.commands() == [timer]  # the call on the wire stays as it is
    assert (timer.due_at, timer.wait_until) == (None, T0 + 60) and c1.due_at == T0
    # The call on the wire finishes while paused; nothing new is due.
    assert types(run.answer("c1", at=T0 + 11)) == ["StepSucceeded"]
    resumed = engine.resume(run.saga, Others(dict(run.pending)), "ops", T0 + 100)
    assert types(resumed) == ["SagaResumed"] and resumed.commands() == [timer]
    assert timer.due_at == T0 + 100 and timer.wait_until == T0 + 60
    # The timer that came due during the pause fires now, late by the pause.
    transition = run.wake("t", at=T0 + 100)
    assert types(transition) == ["TimerFired"] and transition.events[0].message == "40000 ms late"
    assert run.command("b1").due_at == T0 + 100


def test_a_command_put_while_paused_is_held(engine: Engine) -> None:
    run = Run(engine, TIMED)
    engine.pause(run.saga, Others(dict(run.pending), frozenset({""})), "ops", "", T0)
    run.answer("a")
    timer = run.command("cool_off")
    assert (timer.due_at, timer.wait_until) == (None, T0 + 60)


def test_cancel_of_a_saga_waiting_on_a_signal_unwinds_at_once(engine: Engine) -> None:
    run = Run(engine, signalled())
    run.answer("a")
    transition = run.apply(
        engine.cancel(run.definition, run.saga, Others(dict(run.pending)), False, "ops", "customer", T0 + 5)
    )
    assert types(transition) == ["SagaCancelRequested", "CompensationStarted"]
    assert transition.drop == [""] and run.saga.last_error == "cancelled: customer"
    assert run.compensate_all() == ["a"] and status_of(run.saga) == Status.COMPENSATED


def test_cancel_of_a_saga_waiting_on_its_child_compensates_the_child(engine: Engine) -> None:
    run = started_child(engine)
    transition = run.apply(engine.cancel(PARENT, run.saga, Others(dict(run.pending)), False, "ops", "", T0 + 5))
    assert types(transition) == ["SagaCancelRequested", "CompensationStarted"]
    assert run.saga.compensations == [index_of(PARENT, "kid"), index_of(PARENT, "a")]
    assert run.command("kid").direction == COMPENSATION


def test_cancel_in_a_group_finishes_the_calls_on_the_wire_first(engine: Engine) -> None:
    run = Run(engine, TIMED_GROUP)
    run.answer("a")
    others = Others(dict(run.pending), frozenset({"2"}))
    transition = run.apply(engine.cancel(TIMED_GROUP, run.saga, others, False, "ops", "", T0 + 5))
    assert types(transition) == ["SagaCancelRequested", "BranchesStopping"] and transition.drop == ["1"]
    run.answer("c1", at=T0 + 6)
    assert run.compensate_all() == ["c1", "a"]


def test_retry_of_a_saga_that_needs_attention_at_a_wait_waits_again(engine: Engine) -> None:
    run = Run(engine, signalled(OnTimeout.FAIL), deadline_seconds=2 * HOUR)
    run.answer("a")
    run.wake("await_payment", at=T0 + 600)
    retried = run.apply(engine.retry(run.saga, "ops", T0 + 1000, run.definition))
    assert types(retried) == ["SagaRetried", "WaitStarted"] and retried.events[0].actor == "ops"
    assert status_of(run.saga) == Status.RUNNING
    wait = run.command("await_payment")
    assert (wait.due_at, wait.wait_until, wait.attempt) == (T0 + 1600, T0 + 1600, 1)


def test_retry_of_a_failed_wait_consumes_a_kept_signal_at_once(engine: Engine) -> None:
    run = Run(engine, signalled(OnTimeout.FAIL))
    run.answer("a")
    run.wake("await_payment", at=T0 + 600)
    run.signal("payment_ok", struct(token="late"), at=T0 + 700)
    retried = run.apply(engine.retry(run.saga, "ops", T0 + 800, run.definition))
    assert types(retried) == ["SagaRetried", "WaitStarted", "SignalConsumed"]
    assert run.command("charge").direction == ACTION


def test_retry_of_a_parent_whose_child_was_terminated_looks_at_the_same_child_again(engine: Engine) -> None:
    run = started_child(engine)
    run.wake("kid", at=T0 + 10, child=child_in(Status.TERMINATED))
    retried = run.apply(engine.retry(run.saga, "ops", T0 + 20, PARENT))
    assert types(retried) == ["SagaRetried"] and retried.start_child is not None
    assert retried.start_child.business_key == "order-1" and run.command("kid").wait_until == T0 + HOUR


def test_a_branch_that_needs_attention_holds_the_other_branches(engine: Engine) -> None:
    definition = define(
        call("a"), Parallel("g", ((ChildSaga("kid", KID, build_input=lambda s: s.input),), (call("b1"), call("b2"))))
    )
    run = Run(engine, definition)
    run.answer("a")
    engine.child_started(run.saga, "kid", child_in(Status.RUNNING, step_index=0), T0, True)
    assert types(run.wake("kid", at=T0 + 1, wire=True, child=child_in(Status.TERMINATED))) == [
        "ChildEnded",
        "SagaNeedsAttention",
    ]
    transition = run.answer("b1", at=T0 + 2)
    assert transition.commands() == []


# -- 9. sagas stored before progress existed (schema 1) ----------------------------------------------

RESERVE, CHARGE_STEP, SHIP, CONFIRM = range(4)
V1_NAMES = [node.name for node in ORDER_SAGA.steps]


def legacy_saga(step_index: int) -> SagaState:
    saga = new_saga(ORDER_SAGA)
    saga.step_index, saga.progress = step_index, Progress.from_json("")
    return saga


def test_an_empty_progress_reads_as_legacy_and_a_stored_one_does_not() -> None:
    assert Progress.from_json("").legacy
    fresh = Progress.from_json("{}")
    assert not fresh.legacy and fresh == Progress()
    progress = Progress(done=[[0, ""], [2, "1"]], skipped=[1], group=0, branches={"1": -1}, children={"kid": "c1"})
    assert Progress.from_json(progress.to_json()) == progress


@pytest.mark.parametrize(
    ("step_index", "code", "expected"),
    [
        (RESERVE, REFUSED, []),
        (CHARGE_STEP, REFUSED, ["reserve_stock"]),
        (SHIP, REFUSED, ["charge_payment", "reserve_stock"]),
        (SHIP, INTERNAL, ["create_shipment", "charge_payment", "reserve_stock"]),
    ],
)
def test_a_running_legacy_saga_that_fails_compensates_the_steps_before_its_index(
    engine: Engine, step_index: int, code: grpc.StatusCode, expected: list[str]
) -> None:
    saga = legacy_saga(step_index)
    command = Command("s1", step_index, ACTION, 1, T0)
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(code), T0)
    assert types(transition)[:2] == ["StepFailed", "CompensationStarted"]
    compensated = [V1_NAMES[c.step_index] for c in [transition.next_command] if c is not None]
    assert compensated == expected[:1] and [V1_NAMES[index] for index in saga.compensations] == expected
    assert not saga.progress.legacy  # stored from now on as progress


def test_a_legacy_saga_that_succeeds_goes_on_and_counts_the_step_as_done(engine: Engine) -> None:
    saga = legacy_saga(SHIP)
    transition = engine.on_outcome(ORDER_SAGA, saga, Command("s1", SHIP, ACTION, 1, T0), outcome(OK), T0)
    assert transition.next_command == Command("s1", CONFIRM, ACTION, 1, T0, due_at=T0)
    assert saga.progress.done == [[RESERVE, ""], [CHARGE_STEP, ""], [SHIP, ""]]


def test_a_legacy_saga_past_its_pivot_that_fails_needs_attention_and_compensates_nothing(engine: Engine) -> None:
    saga = legacy_saga(CONFIRM)
    command = Command("s1", CONFIRM, ACTION, 1, T0)
    transition = engine.on_outcome(ORDER_SAGA, saga, command, outcome(REFUSED), T0)
    assert types(transition) == ["StepFailed", "SagaNeedsAttention"] and saga.compensations == []


def test_a_legacy_saga_cancelled_with_nothing_on_the_wire_compensates_the_steps_before_its_index(
    engine: Engine,
) -> None:
    saga = legacy_saga(SHIP)
    pending = Command("s1", SHIP, ACTION, 1, T0, due_at=T0)
    transition = engine.cancel(ORDER_SAGA, saga, pending, False, "ops", "", T0)
    assert types(transition) == ["SagaCancelRequested", "CompensationStarted"]
    assert [V1_NAMES[index] for index in saga.compensations] == ["charge_payment", "reserve_stock"]
