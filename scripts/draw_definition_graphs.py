"""Draws the order saga's definitions (v1 and v2, as ListDefinitions describes them) as the SVG images the docs show."""

# The protos below are what a running orchestrator's ListDefinitions answers for the Python order saga
# with its default settings; `saga definitions graph OrderSaga --version N -f svg` draws the same images.

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sagactl.definition_graph import definition_svg
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"

_INVENTORY = "inventory/sagasuite.inventory.v1.InventoryService"
_PAYMENT = "payment/sagasuite.payment.v1.PaymentService"
_SHIPPING = "shipping/sagasuite.shipping.v1.ShippingService"
_NOTIFY = "notify/sagasuite.notify.v1.NotifyService"
_INPUT = "sagasuite.orchestrator.v1.PlaceOrderRequest"
# OrderSaga v2 with the orchestrator's defaults: a review of up to a day, decided by a reviewer.
_REVIEW_TIMEOUT = 24 * 3600.0
_CALL_TIMEOUT = 2.0


def _call(
    name: str, target: str, method: str, compensation: str, group: str = "", branch: int = 0
) -> pb.DefinitionNode:
    return pb.DefinitionNode(name=name, kind="call", step_kind="compensatable", group=group, branch=branch,
                             action=f"{target}/{method}", compensation=f"{target}/{compensation}",
                             call_timeout_seconds=_CALL_TIMEOUT, budget_seconds=30.0)  # fmt: skip


def _reserve(group: str = "", branch: int = 0) -> pb.DefinitionNode:
    return _call("reserve_stock", _INVENTORY, "ReserveStock", "ReleaseStock", group, branch)


def _charge(group: str = "", branch: int = 0) -> pb.DefinitionNode:
    return _call("charge_payment", _PAYMENT, "Charge", "Refund", group, branch)


def _indexed(nodes: list[pb.DefinitionNode]) -> list[pb.DefinitionNode]:
    for index, node in enumerate(nodes):
        node.index = index
    return nodes


def order_saga_v1() -> pb.SagaDefinitionInfo:
    """OrderSaga v1: four calls in a row; the shipment is the pivot, the confirmation only retries."""
    nodes = [
        _reserve(),
        _charge(),
        _call("create_shipment", _SHIPPING, "CreateShipment", "CancelShipment"),
        pb.DefinitionNode(name="send_confirmation", kind="call", step_kind="retriable",
                          action=f"{_NOTIFY}/SendConfirmation", call_timeout_seconds=_CALL_TIMEOUT,
                          budget_seconds=120.0),
    ]  # fmt: skip
    nodes[2].pivot = True
    return pb.SagaDefinitionInfo(
        name="OrderSaga", version=1, source="python", input_type=_INPUT,
        services=["inventory", "notify", "payment", "shipping"], nodes=_indexed(nodes),
    )  # fmt: skip


def order_saga_v2() -> pb.SagaDefinitionInfo:
    """OrderSaga v2: stock and payment in parallel, a fraud review for large orders, a fulfilment child."""
    nodes = [
        pb.DefinitionNode(name="reserve_and_charge", kind="parallel"),
        _reserve(group="reserve_and_charge", branch=1),
        _charge(group="reserve_and_charge", branch=2),
        pb.DefinitionNode(name="fraud_review", kind="approval", signal="reviewer", conditional=True,
                          timeout_seconds=_REVIEW_TIMEOUT, on_timeout="compensate"),
        pb.DefinitionNode(name="fulfilment", kind="child", child="FulfilmentSaga v1", pivot=True),
    ]  # fmt: skip
    return pb.SagaDefinitionInfo(
        name="OrderSaga", version=2, source="python", input_type=_INPUT,
        deadline_seconds=_REVIEW_TIMEOUT + 3600.0, services=["inventory", "payment"], nodes=_indexed(nodes),
        latest=True,
    )  # fmt: skip


def images() -> dict[Path, str]:
    """Each image's path and the SVG it should hold."""
    return {
        IMAGES / "order-saga-v1.svg": definition_svg(order_saga_v1(), id_prefix="order-v1"),
        IMAGES / "order-saga-v2.svg": definition_svg(order_saga_v2(), id_prefix="order-v2"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that the images are current; exit 1 if not")
    arguments = parser.parse_args()
    stale = []
    for path, svg in images().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == svg:
            continue
        stale.append(path)
        if not arguments.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(svg, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if arguments.check and stale:
        names = ", ".join(str(path.relative_to(ROOT)) for path in stale)
        print(f"out of date: {names}; run {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
