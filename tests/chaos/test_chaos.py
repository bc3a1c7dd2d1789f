"""The chaos harness: its invariant checks catch each kind of damage, and short runs under its faults break none."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.audit import (
    UNREADABLE_LINE,
    AuditResult,
    ChildRecord,
    HistoryEntry,
    OrderRecord,
    SendTime,
    SignalAnswer,
    SignalPlan,
    SignalSend,
    StartAnswer,
    StartWay,
    check_one_saga_per_order,
    check_order,
    check_stock,
    delivered_early,
    read_file_sink,
)
from devstack.chaos import (
    RECIPIENT_FIELD,
    SIGNAL_NAME,
    SIGNAL_SAGA_TYPE,
    SIGNAL_WAIT,
    ChaosConfig,
    ChaosReport,
    run_chaos,
)
from devstack.chaos_definitions import SIGNAL_SAGA

ITEMS = {"BOOK-001": 1, "TEE-007": 2}


def completed(**changes: object) -> OrderRecord:
    record = OrderRecord(
        "ok-1",
        "ok",
        dict(ITEMS),
        1234,
        saga_id="s1",
        status="COMPLETED",
        successes={("StepSucceeded", "reserve_stock"): 1},
        reservation="RESERVED",
        reserved_items=dict(ITEMS),
        charges=[1234],
        shipment="CREATED",
        notifications=1,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def compensated(**changes: object) -> OrderRecord:
    record = OrderRecord(
        "declined-1",
        "declined",
        dict(ITEMS),
        1234,
        saga_id="s2",
        status="COMPENSATED",
        reservation="RELEASED",
        reserved_items=dict(ITEMS),
        shipment=None,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_sound_orders_break_nothing() -> None:
    assert check_order(completed()) == []
    assert check_order(compensated()) == []
    # A charge refunded in full, a cancelled shipment and a tombstoned reservation are sound too.
    assert check_order(compensated(kind="ok", charges=[1234], refunds=[1234], shipment="CANCELLED")) == []
    assert check_order(compensated(reservation="TOMBSTONE")) == []
    assert (
        check_order(completed(status="NEEDS_ATTENTION", last_error="send_confirmation failed", notifications=0)) == []
    )


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (completed(status="RUNNING"), "did not end: RUNNING"),
        (completed(status="NEEDS_ATTENTION", last_error=""), "needs attention without a reason"),
        (completed(charges=[1234, 1234]), "charged 2 times"),
        (completed(notifications=2), "2 confirmations sent"),
        (completed(reservation="RELEASED"), "reservation is RELEASED"),
        (completed(reserved_items={"BOOK-001": 1}), "reserved {'BOOK-001': 1}"),
        (completed(charges=[999]), "expected one charge of 1234"),
        (completed(shipment="CANCELLED"), "shipment is CANCELLED"),
        (completed(successes={("StepSucceeded", "charge_payment"): 2}), "StepSucceeded recorded 2 times"),
        (compensated(reservation="RESERVED"), "stock still reserved"),
        (compensated(kind="ok", charges=[1234]), "net 1234 != 0"),
        (compensated(shipment="CREATED"), "shipment still live"),
        (compensated(notifications=1), "confirmations for a compensated order"),
        (completed(kind="declined"), "a declined card completed an order"),
        (compensated(charges=[1234], refunds=[1234]), "a declined card was charged"),
        (compensated(kind="outofstock", reservation="RESERVED"), "an order for more than the stock was reserved"),
    ],
)
def test_each_kind_of_damage_is_reported(record: OrderRecord, problem: str) -> None:
    assert any(problem in found for found in check_order(record)), check_order(record)


def test_stock_must_be_conserved_and_match_the_live_reservations() -> None:
    before = {"BOOK-001": (100, 0), "TEE-007": (100, 0)}
    records = [completed(), compensated()]
    assert check_stock(before, {"BOOK-001": (99, 1), "TEE-007": (98, 2)}, records) == []
    lost = check_stock(before, {"BOOK-001": (98, 1), "TEE-007": (98, 2)}, records)
    assert any("BOOK-001: available + reserved went from 100 to 99" in p for p in lost)
    leaked = check_stock(before, {"BOOK-001": (98, 2), "TEE-007": (98, 2)}, records)
    assert any("BOOK-001: reserved grew by 2, but the orders hold 1" in p for p in leaked)


# -- delivery of confirmations ---------------------------------------------------------------


def test_a_delivered_confirmation_seen_once_at_the_sink_is_sound() -> None:
    assert check_order(completed(deliveries=["DELIVERED"], sink_lines=1)) == []
    assert check_order(compensated(sink_lines=0)) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        # The finding: a COMPLETED saga whose confirmation is recorded but never delivered.
        (completed(deliveries=["PENDING"]), "confirmation recorded but its delivery is PENDING"),
        (completed(deliveries=["FAILED"]), "confirmation recorded but its delivery is FAILED"),
        (completed(deliveries=["DELIVERED"], sink_lines=2), "confirmation delivered 2 times at the file sink"),
        (
            completed(deliveries=["DELIVERED"], sink_lines=0),
            "DELIVERED by notify's account but absent from the file sink",
        ),
        (compensated(sink_lines=1), "a confirmation at the file sink that notify has no record of"),
    ],
)
def test_each_delivery_fault_is_reported(record: OrderRecord, problem: str) -> None:
    assert any(problem in found for found in check_order(record)), check_order(record)


# -- one saga per order ----------------------------------------------------------------------

GOOD_STARTS = [
    StartAnswer(StartWay.PLACE_ORDER, saga_id="s1"),
    StartAnswer(StartWay.PLACE_ORDER_AGAIN, saga_id="s1"),
    StartAnswer(StartWay.START_SAGA, saga_id="s1"),
    StartAnswer(StartWay.START_SAGA_OTHER_KEY, code="INVALID_ARGUMENT", detail="business_key"),
    StartAnswer(StartWay.START_SAGA_OTHER_PAYLOAD, code="FAILED_PRECONDITION", detail="BUSINESS_KEY_CONFLICT"),
]


def duplicate(*replaced: StartAnswer, **changes: object) -> OrderRecord:
    """A completed duplicate order whose starts are GOOD_STARTS with the given ways' answers replaced."""
    ways = {answer.way for answer in replaced}
    starts = [answer for answer in GOOD_STARTS if answer.way not in ways] + list(replaced)
    fields: dict[str, object] = {"kind": "duplicate", "starts": starts, "sagas_for_key": 1, "sagas_for_other_key": 0}
    return completed(**{**fields, **changes})


