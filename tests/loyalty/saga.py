"""A Python saga over the suite and the loyalty service: reserve stock, then award points (revoked as compensation).

LOYALTY_SAGA is built at import from loyalty.proto compiled into a temporary folder, so that
`saga conformance --definition tests.loyalty.saga:LOYALTY_SAGA` can name it as module:attribute.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from orchestrator.definition import SagaContext, SagaDefinition, Step, rpc
from orchestrator.sagas.order import RESERVE_STOCK, order_key
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from tests.loyalty.build import build_loyalty, import_loyalty

__all__ = ["LOYALTY_SAGA", "POINTS_PER_UNIT", "loyalty_saga"]

# Points awarded per unit the reservation holds: read from the reserve_stock result, not the input,
# so the award's request depends on an earlier step's stored result as a saga's requests may.
POINTS_PER_UNIT = 10
REASON = "order saga compensated"


def loyalty_saga(loyalty: ModuleType) -> SagaDefinition:
    """The saga over the generated loyalty messages module (loyalty_pb2)."""

    def award(s: SagaContext) -> Any:
        units = sum(item.quantity for item in s.result("reserve_stock").reservation.items)
        return loyalty.AwardPointsRequest(
            order_id=s.input.order_id, customer=s.input.customer_email, points=POINTS_PER_UNIT * units
        )

    def revoke(s: SagaContext) -> Any:
        return loyalty.RevokePointsRequest(order_id=s.input.order_id, reason=REASON)

    # fmt: off
    award_points = Step("award_points",
                        action=rpc("loyalty", loyalty, "AwardPoints", award),
                        compensation=rpc("loyalty", loyalty, "RevokePoints", revoke))
    # fmt: on
    return SagaDefinition(
        name="LoyaltyOrderSaga",
        version=1,
        input_type=PlaceOrderRequest,
        steps=(RESERVE_STOCK, award_points),
        business_key=order_key,
    )


def _compiled() -> ModuleType:
    with tempfile.TemporaryDirectory(prefix="loyalty-stubs-") as out_dir:
        messages, _ = import_loyalty(build_loyalty(Path(out_dir)))
    return messages


LOYALTY_SAGA = loyalty_saga(_compiled())
