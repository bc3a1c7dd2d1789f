"""What the CLI prints on an 80-column terminal, and what it says happened: short ids and compact times in `saga
ls`, tables that wrap messages rather than cut names, watch lines with clock times and derived step starts, and
the wording of cancel and of a paused saga."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from sagactl.common import StepStarts
from sagactl.operate import _outcome
from sagactl.render import (
    compact_duration,
    event_line,
    saga_bars,
    saga_children,
    saga_header,
    saga_list,
    saga_steps,
    saga_timeline,
    saga_waits,
    short_ids,
)
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DECLINED = "order demo-074929-declined: the card was declined by the issuing bank after three attempts"


def at(message: object, field: str, seconds: float) -> None:
    getattr(message, field).FromNanoseconds(int(seconds * 1e9))


def rendered(renderable: object, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


# -- saga ls -----------------------------------------------------------------------------------------


def listed(
    saga_id: str, status: pb.SagaStatus, step: str, key: str, *, age: float, took: float | None, **fields: str
) -> pb.Saga:
    saga = pb.Saga(saga_id=saga_id, status=status, current_step=step, business_key=key, definition_version=2)
    saga.saga_type = fields.get("saga_type", "OrderSaga")
    saga.parent_saga_id = fields.get("parent", "")
    at(saga, "created_at", START - age)
    if took is not None:
        at(saga, "ended_at", START - age + took)
    return saga


PAGE = [
    listed("38c254f0a0af42a0a3357c593d8e1f2a", pb.SAGA_STATUS_NEEDS_ATTENTION, "send_confirmation",
           "demo-074929-approved", age=125, took=None),
    listed("38c254f7b1d04e7f8a9b0c1d2e3f4a5b", pb.SAGA_STATUS_COMPLETED, "send_confirmation", "demo-074929-approved",
           age=7300, took=2.14, saga_type="FulfilmentSaga", parent="38c254f0a0af42a0a3357c593d8e1f2a"),
    listed("483f11f9c0de4b5a8e2f3a4b5c6d7e8f", pb.SAGA_STATUS_COMPENSATED, "charge_payment", "demo-074929-declined",
           age=3 * 86400, took=0.0283),
]  # fmt: skip


def test_ids_are_cut_to_eight_characters_or_as_many_as_tell_them_apart() -> None:
    ids = [saga.saga_id for saga in PAGE]
    assert short_ids(ids) == ["38c254f0", "38c254f7", "483f11f9"]
    assert short_ids(["abcdef0123", "abcdef0124", "0" * 32]) == ["abcdef0123", "abcdef0124", "00000000"]
    assert short_ids([]) == []


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0283, "28ms"), (0.9999, "1.0s"), (2.14, "2.1s"), (42.4, "42s"), (125, "2m"), (7300, "2h"), (3 * 86400, "3d")],
)
def test_durations_are_compact(seconds: float, shown: str) -> None:
    assert compact_duration(seconds) == shown and len(shown) <= 5


def test_a_listing_fits_80_columns_with_short_ids_and_nothing_cut() -> None:
    text = rendered(saga_list(PAGE, START), 80)
    rows = lines_of(text)
    assert max(map(len, rows)) <= 80 and "…" not in text, text
    assert rows[0].split() == ["saga", "id", "type", "status", "step", "age", "took"]
    assert rows[1].split() == ["38c254f0", "Order", "v2", "NEEDS_ATTENTION", "send_confirmation", "2m", "-"]
    assert rows[2].split() == ["38c254f7", "↳", "Fulfilment", "v2", "COMPLETED", "send_confirmation", "2h", "2.1s"]
    assert rows[3].split() == ["483f11f9", "Order", "v2", "COMPENSATED", "charge_payment", "3d", "28ms"]


def test_a_wide_listing_keeps_the_whole_type_and_the_order() -> None:
    rows = lines_of(rendered(saga_list(PAGE, START), 160))
    assert rows[0].split() == ["saga", "id", "type", "order", "status", "step", "age", "took"]
    assert rows[2].split()[:5] == ["38c254f7", "↳", "FulfilmentSaga", "v2", "demo-074929-approved"]


def test_an_order_column_that_almost_fits_wraps_its_long_ids_in_place() -> None:
    page = [
        listed("a" * 32, pb.SAGA_STATUS_COMPLETED, "create_shipment", "ord-7", age=5, took=1),
        listed("b" * 32, pb.SAGA_STATUS_COMPLETED, "create_shipment", "ord-0123456789abcdef", age=5, took=1),
    ]
    text = rendered(saga_list(page, START), 80)
    rows = lines_of(text)
    assert max(map(len, rows)) <= 80 and "…" not in text and rows[0].split()[3] == "order", text
    # The long order id goes on in its own column on the next line; the other columns stay whole.
    assert "ord-0123456789abcdef" in "".join(row.split()[3] if i == 2 else row.strip() for i, row in enumerate(rows))


# -- saga show and the demo: tables that fit ------------------------------------------------------


def attempt(
    step: pb.SagaStep, direction: str, number: int, start: float, took: float, code: str, message: str = ""
) -> None:
    made = step.attempts.add(direction=direction, attempt=number, code=code, message=message)
    at(made, "started_at", START + start)
    at(made, "ended_at", START + start + took)


def declined(status: pb.SagaStatus = pb.SAGA_STATUS_COMPENSATED) -> pb.Saga:
    saga = pb.Saga(saga_id="3f2a9c0e5b1d4e7f8a9b0c1d2e3f4a5b", saga_type="OrderSaga", definition_version=2)
    saga.business_key, saga.status = "demo-074929-declined", status
    saga.last_error = f"charge_payment: FAILED_PRECONDITION: {DECLINED}"
    at(saga, "created_at", START)
    at(saga, "ended_at", START + 0.4)
    group = saga.steps.add(name="reserve_and_charge", kind="parallel", state="failed")
    reserve = saga.steps.add(name="reserve_stock", kind="call", state="compensated", group=group.name, branch=1)
    charge = saga.steps.add(name="charge_payment", kind="call", state="failed", group=group.name, branch=2)
    saga.steps.add(name="fraud_review", kind="approval", state="skipped")
    saga.steps.add(name="fulfilment", kind="child", state="skipped")
    attempt(reserve, "action", 1, 0.001, 0.011, "OK")
    for number, start in ((1, 0.001), (2, 0.1)):
        attempt(charge, "action", number, start, 0.002, "UNAVAILABLE", "injected fault: Charge fails its first calls")
    attempt(charge, "action", 3, 0.18, 0.011, "FAILED_PRECONDITION", DECLINED)
    attempt(reserve, "compensation", 1, 0.2, 0.014, "OK")
    charge.last_error = f"FAILED_PRECONDITION: {DECLINED}"
    saga.children.add(step="fulfilment", saga_id="ca6d6ad5" + "f" * 24, saga_type="FulfilmentSaga", status=1)
    return saga


def test_a_saga_shown_at_80_columns_cuts_no_name_or_code_and_hangs_its_messages() -> None:
    saga = declined()
    text = "".join(
        rendered(part) for part in (saga_header(saga), saga_steps(saga), saga_timeline(saga), saga_bars(saga))
    )
    rows = lines_of(text)
    assert max(map(len, rows)) <= 80 and "…" not in text, text
    for whole in ("reserve_and_charge", "charge_payment", "FAILED_PRECONDITION", "UNAVAILABLE", "compensation"):
        assert re.search(rf"(^|\s){whole}(\s|:|$)", text, re.M), whole
    # A long message wraps under its own start, never back to the first column.
    start = next(i for i, row in enumerate(rows) if row.startswith("  last error: "))
    assert rows[start + 1].startswith(" " * len("  last error: ")) and rows[start + 1].endswith(DECLINED.split()[-1])
    # The same message of consecutive tries is said once, under the timeline.
    assert "charge_payment action 1, 2: injected fault: Charge fails its first calls" in text
    assert text.count("injected fault") == 1, text
    notes = [row for row in rows if row.startswith("charge_payment action 3: ")]
    assert notes and rows[rows.index(notes[0]) + 1].startswith("      "), text


def test_long_step_names_stay_whole_and_the_bars_give_way() -> None:
    saga = declined()
    saga.steps[2].name = "charge_payment_through_the_fallback_provider"
    for width in (80, 100):
        bars = lines_of(rendered(saga_bars(saga, 50), width))
        assert max(map(len, bars)) <= width, bars
        assert sum("charge_payment_through_the_fallback_provider →" in row for row in bars) == 3
    timeline = rendered(saga_timeline(saga))
    assert "…" not in timeline and max(map(len, lines_of(timeline))) <= 80, timeline


def test_a_child_s_whole_id_where_it_fits_and_its_short_one_where_not() -> None:
    saga = declined()
    assert saga.children[0].saga_id in rendered(saga_children(saga), 80)
    narrow = rendered(saga_children(saga), 50)
    assert "ca6d6ad5 " in narrow and saga.children[0].saga_id not in narrow and "…" not in narrow


def test_a_wait_wraps_under_its_description() -> None:
    saga = pb.Saga(saga_id="a" * 32)
    description = "approval fraud_review by reviewer since 2026-12-02T07:49:29Z, times out at 2026-12-03T07:49:29Z"
    saga.waits.add(kind="approval", step="fraud_review", signal="reviewer", description=description)
    assert lines_of(rendered(saga_waits(saga))) == [
        "⧗ approval fraud_review by reviewer since 2026-12-02T07:49:29Z, times out at",
        "  2026-12-03T07:49:29Z",
        f"   saga approve|reject {'a' * 32} --step fraud_review",
    ]


def test_a_paused_saga_s_next_step_is_held_not_running() -> None:
    saga = declined(pb.SAGA_STATUS_PAUSED)
    saga.ClearField("ended_at")
    saga.last_error = ""
    saga.steps[2].state = "running"
    text = rendered(saga_header(saga)) + rendered(saga_steps(saga))
    flat = " ".join(text.split())
    assert f"paused: held before try 4 of charge_payment; saga resume {saga.saga_id} lets it go on" in flat
    assert re.search(r"‖ .*charge_payment .*paused", text) and "running" not in text, text


# -- saga watch ---------------------------------------------------------------------------------------


def event(seq: int, kind: str, step: str = "", offset: float = 0.0, code: str = "", number: int = 0) -> pb.HistoryEvent:
    found = pb.HistoryEvent(seq=seq, type=kind, step=step, code=code, attempt=number, actor="orchestrator")
    at(found, "at", START + offset)
    return found


def test_a_watch_line_gives_the_utc_clock_time_beside_the_offset() -> None:
    line = rendered(event_line(event(7, "StepSucceeded", "charge_payment", 6.0219, "OK", 1), None, START), 200)
    assert line.startswith("08:00:06.021    6021.9 ms StepSucceeded ")
    assert re.search(r" charge_payment +#1 OK$", line.rstrip()), line


def steps(*names_and_kinds: tuple[str, str, str, int]) -> list[pb.SagaStep]:
    return [
        pb.SagaStep(name=name, kind=kind, group=group, branch=branch) for name, kind, group, branch in names_and_kinds
    ]


V1 = steps(
    ("reserve_stock", "call", "", 0),
    ("charge_payment", "call", "", 0),
    ("create_shipment", "call", "", 0),
    ("send_confirmation", "call", "", 0),
)
V2 = steps(
    ("reserve_and_charge", "parallel", "", 0),
    ("reserve_stock", "call", "reserve_and_charge", 1),
    ("charge_payment", "call", "reserve_and_charge", 2),
    ("fraud_review", "approval", "", 0),
    ("fulfilment", "child", "", 0),
    ("send_receipt", "call", "", 0),
)


def watched(starts: StepStarts, events: list[pb.HistoryEvent]) -> list[str]:
    """The lines a watch prints, as "type step": each event with the starts told before and after it."""
    shown: list[str] = []
    for found in events:
        shown += [f"{s.type} {s.step}" for s in starts.before(found)]
        shown.append(f"{found.type} {found.step}".rstrip())
        shown += [f"{s.type} {s.step}" for s in starts.after(found)]
    return shown


def test_each_step_of_a_sequence_is_told_when_it_begins() -> None:
    history = [
        event(1, "SagaStarted"),
        event(2, "StepSucceeded", "reserve_stock", 0.01, "OK", 1),
        event(3, "StepFailed", "charge_payment", 0.02, "UNAVAILABLE", 1),
        event(4, "StepRetryScheduled", "charge_payment", 0.02, number=2),
        event(5, "StepSucceeded", "charge_payment", 0.2, "OK", 2),
        event(6, "StepSucceeded", "create_shipment", 0.3, "OK", 1),
        event(7, "StepSucceeded", "send_confirmation", 0.4, "OK", 1),
        event(8, "SagaCompleted", "", 0.4),
    ]
    assert watched(StepStarts(V1), history) == [
        "SagaStarted",
        "StepStarted reserve_stock",
        "StepSucceeded reserve_stock",
        "StepStarted charge_payment",
        "StepFailed charge_payment",
        "StepRetryScheduled charge_payment",
        "StepSucceeded charge_payment",
        "StepStarted create_shipment",
        "StepSucceeded create_shipment",
        "StepStarted send_confirmation",
        "StepSucceeded send_confirmation",
        "SagaCompleted",
    ]
    derived = StepStarts(V1).after(history[1])
    assert [(s.seq, s.attempt, s.at) for s in derived] == [(0, 1, history[1].at)]


def test_branches_begin_together_and_waits_and_children_tell_their_own_start() -> None:
    history = [
        event(1, "SagaStarted"),
        event(2, "BranchesStarted", "reserve_and_charge"),
        event(3, "StepSucceeded", "charge_payment", 0.01, "OK", 1),
        event(4, "StepSucceeded", "reserve_stock", 0.02, "OK", 1),
        event(5, "BranchesCompleted", "reserve_and_charge", 0.02),
        event(6, "WaitStarted", "fraud_review", 0.02),
        event(7, "ApprovalDecided", "fraud_review", 5.0, "APPROVED"),
        event(8, "ChildStarted", "fulfilment", 5.0),
        event(9, "ChildEnded", "fulfilment", 6.0, "COMPLETED"),
    ]
    assert watched(StepStarts(V2), history) == [
        "SagaStarted",
        "BranchesStarted reserve_and_charge",
        "StepStarted reserve_stock",
        "StepStarted charge_payment",
        "StepSucceeded charge_payment",
        "StepSucceeded reserve_stock",
        "BranchesCompleted reserve_and_charge",
        "WaitStarted fraud_review",
        "ApprovalDecided fraud_review",
        "ChildStarted fulfilment",
        "ChildEnded fulfilment",
        "StepStarted send_receipt",
    ]
    rejected = watched(StepStarts(V2), [event(7, "ApprovalDecided", "fraud_review", 5.0, "REJECTED")])
    assert rejected == ["ApprovalDecided fraud_review"]


def test_a_conditional_step_is_told_only_once_it_is_not_skipped() -> None:
    skipped = [
        event(2, "StepSucceeded", "reserve_stock", 0.01, "OK", 1),
        event(3, "StepSkipped", "charge_payment", 0.01),
        event(4, "StepSucceeded", "create_shipment", 0.02, "OK", 1),
    ]
    assert watched(StepStarts(V1, {"charge_payment"}), skipped) == [
        "StepSucceeded reserve_stock",
        "StepSkipped charge_payment",
        "StepStarted create_shipment",
        "StepSucceeded create_shipment",
        "StepStarted send_confirmation",
    ]
    ran = [event(2, "StepSucceeded", "reserve_stock", 0.01, "OK", 1), event(3, "StepSucceeded", "charge_payment", 6)]
    starts = StepStarts(V1, {"charge_payment"})
    assert watched(starts, ran)[:3] == [
        "StepSucceeded reserve_stock",
        "StepStarted charge_payment",
        "StepSucceeded charge_payment",
    ]


def test_a_paused_saga_s_next_step_begins_when_it_is_resumed_and_a_retried_one_again() -> None:
    history = [
        event(2, "SagaPaused", "", 0.005),
        event(3, "StepSucceeded", "reserve_stock", 0.01, "OK", 1),
        event(4, "SagaResumed", "", 30.0),
        event(5, "StepFailed", "charge_payment", 30.1, "FAILED_PRECONDITION", 1),
        event(6, "SagaNeedsAttention", "", 30.1),
        event(7, "SagaRetried", "", 60.0),
    ]
    shown = watched(StepStarts(V1), history)
    assert shown == [
        "SagaPaused",
        "StepSucceeded reserve_stock",
        "SagaResumed",
        "StepStarted charge_payment",
        "StepFailed charge_payment",
        "SagaNeedsAttention",
        "SagaRetried",
        "StepStarted charge_payment",
    ]


# -- what an operator call did ------------------------------------------------------------------------


def test_cancel_says_what_the_answer_says_not_is_now_running() -> None:
    running = pb.Saga(saga_id="a" * 32, status=pb.SAGA_STATUS_RUNNING, current_step="charge_payment")
    assert _outcome("cancel", running) == (
        "cancel requested: it compensates once its call in flight (charge_payment) returns",
        "cancel requested",
    )
    compensating = pb.Saga(saga_id="a" * 32, status=pb.SAGA_STATUS_COMPENSATING)
    assert _outcome("cancel", compensating) == ("is compensating: what it did is being undone", "compensating")
    assert _outcome("pause", pb.Saga(status=pb.SAGA_STATUS_PAUSED)) == ("is now PAUSED", "PAUSED")