def test_a_duplicate_that_found_its_one_saga_every_way_is_sound() -> None:
    assert check_order(duplicate()) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (
            duplicate(StartAnswer(StartWay.PLACE_ORDER_AGAIN, saga_id="s9")),
            "PlaceOrder again (the other replica on PostgreSQL) gave saga s9, not the order's saga s1",
        ),
        (
            duplicate(StartAnswer(StartWay.START_SAGA, code="UNAVAILABLE", detail="the saga store failed")),
            "StartSaga under the order id failed: UNAVAILABLE",
        ),
        # The finding: StartSaga(OrderSaga) under "X-again" with X's input was accepted.
        (
            duplicate(StartAnswer(StartWay.START_SAGA_OTHER_KEY, saga_id="s2")),
            "StartSaga under another business key was accepted (saga s2); it must be refused",
        ),
        (
            duplicate(StartAnswer(StartWay.START_SAGA_OTHER_KEY, code="INTERNAL", detail="boom")),
            "refused with INTERNAL boom, expected INVALID_ARGUMENT business_key",
        ),
        (
            duplicate(StartAnswer(StartWay.START_SAGA_OTHER_PAYLOAD, saga_id="s1")),
            "StartSaga under the order id with another payload was accepted",
        ),
        (duplicate(sagas_for_key=2), "2 sagas under the order id, expected 1"),
        (duplicate(sagas_for_other_key=1), "ListSagas finds 1 under the other business key, expected none"),
    ],
)
def test_each_second_saga_or_wrong_answer_to_a_duplicate_start_is_reported(record: OrderRecord, problem: str) -> None:
    assert any(problem in found for found in check_order(record)), check_order(record)


