"""The order saga on one screen: reserve stock, charge payment, create shipment, send confirmation."""

from __future__ import annotations

from orchestrator.definition import RetryPolicy, SagaContext, SagaDefinition, Step, StepKind, rpc
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

__all__ = ["ORDER_SAGA", "order_key", "order_steps"]

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


# fmt: off
def order_steps() -> tuple[Step, ...]:
    """The four steps, each action beside its compensation."""
    return (
        Step("reserve_stock",
             action=rpc("inventory", inventory, "ReserveStock", reserve),
             compensation=rpc("inventory", inventory, "ReleaseStock", release)),
        Step("charge_payment",
             action=rpc("payment", payment, "Charge", charge),
             compensation=rpc("payment", payment, "Refund", refund)),
        Step("create_shipment",
             action=rpc("shipping", shipping, "CreateShipment", ship),
             compensation=rpc("shipping", shipping, "CancelShipment", cancel_shipment)),
        # Once the shipment exists the order stands: the confirmation retries, never unwinds.
        Step("send_confirmation", kind=StepKind.RETRIABLE,
             action=rpc("notify", notify, "SendConfirmation", confirm),
             retry=RetryPolicy(initial_interval=0.1, maximum_interval=5.0, maximum_attempts=10), budget=120.0),
    )


def order_key(order: PlaceOrderRequest) -> str:
    """The business key of a saga over one order: the order id, which every compensation acts on."""
    return order.order_id


ORDER_SAGA = SagaDefinition(name="OrderSaga", version=1, input_type=PlaceOrderRequest, steps=order_steps(),
                            business_key=order_key)
# fmt: on
