"""The chaos harness: its invariant checks catch each kind of damage, and short runs under its faults break none."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.chaos import (
    UNREADABLE_LINE,
    ChaosConfig,
    ChaosReport,
    OrderRecord,
    StartAnswer,
    StartWay,
    check_one_saga_per_order,
    check_order,
    check_stock,
    read_file_sink,
    run_chaos,
)

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


# -- short runs ------------------------------------------------------------------------------


def _explain(report: ChaosReport) -> str:
    return "\n".join(report.violations[:20]) + f"\n{report.as_dict()}"


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
    assert report.duplicates == sum(report.outcomes["duplicate"].values()) > 0
    # Business refusals never complete, whatever was killed meanwhile.
    assert set(report.outcomes["declined"]) == {"COMPENSATED"}
    assert set(report.outcomes["outofstock"]) == {"COMPENSATED"}
    assert sum(sum(counts.values()) for counts in report.outcomes.values()) == 304


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