def test_every_placed_order_has_exactly_one_saga_and_no_saga_has_an_unknown_key() -> None:
    orders = ["ok-r-1", "duplicate-r-2", "declined-r-3"]
    assert check_one_saga_per_order(orders, orders, {"ok-r-1": 1, "duplicate-r-2": 1, "declined-r-3": 1}) == []
    # An order whose PlaceOrder failed may have no saga; one whose start returned a saga may not.
    assert check_one_saga_per_order(orders, orders[:2], {"ok-r-1": 1, "duplicate-r-2": 1}) == []
    problems = check_one_saga_per_order(orders, orders, {"ok-r-1": 1, "duplicate-r-2": 2, "duplicate-r-2-again": 1})
    assert problems == [
        "order duplicate-r-2: 2 sagas, expected 1",
        "a saga under business key 'duplicate-r-2-again', which no order has",
        "order declined-r-3: placed, but ListSagas finds no saga for it",
    ]


def test_the_file_sink_is_counted_by_order_and_a_torn_line_is_flagged(tmp_path: Path) -> None:
    sink = tmp_path / "notifications.jsonl"
    assert read_file_sink(sink) == {}
    sink.write_text(
        '{"notification_id":"n1","order_id":"ok-1"}\n'
        '{"notification_id":"n2","order_id":"ok-2"}\n'
        '{"notification_id":"n1","order_id":"ok-1"}\n'
        '{"notification_id":"n3","ord\n'
    )
    assert read_file_sink(sink) == {"ok-1": 2, "ok-2": 1, UNREADABLE_LINE: 1}


def test_the_audit_names_each_wrong_order_with_its_kind_and_status_then_the_run() -> None:
    found = AuditResult([completed()], {"ok-1": ["charged 2 times"]}, ["stock: BOOK-001: lost"], None)
    assert found.violations == ["order ok-1 (ok, COMPLETED): charged 2 times", "stock: BOOK-001: lost"]


# -- OrderSaga v2: branches, the fraud review and the fulfilment child --------------------------

V2_STEPS = {
    "reserve_and_charge": "parallel",
    "reserve_stock": "call",
    "charge_payment": "call",
    "fraud_review": "approval",
    "fulfilment": "child",
}
BRANCHES = [
    HistoryEntry("BranchesStarted", "reserve_and_charge"),
    HistoryEntry("BranchesCompleted", "reserve_and_charge"),
]
REVIEW = SignalPlan("fraud_review", approval=True, approve=True, repeats=(SignalSend.SAME, SignalSend.OTHER))
DECIDED_EARLY = [
    HistoryEntry("SignalReceived", "fraud_review", message="decision: approve (planned by the chaos harness)"),
    HistoryEntry("WaitStarted", "fraud_review"),
    HistoryEntry("ApprovalDecided", "fraud_review", "APPROVED"),
]
GOOD_ANSWERS = [
    SignalAnswer(SignalSend.FIRST),
    SignalAnswer(SignalSend.SAME, duplicate=True),
    SignalAnswer(SignalSend.OTHER, code="FAILED_PRECONDITION", detail="SIGNAL_ID_REUSED"),
]


def fulfilment(status: str = "COMPLETED", parent: str = "s1", step: str = "fulfilment") -> ChildRecord:
    return ChildRecord(step, f"c-{status}", "FulfilmentSaga", status, parent)


def reviewed(**changes: object) -> OrderRecord:
    """A completed OrderSaga v2 order that was reviewed (approved early, then the same decision and the other one)."""
    fields: dict[str, object] = {
        "kind": "approve",
        "saga_type": "OrderSaga",
        "version": 2,
        "step_kinds": dict(V2_STEPS),
        "history": [*BRANCHES, *DECIDED_EARLY],
        "children": [fulfilment()],
        "plan": REVIEW,
        "answers": list(GOOD_ANSWERS),
    }
    return completed(**{**fields, **changes})


