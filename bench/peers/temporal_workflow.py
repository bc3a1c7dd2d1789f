"""The order saga as a Temporal workflow, in regular-activity and local-activity variants.

This module imports only what Temporal's workflow sandbox allows; the activities it names live in
`bench.peers.temporal` and run in the worker process, outside the sandbox.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

__all__ = ["ACTIVITY_NAMES", "OrderSagaLocal", "OrderSagaRegular", "run_order_saga"]

# The order saga's retry shape: a 2 s call timeout and 5 attempts with backoff from 50 ms.
STEP_TIMEOUT = timedelta(seconds=2)
RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), backoff_coefficient=2.0, maximum_attempts=5,
                    non_retryable_error_types=["Refused"])  # fmt: skip
COMPENSATION_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_interval=timedelta(seconds=5),
                                 maximum_attempts=20)  # fmt: skip
ACTIVITY_NAMES = ("reserve_stock", "charge_payment", "create_shipment", "send_confirmation",
                  "release_stock", "refund_payment", "cancel_shipment")  # fmt: skip


async def run_order_saga(order: dict[str, Any], local: bool) -> str:
    """Reserve, charge, ship (each undone in reverse order on failure), then confirm until it succeeds."""

    async def call(name: str, retry: RetryPolicy = RETRY) -> Any:
        if local:
            return await workflow.execute_local_activity(
                name, order, start_to_close_timeout=STEP_TIMEOUT, retry_policy=retry
            )
        return await workflow.execute_activity(name, order, start_to_close_timeout=STEP_TIMEOUT, retry_policy=retry)

    undo: list[str] = []
    try:
        for action, compensation in (
            ("reserve_stock", "release_stock"),
            ("charge_payment", "refund_payment"),
            ("create_shipment", "cancel_shipment"),
        ):
            # A call whose retries ran out may have taken effect: its own compensation runs too.
            undo.append(compensation)
            result = await call(action)
        order = {**order, "tracking_number": result}
    except ActivityError:
        for compensation in reversed(undo):
            await call(compensation, COMPENSATION_RETRY)
        return "COMPENSATED"
    await call("send_confirmation", RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=10))
    return "COMPLETED"


@workflow.defn(name="OrderSagaRegular")
class OrderSagaRegular:
    """The order saga with regular activities: every call is a task the server schedules and records."""

    @workflow.run
    async def run(self, order: dict[str, Any]) -> str:
        return await run_order_saga(order, local=False)


@workflow.defn(name="OrderSagaLocal")
class OrderSagaLocal:
    """The order saga with local activities: calls run in the worker, recorded with the workflow task."""

    @workflow.run
    async def run(self, order: dict[str, Any]) -> str:
        return await run_order_saga(order, local=True)
