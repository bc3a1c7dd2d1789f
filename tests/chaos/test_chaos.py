"""The chaos harness: its invariant checks catch each kind of damage, and short runs under kill -9 break none."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.chaos import ChaosConfig, ChaosReport, OrderRecord, check_order, check_stock, run_chaos

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


def _explain(report: ChaosReport) -> str:
    return "\n".join(report.violations[:20]) + f"\n{report.as_dict()}"


def test_300_sagas_survive_orchestrator_and_service_kills(tmp_path: Path) -> None:
    config = ChaosConfig(
        sagas=300,
        orchestrator_kills=5,
        service_kills=1,
        data_dir=tmp_path,
        gap_seconds=(0.05, 0.3),
        down_seconds=(0.0, 0.3),
        drain_timeout=60.0,
    )
    lines: list[str] = []
    report = run_chaos(config, log=lines.append)
    assert report.violations == [], _explain(report)
    assert report.placed == 300
    assert report.kills == {"orchestrator": 5, "inventory": 1, "payment": 1, "shipping": 1, "notify": 1}
    # Business refusals never complete, whatever was killed meanwhile.
    assert set(report.outcomes["declined"]) == {"COMPENSATED"}
    assert set(report.outcomes["outofstock"]) == {"COMPENSATED"}
    assert sum(sum(counts.values()) for counts in report.outcomes.values()) == 300


def test_postgres_replica_killed_while_the_other_takes_over(tmp_path: Path, postgres_url: str) -> None:
    config = ChaosConfig(
        sagas=100,
        orchestrator_kills=0,
        replica_kills=2,
        service_kills=0,
        database_url=postgres_url,
        data_dir=tmp_path,
        gap_seconds=(0.1, 0.4),
        down_seconds=(0.0, 0.3),
        drain_timeout=60.0,
    )
    report = run_chaos(config, log=lambda line: None)
    assert report.violations == [], _explain(report)
    assert report.placed == 100
    assert report.kills == {"orchestrator-2": 2}