def rejected(**changes: object) -> OrderRecord:
    history = [*BRANCHES, HistoryEntry("WaitStarted", "fraud_review"), *DECIDED_EARLY[:1]]
    history.append(HistoryEntry("ApprovalDecided", "fraud_review", "REJECTED"))
    fields: dict[str, object] = {
        "kind": "reject",
        "saga_type": "OrderSaga",
        "version": 2,
        "step_kinds": dict(V2_STEPS),
        "history": history,
        "plan": SignalPlan("fraud_review", approval=True, approve=False),
        "answers": [SignalAnswer(SignalSend.FIRST)],
        "charges": [1234],
        "refunds": [1234],
    }
    return compensated(**{**fields, **changes})


SIGNAL_STEPS = {node.node.name: node.node.node_kind for node in SIGNAL_SAGA.nodes}
SIGNAL_PLAN = SignalPlan(
    SIGNAL_WAIT,
    approval=False,
    signal=SIGNAL_NAME,
    recipient="Ada",
    when=SendTime.WAITING,
    repeats=(SignalSend.ANOTHER_ID,),
)


def signalled(**changes: object) -> OrderRecord:
    """A completed signal order: the timer fired, the first signal was consumed, a second one kept."""
    history = [
        HistoryEntry("WaitStarted", "cool_off"),
        HistoryEntry("TimerFired", "cool_off"),
        HistoryEntry("WaitStarted", SIGNAL_WAIT),
        HistoryEntry("SignalReceived", message="go (ok-1/go/1)"),
        HistoryEntry("SignalConsumed", SIGNAL_WAIT, "OK", "signal go (ok-1/go/1)"),
        HistoryEntry("SignalReceived", message="go (ok-1/go/2)"),
    ]
    fields: dict[str, object] = {
        "kind": "signal",
        "saga_type": SIGNAL_SAGA_TYPE,
        "version": 1,
        "step_kinds": dict(SIGNAL_STEPS),
        "history": history,
        "plan": SIGNAL_PLAN,
        "answers": [SignalAnswer(SignalSend.FIRST), SignalAnswer(SignalSend.ANOTHER_ID)],
        "shipment_recipient": "Ada",
    }
    return completed(**{**fields, **changes})


def test_the_harness_definition_waits_on_a_timer_then_for_its_signal_before_the_pivot() -> None:
    assert SIGNAL_SAGA.name == SIGNAL_SAGA_TYPE
    assert SIGNAL_STEPS == {
        "reserve_stock": "call",
        "cool_off": "timer",
        "charge_payment": "call",
        SIGNAL_WAIT: "signal",
        "create_shipment": "call",
        "send_confirmation": "call",
    }
    assert SIGNAL_SAGA.before_pivot(3)
    assert RECIPIENT_FIELD == "recipient"


