"""The order saga on one screen: v1 four calls in a row; v2 in parallel, with a fraud review and a fulfilment child."""

from __future__ import annotations

from orchestrator.definition import (
    Approval,
    ChildSaga,
    Parallel,
    RetryPolicy,
    SagaContext,
    SagaDefinition,
    Step,
    StepKind,
    rpc,
)
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

__all__ = ["FULFILMENT_SAGA", "ORDER_SAGA", "fulfilment_steps", "order_key", "order_saga_v2", "order_steps"]

REASON = "order saga compensated"


# Requests are built only from the saga's stored input and stored step results, so a resend
# is byte-for-byte the request sent before.
def reserve(s: SagaContext) -> inventory.ReserveStockRequest:
    return inventory.ReserveStockRequest(order_id=s.input.order_id, items=s.input.items)


def release(s: SagaContext) -> inventory.ReleaseStockRequest:
    return inventory.ReleaseStockRequest(order_id=s.input.order_id, reason=REASON)


def charge(s: SagaContext) -> payment.ChargeRequest:
    return payment.ChargeRequest(order_id=s.input.order_id, amount=s.input.amount, payment_token=s.input.payment_token)


def refund(s: SagaContext) -> payment.RefundRequest:
    return payment.RefundRequest(order_id=s.input.order_id, reason=REASON)


def ship(s: SagaContext) -> shipping.CreateShipmentRequest:
    return shipping.CreateShipmentRequest(order_id=s.input.order_id, address=s.input.shipping_address,
                                          items=s.input.items)  # fmt: skip


def cancel_shipment(s: SagaContext) -> shipping.CancelShipmentRequest:
    return shipping.CancelShipmentRequest(order_id=s.input.order_id, reason=REASON)


def confirm(s: SagaContext) -> notify.SendConfirmationRequest:
    tracking = s.result("create_shipment").shipment.tracking_number
    summary = notify.OrderSummary(items=s.input.items, amount=s.input.amount, tracking_number=tracking)
    return notify.SendConfirmationRequest(order_id=s.input.order_id, recipient=s.input.customer_email, summary=summary)


def confirm_fulfilment(s: SagaContext) -> notify.SendConfirmationRequest:
    # The same request as v1's: the fulfilment child holds the shipment result itself.
    return confirm(s)


# fmt: off
RESERVE_STOCK = Step("reserve_stock",
                     action=rpc("inventory", inventory, "ReserveStock", reserve),
                     compensation=rpc("inventory", inventory, "ReleaseStock", release))
CHARGE_PAYMENT = Step("charge_payment",
                      action=rpc("payment", payment, "Charge", charge),
                      compensation=rpc("payment", payment, "Refund", refund))
CREATE_SHIPMENT = Step("create_shipment",
                       action=rpc("shipping", shipping, "CreateShipment", ship),
                       compensation=rpc("shipping", shipping, "CancelShipment", cancel_shipment))
# Once the shipment exists the order stands: the confirmation retries, never unwinds.
SEND_CONFIRMATION = Step("send_confirmation", kind=StepKind.RETRIABLE,
                         action=rpc("notify", notify, "SendConfirmation", confirm),
                         retry=RetryPolicy(initial_interval=0.1, maximum_interval=5.0, maximum_attempts=10),
                         budget=120.0)


def order_steps() -> tuple[Step, ...]:
    """The four steps of v1, each action beside its compensation."""
    return (RESERVE_STOCK, CHARGE_PAYMENT, CREATE_SHIPMENT, SEND_CONFIRMATION)


def fulfilment_steps() -> tuple[Step, ...]:
    """Ship, then confirm: the pivot is the shipment, as in v1."""
    return (CREATE_SHIPMENT, SEND_CONFIRMATION)


def order_key(order: PlaceOrderRequest) -> str:
    """The business key of a saga over one order: the order id, which every compensation acts on."""
    return order.order_id


SOURCE = f"python:{__name__}"
ORDER_SAGA = SagaDefinition(name="OrderSaga", version=1, input_type=PlaceOrderRequest, steps=order_steps(),
                            business_key=order_key, source=SOURCE)
# The child of v2: its business key is the parent's (the order id), under its own type.
FULFILMENT_SAGA = SagaDefinition(name="FulfilmentSaga", version=1, input_type=PlaceOrderRequest,
                                 steps=fulfilment_steps(), business_key=order_key, source=SOURCE)
# fmt: on


def order_saga_v2(review_threshold: int, review_timeout: float, review_role: str = "reviewer") -> SagaDefinition:
    """v2: stock and payment in parallel; an order of review_threshold minor units or more waits for a
    fraud review (reject or timeout compensates); then the FulfilmentSaga child ships and confirms."""

    def needs_review(s: SagaContext) -> bool:
        return bool(s.input.amount.minor_units >= review_threshold)

    return SagaDefinition(
        name="OrderSaga",
        version=2,
        input_type=PlaceOrderRequest,
        steps=(
            Parallel("reserve_and_charge", branches=((RESERVE_STOCK,), (CHARGE_PAYMENT,))),
            Approval("fraud_review", timeout=review_timeout, role=review_role,
                     remind_after=min(3600.0, review_timeout / 2), when=needs_review),
            ChildSaga("fulfilment", FULFILMENT_SAGA, build_input=lambda s: s.input),
        ),
        business_key=order_key,
        # The review may take its whole timeout; the saga gets an hour more for the rest.
        deadline=min(7 * 24 * 3600.0, review_timeout + 3600.0),
        source=SOURCE,
    )  # fmt: skip
