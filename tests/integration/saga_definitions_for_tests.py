"""Extra saga definitions the orchestrator loads in tests through SAGA_DEFINITIONS=module:attribute."""

from __future__ import annotations

from orchestrator.definition import SagaDefinition, Step, rpc
from orchestrator.order_saga import charge, order_steps, refund, release, reserve
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1 import payment_service_pb2 as payment

__all__ = ["GIFT_CARD_SAGA", "ORDER_SAGA_V2"]

# A second saga type with no engine change: hold the stock of a gift card, then charge for it.
# fmt: off
GIFT_CARD_SAGA = SagaDefinition(
    name="GiftCardSaga", version=1, input_type=PlaceOrderRequest,
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
    name="OrderSaga", version=2, input_type=PlaceOrderRequest, steps=(_charge, _reserve, _ship, _confirm)
)