def test_sound_orders_of_the_new_kinds_break_nothing() -> None:
    assert check_order(reviewed()) == []
    assert delivered_early(reviewed())
    # A decision as earlier releases recorded it: "approval:<step> (<id>)", with no step.
    legacy = HistoryEntry("SignalReceived", message="approval:fraud_review (approval:fraud_review)")
    assert check_order(reviewed(history=[*BRANCHES, legacy, *DECIDED_EARLY[1:]])) == []
    assert check_order(rejected()) == []
    assert check_order(signalled()) == []
    assert not delivered_early(signalled())
    # Its shipment undone before it was ever made is a tombstone, which names no recipient.
    assert check_order(signalled(status="COMPENSATED", charges=[], reservation="RELEASED", notifications=0,
                                 shipment="TOMBSTONE", shipment_recipient="")) == []  # fmt: skip
    # Under the threshold the review is skipped; a v2 order compensated with its child undone is sound.
    skipped = [*BRANCHES, HistoryEntry("StepSkipped", "fraud_review")]
    assert check_order(reviewed(kind="ok", plan=None, answers=[], history=skipped)) == []
    undone = compensated(
        kind="ok", step_kinds=dict(V2_STEPS), history=skipped, children=[fulfilment("COMPENSATED", "s2")]
    )
    assert check_order(undone) == []
    # OrderSaga v1 never waits for the review: its decisions are refused, and nothing is recorded.
    v1 = reviewed(
        version=1,
        step_kinds={"reserve_stock": "call", "charge_payment": "call"},
        history=[],
        children=[],
        answers=[SignalAnswer(SignalSend.FIRST, code="FAILED_PRECONDITION", detail="SIGNAL_NOT_AWAITED")],
        plan=SignalPlan("fraud_review", approval=True),
    )
    assert check_order(v1) == []
    # A saga that ended before its decision came refuses it, and every repeat, with SAGA_ENDED.
    ended = SignalAnswer(SignalSend.FIRST, code="FAILED_PRECONDITION", detail="SAGA_ENDED")
    again = SignalAnswer(SignalSend.SAME, code="FAILED_PRECONDITION", detail="SAGA_ENDED")
    other = SignalAnswer(SignalSend.OTHER, code="FAILED_PRECONDITION", detail="SAGA_ENDED")
    assert check_order(rejected(history=list(BRANCHES), plan=REVIEW, answers=[ended, again, other])) == []
    # A first delivery retried after UNAVAILABLE may find itself recorded: duplicate=true.
    retried = SignalAnswer(SignalSend.FIRST, duplicate=True, retried=True, during_kill=True)
    assert check_order(reviewed(answers=[retried, *GOOD_ANSWERS[1:]])) == []
    # A parent still waiting for a child that needs attention is on record for an operator.
    stuck = ChildRecord("fulfilment", "c1", "FulfilmentSaga", "NEEDS_ATTENTION", "s1", "send_confirmation failed")
    waiting = reviewed(status="RUNNING", children=[stuck], notifications=0, shipment="CREATED")
    assert check_order(waiting) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        # Branches, waits and children.
        (reviewed(history=[*BRANCHES, *BRANCHES[:1], *DECIDED_EARLY]), "branches started 2 times"),
        (reviewed(history=BRANCHES[:1] + DECIDED_EARLY), "parallel group reserve_and_charge completed 0 times"),
        (reviewed(history=[*BRANCHES, *DECIDED_EARLY, DECIDED_EARLY[2]]), "approval fraud_review ended 2 times"),
        (signalled(history=[*signalled().history, HistoryEntry("TimerFired", "cool_off")]), "timer cool_off ended 2"),
        (signalled(history=signalled().history[2:]), "completed, yet timer cool_off began 0 times"),
        (reviewed(children=[]), "completed without a child saga for step fulfilment"),
        (reviewed(children=[fulfilment(), fulfilment("COMPENSATED")]), "2 child sagas for step fulfilment"),
        (reviewed(children=[fulfilment(parent="s9")]), "names parent 's9', not s1"),
        (reviewed(children=[fulfilment("COMPENSATED")]), "is COMPENSATED under a COMPLETED saga"),
        (compensated(children=[fulfilment()]), "is COMPLETED under a COMPENSATED saga"),
        (
            reviewed(status="RUNNING", children=[fulfilment()]),
            "did not end: RUNNING",
        ),
        (
            reviewed(successes={("StepSucceeded", "FulfilmentSaga.create_shipment"): 2}),
            "StepSucceeded recorded 2 times for FulfilmentSaga.create_shipment",
        ),
        # Approvals.
        (reviewed(answers=[SignalAnswer(SignalSend.FIRST, duplicate=True), *GOOD_ANSWERS[1:]]), "though it was sent"),
        (reviewed(answers=[GOOD_ANSWERS[0], SignalAnswer(SignalSend.SAME), GOOD_ANSWERS[2]]), "expected OK dup"),
        (reviewed(answers=[*GOOD_ANSWERS[:2], SignalAnswer(SignalSend.OTHER)]), "expected FAILED_PRECONDITION SIG"),
        (reviewed(answers=GOOD_ANSWERS[:2]), "another payload (an approval: the other decision) under the same id was"),
        (reviewed(answers=[]), "the decision was never sent"),
        (
            reviewed(answers=[SignalAnswer(SignalSend.FIRST, code="UNAVAILABLE", detail="down"), *GOOD_ANSWERS[1:]]),
            "the first delivery answered UNAVAILABLE down",
        ),
        (reviewed(history=[*BRANCHES, *DECIDED_EARLY, DECIDED_EARLY[0]]), "answered OK and recorded 2 times"),
        (
            reviewed(
                history=[*BRANCHES, *DECIDED_EARLY[:2], HistoryEntry("ApprovalDecided", "fraud_review", "REJECTED")]
            ),
            "decided REJECTED, but the decision sent first was APPROVED",
        ),
        (rejected(status="COMPLETED", refunds=[]), "fraud_review rejected, yet the order completed"),
        (rejected(shipment="CANCELLED"), "fraud_review rejected, yet fulfilment began"),
        (rejected(history=rejected().history[:-1]), "fraud_review began, yet the saga ended without consuming it"),
        (
            reviewed(version=1, step_kinds={"reserve_stock": "call"}, history=[], children=[]),
            "the first delivery to a saga that never waits for it answered OK",
        ),
        # Signals.
        (
            signalled(history=[*signalled().history[:4], HistoryEntry("SignalConsumed", SIGNAL_WAIT, "OK", "go (x)")]),
            "not the first delivery ok-1/go/1",
        ),
        (signalled(shipment_recipient="Not Ada"), "shipped to 'Not Ada', not to 'Ada'"),
        (signalled(shipment="CANCELLED", shipment_recipient=""), "shipped to '', not to 'Ada'"),
        (
            signalled(answers=[SignalAnswer(SignalSend.FIRST), SignalAnswer(SignalSend.ANOTHER_ID, duplicate=True)]),
            "another delivery under a new id answered OK duplicate=True",
        ),
        (signalled(history=signalled().history[:-1]), "another delivery under a new id answered OK"),
    ],
)
def test_each_fault_of_a_wait_a_child_or_a_delivery_is_reported(record: OrderRecord, problem: str) -> None:
    assert any(problem in found for found in check_order(record)), check_order(record)


