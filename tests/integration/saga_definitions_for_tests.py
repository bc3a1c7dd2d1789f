"""Extra saga definitions the orchestrator loads in tests through SAGA_DEFINITIONS=module:attribute."""

from __future__ import annotations

import dataclasses

from orchestrator.definition import (
    Approval,
    ChildSaga,
    OnTimeout,
    Parallel,
    RetryPolicy,
    SagaContext,
    SagaDefinition,
    Step,
    Timer,
    WaitForSignal,
    rpc,
)
from orchestrator.sagas.order import (
    CHARGE_PAYMENT,
    CREATE_SHIPMENT,
    ORDER_SAGA,
    RESERVE_STOCK,
    charge,
    order_key,
    order_steps,
    refund,
    release,
    reserve,
)
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
# reserves. Same request builders, so only the order of the steps differs. Version 3: the
# orchestrator registers its own v2.
ORDER_SAGA_V2 = SagaDefinition(
    name="OrderSaga",
    version=3,
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
    ORDER_SAGA, version=3, steps=(_reserve, _charge, dataclasses.replace(_ship, timeout=20.0), _confirm)
)


# -- long-running step kinds (tests/integration/test_long_running.py) ----------------------------


# fmt: off
def _charge_with_signalled_token(s: SagaContext) -> payment.ChargeRequest:
    # A later step reads the signal's payload: the token the customer confirmed.
    token = str(s.signal("await_payment").get("token", s.input.payment_token))
    return payment.ChargeRequest(order_id=s.input.order_id, amount=s.input.amount, payment_token=token)


CHARGE_WITH_SIGNALLED_TOKEN = Step("charge_payment",
                                   action=rpc("payment", payment, "Charge", _charge_with_signalled_token),
                                   compensation=rpc("payment", payment, "Refund", refund))

# Reserve, cool off (so a signal sent at once arrives before the wait), wait for the payment signal, charge.
SIGNALLED_ORDER_SAGA = SagaDefinition(
    name="SignalledOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key, deadline=120.0,
    steps=(RESERVE_STOCK, Timer("cool_off", duration=1.0),
           WaitForSignal("await_payment", signal="payment_ok", timeout=60.0), CHARGE_WITH_SIGNALLED_TOKEN),
)
# The same wait with a short timeout: it compensates.
IMPATIENT_ORDER_SAGA = SagaDefinition(
    name="ImpatientOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(RESERVE_STOCK, WaitForSignal("await_payment", signal="payment_ok", timeout=1.0), CHARGE_PAYMENT),
)
# Reserve, sleep three seconds, charge: a timer to kill the orchestrator across and to pause across.
TIMED_ORDER_SAGA = SagaDefinition(
    name="TimedOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(RESERVE_STOCK, Timer("cool_off", duration=3.0), CHARGE_PAYMENT),
)
# Three branches; the charge (after a short timer) fails on a declined card, the other two complete.
PARALLEL_ORDER_SAGA = SagaDefinition(
    name="ParallelOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(Parallel("prepare", branches=((RESERVE_STOCK,),
                                         (Timer("settle", duration=0.5), CHARGE_PAYMENT),
                                         (CREATE_SHIPMENT,))),),
)
# A child that ships and then waits for a signal long enough to be paused, cancelled or terminated.
SHIPPING_CHILD_SAGA = SagaDefinition(
    name="ShippingChild", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(
        CREATE_SHIPMENT,
        # After its pivot: a wait there cannot compensate, so its timeout leaves it to an operator.
        WaitForSignal("await_pickup", signal="picked_up", timeout=60.0, on_timeout=OnTimeout.FAIL),
    ),
)
# Reserve, run the child, then charge: with a declined card the parent compensates the completed child whole.
PARENT_ORDER_SAGA = SagaDefinition(
    name="ParentOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key, deadline=120.0,
    steps=(RESERVE_STOCK, ChildSaga("shipping", SHIPPING_CHILD_SAGA, build_input=lambda s: s.input), CHARGE_PAYMENT),
)
# fmt: on

# fmt: off
# A wait that leaves its timeout to an operator: RetrySaga waits again.
FAILING_WAIT_ORDER_SAGA = SagaDefinition(
    name="FailingWaitOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(RESERVE_STOCK,
           WaitForSignal("await_payment", signal="payment_ok", timeout=1.0, on_timeout=OnTimeout.FAIL),
           CHARGE_PAYMENT),
)
# A child that waits before it ships (before its own pivot): cancelling its parent unwinds it.
WAITING_CHILD_SAGA = SagaDefinition(
    name="WaitingChild", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(WaitForSignal("await_stock_check", signal="stock_checked", timeout=60.0), CREATE_SHIPMENT),
)
PATIENT_PARENT_SAGA = SagaDefinition(
    name="PatientParent", version=1, input_type=PlaceOrderRequest, business_key=order_key, deadline=120.0,
    steps=(RESERVE_STOCK, ChildSaga("shipping", WAITING_CHILD_SAGA, build_input=lambda s: s.input), CHARGE_PAYMENT),
)
# fmt: on


# -- crash tests of the long-running kinds (tests/integration/test_long_running_crash.py) --------


# fmt: off
# ParallelOrder whose reserve may take 20 s (a lease lasts 30) and whose charge waits 2 s: a latency
# fault holds the reserve on the wire while the charge branch fails, or while the saga is paused,
# long enough to kill the orchestrator there however busy the machine is.
PATIENT_PARALLEL_ORDER_SAGA = SagaDefinition(
    name="PatientParallelOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(Parallel("prepare", branches=((dataclasses.replace(RESERVE_STOCK, timeout=20.0),),
                                         (Timer("settle", duration=2.0), CHARGE_PAYMENT),
                                         (CREATE_SHIPMENT,))),),
)
# Reserve, an approval that reminds after one second (v2's reminds after an hour), charge.
REMINDED_ORDER_SAGA = SagaDefinition(
    name="RemindedOrder", version=1, input_type=PlaceOrderRequest, business_key=order_key,
    steps=(RESERVE_STOCK, Approval("go_ahead", timeout=60.0, role="reviewer", remind_after=1.0), CHARGE_PAYMENT),
)
# fmt: on
