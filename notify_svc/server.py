"""gRPC transport of the notification service: contract messages in, domain calls, messages out; and its deliverer."""

from __future__ import annotations

import asyncio
import contextlib
import time

from notify_svc import service
from notify_svc.channels import Channel, FileChannel, make_channel
from notify_svc.config import NotifySettings
from notify_svc.delivery import DELIVER_FAULT, Deliverer, DeliveryPolicy
from sagasuite.notify.v1 import notify_service_pb2 as pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as pb_grpc
from svckit.convert import lines_from_pb, money_from_pb, timestamp
from svckit.faults import FaultInjector, parse_faults
from svckit.idempotency import Effect, KeyedServicer, keyed
from svckit.process import ServiceProcess
from svckit.server import CallContext, rpc

__all__ = ["NotifyProcess", "NotifyServicer", "build_process"]

_STATE_TO_PB = {
    service.DeliveryState.PENDING: pb.DELIVERY_STATE_PENDING,
    service.DeliveryState.DELIVERED: pb.DELIVERY_STATE_DELIVERED,
    service.DeliveryState.FAILED: pb.DELIVERY_STATE_FAILED,
}
_STATE_NAME_FROM_PB: dict[int, str] = {number: state.value for state, number in _STATE_TO_PB.items()}


def _delivery_pb(delivery: service.DeliveryStatus) -> pb.Delivery:
    message = pb.Delivery(
        state=_STATE_TO_PB[delivery.state], attempts=delivery.attempts, last_error=delivery.last_error
    )
    if delivery.delivered_at is not None:
        message.delivered_at.CopyFrom(timestamp(delivery.delivered_at))
    if delivery.next_attempt_at is not None:
        message.next_attempt_at.CopyFrom(timestamp(delivery.next_attempt_at))
    return message


def _notification_pb(notification: service.Notification) -> pb.Notification:
    message = pb.Notification(
        notification_id=notification.notification_id,
        order_id=notification.order_id,
        recipient=notification.recipient,
        channel=notification.channel,
        body=notification.body,
        sent_at=timestamp(notification.sent_at),
    )
    if notification.delivery is not None:
        message.delivery.CopyFrom(_delivery_pb(notification.delivery))
    return message


def _state_name(number: int) -> str:
    """The domain name of a DeliveryState filter: "" when unset, the digits when the number is unknown."""
    if number == pb.DELIVERY_STATE_UNSPECIFIED:
        return ""
    return _STATE_NAME_FROM_PB.get(number, str(number))


def _summary_from_pb(request: pb.SendConfirmationRequest) -> service.OrderSummary | None:
    if not request.HasField("summary"):
        return None
    summary = request.summary
    return service.OrderSummary(lines_from_pb(summary.items), money_from_pb(summary, "amount"), summary.tracking_number)


def _send_response(notification: service.Notification) -> pb.SendConfirmationResponse:
    return pb.SendConfirmationResponse(notification=_notification_pb(notification))


class NotifyServicer(KeyedServicer, pb_grpc.NotifyServiceServicer):
    """Implements sagasuite.notify.v1.NotifyService."""

    def __init__(self, process: ServiceProcess, channel: Channel, deliverer: Deliverer | None) -> None:
        super().__init__(process)
        self._channel = channel
        self._deliverer = deliverer

    def _wake_deliverer(self) -> None:
        # The notification and its delivery row commit with the idempotency record; delivery is
        # the deliverer's job, so the call does not wait for it. Should this call be cancelled
        # while its transaction still commits, the deliverer's next poll finds the row. A call that
        # found the order confirmed earlier, under another key, wakes it for a poll that finds nothing.
        if self._deliverer is not None:
            self._deliverer.wake()

    @keyed(pb.SendConfirmationResponse, committed=_wake_deliverer)
    def SendConfirmation(self, request: pb.SendConfirmationRequest) -> Effect[pb.SendConfirmationResponse]:
        summary = service.validate_send(request.order_id, request.recipient, _summary_from_pb(request))
        channel = self._channel.name
        return lambda c: _send_response(
            service.record_confirmation(c, request.order_id, request.recipient, summary, channel, time.time())
        )

    @rpc(mutating=False)
    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, call: CallContext
    ) -> pb.ListNotificationsResponse:
        page_size, before_seq, state = service.validate_list(
            request.order_id, request.page_size, request.page_token, _state_name(request.delivery_state)
        )
        page = await self.database.transaction(
            lambda c: service.list_notifications(c, request.order_id, page_size, before_seq, state)
        )
        return pb.ListNotificationsResponse(
            notifications=[_notification_pb(n) for n in page.notifications],
            next_page_token=page.next_page_token,
        )


class NotifyProcess(ServiceProcess):
    """The service process plus its deliverer, which runs for as long as the process serves."""

    deliverer: Deliverer | None = None

    async def serve(self) -> None:
        # Started before the server so rows left by a previous run go out at once; it keeps
        # delivering while SIGTERM drains the calls, and stops with the process.
        task = asyncio.create_task(self.deliverer.run()) if self.deliverer is not None else None
        try:
            await super().serve()
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _delivery_faults(spec: str) -> FaultInjector:
    # FAULTS rules for the pseudo-method "Deliver" act on delivery attempts; "*" rules stay
    # with the RPCs. A malformed spec is reported by the server, which parses FAULTS too.
    try:
        rules = parse_faults(spec)
    except ValueError:
        return FaultInjector([])
    return FaultInjector([rule for rule in rules if rule.method == DELIVER_FAULT])


def build_process(settings: NotifySettings) -> NotifyProcess:
    process = NotifyProcess(settings, contract="sagasuite.notify.v1")
    channel = make_channel(settings.notify_channel, settings.data_dir)
    target = f" to {channel.path}" if isinstance(channel, FileChannel) else ""
    process.log.info("delivering notifications through the %s channel%s", channel.name, target)
    if settings.notify_delivery_enabled:
        policy = DeliveryPolicy.from_settings(settings)
        process.deliverer = Deliverer(process.database, channel, policy, faults=_delivery_faults(settings.faults))
    else:
        process.log.warning("NOTIFY_DELIVERY_ENABLED=false: notifications are recorded but this instance delivers none")
    servicer = NotifyServicer(process, channel, process.deliverer)
    process.add_service(
        lambda server: pb_grpc.add_NotifyServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["NotifyService"].full_name,
    )
    return process