def test_one_saga_per_order_allows_one_child_of_it_under_the_order_id() -> None:
    orders = ["ok-r-1", "ok-r-2"]
    sagas = {"ok-r-1": 1, "ok-r-2": 1}
    ids = {"ok-r-1": "s1", "ok-r-2": "s2"}
    assert check_one_saga_per_order(orders, orders, sagas, children={"ok-r-1": ["s1"]}, saga_ids=ids) == []
    problems = check_one_saga_per_order(
        orders, orders, sagas, children={"ok-r-1": ["s1", "s1"], "ok-r-2": ["s1"], "other": ["s3"]}, saga_ids=ids
    )
    assert problems == [
        "order ok-r-1: 2 child sagas, expected at most 1",
        "order ok-r-2: a child saga of s1, not of the order's saga s2",
        "a child saga under business key 'other', which no order has",
    ]


# -- short runs ------------------------------------------------------------------------------


def _explain(report: ChaosReport) -> str:
    return "\n".join(report.violations[:20]) + f"\n{report.as_dict()}"


def _assert_the_long_running_kinds_were_met(report: ChaosReport) -> None:
    """v1 and v2 ran side by side; branches, children, reviews and signals each met what they must survive."""
    assert {"OrderSaga v1", "OrderSaga v2", f"{SIGNAL_SAGA_TYPE} v1"} <= set(report.versions), _explain(report)
    assert report.children.get("FulfilmentSaga COMPLETED", 0) > 0, _explain(report)
    approvals, signals = report.deliveries["approval"], report.deliveries["signal"]
    for figures in (approvals, signals):
        # Early ones kept until the wait began, ones sent as a replica died, repeats and conflicting repeats.
        for figure in ("early", "during a kill", "duplicate", "SIGNAL_ID_REUSED"):
            assert figures.get(figure, 0) > 0, f"{figure}: {_explain(report)}"
    assert approvals.get("approved", 0) > 0 and approvals.get("rejected", 0) > 0, _explain(report)
    assert signals.get("ok", 0) > 0, _explain(report)
    # Some deliveries met the replica dead and were sent again.
    assert approvals.get("retried", 0) + signals.get("retried", 0) > 0, _explain(report)
    # A rejected review never completes (on v1 there is no review: those orders are "reject v1").
    assert set(report.outcomes.get("reject", {})) <= {"COMPENSATED"}, _explain(report)


