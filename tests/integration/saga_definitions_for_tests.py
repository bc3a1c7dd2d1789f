"""Extra saga definitions the orchestrator loads in tests through SAGA_DEFINITIONS=module:attribute."""

from __future__ import annotations

import dataclasses

from orchestrator.definition import RetryPolicy, SagaDefinition, Step, rpc
from orchestrator.sagas.order import ORDER_SAGA, charge, order_key, order_steps, refund, release, reserve
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1 import payment_service_pb2 as payment

__all__ = ["GIFT_CARD_SAGA", "LOYALTY_SAGA", "ORDER_SAGA_V2", "PATIENT_SHIPPING_ORDER_SAGA"]

# A second saga type with no engine change: hold the stock of a gift card, then charge for it.
# fmt: off
GIFT_CARD_SAGA = SagaDefinition(
    name="GiftCardSaga", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(
        Step("reserve_stock",
             action=rpc("inventory", inventory, "ReserveStock", reserve),
             compensation=rpc("inventory", inventory, "ReleaseStock", release)),
        Step("charge_payment",
             action=rpc("payment", payment, "Charge", charge),
             compensation=rpc("payment", payment, "Refund", refund)),
    ),
)
# fmt: on

_reserve, _charge, _ship, _confirm = order_steps()

# The next version of the order saga, deployed while v1 sagas are running: it charges before it
# reserves. Same request builders, so only the order of the steps differs.
ORDER_SAGA_V2 = SagaDefinition(
    name="OrderSaga",
    version=2,
    input_type=PlaceOrderRequest,
    steps=(_charge, _reserve, _ship, _confirm),
    business_key=order_key,
)

# A saga that keeps retrying its one step for minutes: deployed, then left out of SAGA_DEFINITIONS
# at a restart while such sagas are in flight.
# fmt: off
LOYALTY_SAGA = SagaDefinition(
    name="LoyaltySaga", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(
        Step("reserve_stock",
             action=rpc("inventory", inventory, "ReserveStock", reserve),
             compensation=rpc("inventory", inventory, "ReleaseStock", release),
             retry=RetryPolicy(initial_interval=0.1, maximum_interval=0.5, maximum_attempts=10_000), budget=900.0),
    ),
)
# fmt: on

# The order saga whose create_shipment call may take 20 s (v1 allows 2 s; a lease lasts 30): a test
# can hold that call on the wire, its effect done and its reply held back by a fault, long enough
# to kill the orchestrator there however busy the machine is. Same steps and requests otherwise.
PATIENT_SHIPPING_ORDER_SAGA = dataclasses.replace(
    ORDER_SAGA, version=2, steps=(_reserve, _charge, dataclasses.replace(_ship, timeout=20.0), _confirm)
)
