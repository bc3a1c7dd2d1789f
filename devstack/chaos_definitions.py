"""The chaos harness's own saga definition: an order that waits on a timer and for a signal before it ships."""

# The chaos stack's orchestrator loads it (devstack.chaos sets SAGA_DEFINITIONS to CHAOS_DEFINITIONS
# here, with the repository root on PYTHONPATH). The signal's payload names the shipment's
# recipient, so the audit sees in the shipping service's own records which delivery was consumed.

from __future__ import annotations

from devstack.chaos import RECIPIENT_FIELD, SIGNAL_NAME, SIGNAL_SAGA_TYPE, SIGNAL_WAIT
from orchestrator.definition import OnTimeout, SagaContext, SagaDefinition, Step, Timer, WaitForSignal, rpc
from orchestrator.sagas.order import CHARGE_PAYMENT, RESERVE_STOCK, SEND_CONFIRMATION, cancel_shipment, order_key, ship
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

__all__ = ["CHAOS_DEFINITIONS", "SIGNAL_SAGA"]

# Far longer than a chaos run's drain: a signal that is never consumed shows as a saga still in
# flight when the drain gives up, not as a timeout that would pass for a correct compensation.
SIGNAL_TIMEOUT_SECONDS = 600.0


def ship_to_the_signalled_recipient(s: SagaContext) -> shipping.CreateShipmentRequest:
    """The shipment of the order, to the recipient the consumed signal names."""
    request = ship(s)
    request.address.recipient_name = str(s.signal(SIGNAL_WAIT)[RECIPIENT_FIELD])
    return request


# fmt: off
SIGNAL_SAGA = SagaDefinition(
    name=SIGNAL_SAGA_TYPE,
    version=1,
    input_type=PlaceOrderRequest,
    steps=(
        RESERVE_STOCK,
        # A short durable timer: orchestrator kills meet sagas whose wake-up time is stored.
        Timer("cool_off", duration=0.3),
        CHARGE_PAYMENT,
        # Before the pivot: a timeout would compensate (none is expected; see SIGNAL_TIMEOUT_SECONDS).
        WaitForSignal(SIGNAL_WAIT, signal=SIGNAL_NAME, timeout=SIGNAL_TIMEOUT_SECONDS, on_timeout=OnTimeout.COMPENSATE),
        Step("create_shipment",
             action=rpc("shipping", shipping, "CreateShipment", ship_to_the_signalled_recipient),
             compensation=rpc("shipping", shipping, "CancelShipment", cancel_shipment)),
        SEND_CONFIRMATION,
    ),
    business_key=order_key,
    deadline=2 * SIGNAL_TIMEOUT_SECONDS,
)
# fmt: on

CHAOS_DEFINITIONS = [SIGNAL_SAGA]