def test_300_sagas_survive_kills_duplicates_and_kills_right_after_a_commit(tmp_path: Path) -> None:
    config = ChaosConfig(
        sagas=300,
        orchestrator_kills=5,
        # Every service is killed once, right after a commit, while other sagas' calls are in flight.
        service_kills=0,
        after_commit_kills=1,
        data_dir=tmp_path,
        gap_seconds=(0.05, 0.3),
        down_seconds=(0.0, 0.3),
        drain_timeout=120.0,
    )
    lines: list[str] = []
    report = run_chaos(config, log=lines.append)
    assert report.violations == [], _explain(report)
    # 300 of the mix, and one order per kill right after a commit (on one instance, the first order serves).
    assert report.placed == report.sagas == 304
    assert report.kills == {"orchestrator": 5, "inventory": 1, "payment": 1, "shipping": 1, "notify": 1}
    assert report.after_commit_kills == {"inventory": 1, "payment": 1, "shipping": 1, "notify": 1}
    # The reply is held 1.2 s after the commit: at least one kill came before the orchestrator heard of it.
    assert report.after_commit_kills_while_held >= 1, _explain(report)
    assert report.duplicates == sum(
        sum(counts.values()) for kind, counts in report.outcomes.items() if kind.startswith("duplicate")
    )
    assert report.duplicates > 0
    # Business refusals never complete, whatever was killed meanwhile, on v1 as on v2.
    for kind in ("declined", "outofstock"):
        assert {s for k, counts in report.outcomes.items() if k.startswith(kind) for s in counts} == {"COMPENSATED"}
    assert sum(sum(counts.values()) for counts in report.outcomes.values()) == 304
    _assert_the_long_running_kinds_were_met(report)
    # Reviews placed while the orchestrator started v1 had their decisions refused: v1 has no review.
    assert report.deliveries["approval"].get("SIGNAL_NOT_AWAITED", 0) > 0, _explain(report)


def test_postgres_two_replicas_two_instances_and_lost_commit_replies(tmp_path: Path, postgres_url: str) -> None:
    config = ChaosConfig(
        sagas=100,
        orchestrator_kills=0,
        replica_kills=2,
        service_kills=0,
        # The first instance of each pair is killed right after a commit; the second answers the resend.
        after_commit_kills=1,
        after_commit_services=("inventory", "payment"),
        second_instances=("inventory", "payment"),
        instance_kills=0,
        lost_commits=2,
        lost_commit_services=("inventory", "payment"),
        database_url=postgres_url,
        data_dir=tmp_path,
        gap_seconds=(0.1, 0.4),
        down_seconds=(0.0, 0.3),
        drain_timeout=120.0,
    )
    report = run_chaos(config, log=lambda line: None)
    assert report.violations == [], _explain(report)
    assert report.placed == report.sagas >= 102
    assert report.kills == {"orchestrator-2": 2, "inventory": 1, "payment": 1}
    assert report.after_commit_kills == {"inventory": 1, "payment": 1}
    assert report.lost_commits == {"drop-commit-reply": 1, "cut-during-commit": 1}
    assert report.two_instances == ["inventory", "payment"]
    assert report.duplicates > 0
    assert set(report.deadlocks) == {"inventory", "payment", "shipping", "notify"}
    # The first replica starts v2, the second v1 (across its restarts too).
    _assert_the_long_running_kinds_were_met(report)
