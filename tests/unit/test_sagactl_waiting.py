"""The pure parts of the commands for waiting sagas: which approval is meant, signal ids, payloads, and how
waits, children and child sagas are rendered."""

from __future__ import annotations

import io

import pytest
import typer
from google.protobuf.struct_pb2 import Struct
from rich.console import Console

from sagactl.render import saga_dict, saga_list, saga_waits
from sagactl.waiting import _approval_step, _payload, default_signal_id
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

NOW = 1_800_000_000.0
PARENT = "a" * 32
CHILD = "b" * 32


def waiting(*waits: tuple[str, str]) -> pb.Saga:
    return pb.Saga(
        saga_id=PARENT,
        status=pb.SAGA_STATUS_RUNNING,
        waits=[pb.SagaWait(kind=kind, step=step, description=f"{kind} {step}") for kind, step in waits],
    )


def test_the_approval_is_the_step_given_or_the_only_one_that_waits(capsys: pytest.CaptureFixture[str]) -> None:
    assert _approval_step(waiting(("approval", "fraud_review")), "") == "fraud_review"
    assert _approval_step(waiting(), "fraud_review") == "fraud_review"
    assert _approval_step(waiting(("timer", "cool_off"), ("approval", "go_ahead")), "") == "go_ahead"
    several = waiting(("approval", "a"), ("approval", "b"))
    for saga, named in ((several, "waits for 2 approvals (a, b)"), (waiting(), "(RUNNING) waits for no approval")):
        with pytest.raises(typer.Exit) as ended:
            _approval_step(saga, "")
        assert ended.value.exit_code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and named in error and "--step" in error, error


def test_a_default_signal_id_follows_the_name_and_the_payload_not_the_key_order() -> None:
    one, same = Struct(), Struct()
    one.update({"token": "tok_visa", "note": "x"})
    same.update({"note": "x", "token": "tok_visa"})
    assert default_signal_id("payment_ok", one) == default_signal_id("payment_ok", same)
    assert default_signal_id("payment_ok", one) != default_signal_id("payment_ok_2", one)
    assert default_signal_id("payment_ok", one) != default_signal_id("payment_ok", Struct())
    assert default_signal_id("payment_ok", one).startswith("cli-") and len(default_signal_id("payment_ok", one)) == 36


def test_a_payload_is_a_json_object() -> None:
    assert dict(_payload('{"a": 1, "b": {"c": [true, null]}}', "")) == {"a": 1.0, "b": {"c": [True, None]}}
    assert _payload("", "") == Struct()
    for text, message in (("[1]", "got list"), ("{", "not JSON"), ('{"a": Infinity}', "not a JSON number")):
        with pytest.raises(typer.BadParameter, match=message):
            _payload(text, "")
    with pytest.raises(typer.BadParameter, match="not both"):
        _payload("{}", "-")


def family() -> list[pb.Saga]:
    """A FulfilmentSaga child listed above its OrderSaga parent, as ListSagas returns them (newest first)."""
    link = pb.ChildLink(step="fulfilment", saga_id=CHILD, saga_type="FulfilmentSaga")
    child = pb.Saga(saga_id=CHILD, saga_type="FulfilmentSaga", definition_version=1, parent_saga_id=PARENT)
    parent = pb.Saga(saga_id=PARENT, saga_type="OrderSaga", definition_version=2, children=[link])
    for saga, step in ((child, "create_shipment"), (parent, "fulfilment")):
        saga.business_key, saga.status, saga.current_step = "ord-42", pb.SAGA_STATUS_RUNNING, step
        saga.created_at.FromSeconds(int(NOW) - 5)
    return [child, parent]


def rendered(renderable: object, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def test_a_listing_marks_a_child_and_never_cuts_an_id() -> None:
    wide = rendered(saga_list(family(), NOW), 160)
    assert f"{CHILD[:8]}  ↳ FulfilmentSaga v1  ord-42" in wide and f"{PARENT[:8]}  OrderSaga v2 " in wide, wide
    # Too narrow for a row a saga: two lines each, the short id whole.
    narrow = rendered(saga_list(family(), NOW), 56)
    assert max(map(len, narrow.splitlines())) <= 56, narrow
    assert narrow.splitlines()[1:] == [
        f"{CHILD[:8]}  {'RUNNING':<15}  {'5.0s':>5}  {'-':>5}",
        "  ↳ Fulfilment v1 · order ord-42 · at create_shipment",
        f"{PARENT[:8]}  {'RUNNING':<15}  {'5.0s':>5}  {'-':>5}",
        "  Order v2 · order ord-42 · at fulfilment",
    ], narrow


def test_waits_name_the_command_that_ends_them() -> None:
    saga = pb.Saga(
        saga_id=PARENT,
        waits=[
            pb.SagaWait(kind="approval", step="fraud_review", signal="reviewer", description="approval fraud_review"),
            pb.SagaWait(kind="signal", step="await_payment", signal="payment_ok", description="signal payment_ok"),
            pb.SagaWait(kind="child", step="fulfilment", child_saga_id=CHILD, description=f"child {CHILD}"),
            pb.SagaWait(kind="timer", step="cool_off", description="timer cool_off"),
        ],
    )
    assert rendered(saga_waits(saga), 200).splitlines() == [
        "⧗ approval fraud_review",
        f"   saga approve|reject {PARENT} --step fraud_review",
        "⧗ signal payment_ok",
        f"   saga signal {PARENT} payment_ok",
        f"⧗ child {CHILD}",
        f"   saga show {CHILD}",
        "⧗ timer cool_off",
    ]


def test_json_carries_the_links_and_waits() -> None:
    child, parent = (saga_dict(saga, history=False) for saga in family())
    assert child["parent_saga_id"] == PARENT and child["children"] == [] and child["waits"] == []
    # ListSagas leaves a child's status out: null rather than UNSPECIFIED.
    link = {"step": "fulfilment", "saga_id": CHILD, "saga_type": "FulfilmentSaga", "status": None}
    assert parent["children"] == [link]
    step = pb.SagaStep(name="charge_payment", kind="call", group="reserve_and_charge", branch=2)
    steps = saga_dict(pb.Saga(steps=[step]))["steps"]
    assert isinstance(steps, list)
    assert {key: steps[0][key] for key in ("kind", "group", "branch", "child_saga_id")} == {
        "kind": "call",
        "group": "reserve_and_charge",
        "branch": 2,
        "child_saga_id": "",
    }
