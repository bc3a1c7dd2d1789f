"""gRPC transport of the notification service: contract messages in, domain calls, delivery, messages out."""

from __future__ import annotations

import asyncio

from sqlalchemy import Connection

from notify_svc import service
from notify_svc.channels import Channel, FileChannel, make_channel
from notify_svc.config import NotifySettings
from sagasuite.notify.v1 import notify_service_pb2 as pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as pb_grpc
from svckit.convert import lines_from_pb, money_from_pb, timestamp
from svckit.process import ServiceProcess
from svckit.server import CallContext, rpc

__all__ = ["NotifyServicer", "build_process"]


def _notification_pb(notification: service.Notification) -> pb.Notification:
    return pb.Notification(
        notification_id=notification.notification_id,
        order_id=notification.order_id,
        recipient=notification.recipient,
        channel=notification.channel,
        body=notification.body,
        sent_at=timestamp(notification.sent_at),
    )


def _summary_from_pb(request: pb.SendConfirmationRequest) -> service.OrderSummary | None:
    if not request.HasField("summary"):
        return None
    summary = request.summary
    return service.OrderSummary(lines_from_pb(summary.items), money_from_pb(summary, "amount"), summary.tracking_number)


class NotifyServicer(pb_grpc.NotifyServiceServicer):
    """Implements sagasuite.notify.v1.NotifyService."""

    def __init__(self, process: ServiceProcess, channel: Channel) -> None:
        self._process = process
        self._channel = channel
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._sending: set[asyncio.Task[pb.SendConfirmationResponse]] = set()

    @rpc(mutating=True)
    async def SendConfirmation(
        self, request: pb.SendConfirmationRequest, call: CallContext
    ) -> pb.SendConfirmationResponse:
        summary = service.validate_send(request.order_id, request.recipient, _summary_from_pb(request))
        # gRPC cancels this handler when the caller's deadline passes or it hangs up, yet a
        # transaction already handed to the database thread may still commit. Recording and
        # delivery run in a task that cancellation cannot interrupt, so whatever commits is
        # delivered: a retry with the same key replays and would never deliver it.
        task = asyncio.ensure_future(self._record_and_deliver(request, summary, call))
        self._sending.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[pb.SendConfirmationResponse]) -> None:
        self._sending.discard(task)
        if not task.cancelled():
            # Retrieved so that a task whose caller went away does not log "never retrieved".
            task.exception()

    async def _record_and_deliver(
        self, request: pb.SendConfirmationRequest, summary: service.OrderSummary, call: CallContext
    ) -> pb.SendConfirmationResponse:
        outcome: list[service.Recorded] = []

        def effect(connection: Connection) -> pb.SendConfirmationResponse:
            # A retried transaction runs this again; only the last run's outcome committed.
            outcome[:] = [
                service.record_confirmation(
                    connection, request.order_id, request.recipient, summary, self._channel.name
                )
            ]
            return pb.SendConfirmationResponse(notification=_notification_pb(outcome[0].notification))

        response = await self._process.idempotent(call, request, effect, pb.SendConfirmationResponse)
        # A replay's outcome may come from an attempt that rolled back: only a fresh, committed
        # recording is delivered, and by exactly the one call that made it.
        if outcome and outcome[0].fresh and not call.notes.get("replayed"):
            await self._deliver(outcome[0].notification)
        return response

    async def _deliver(self, notification: service.Notification) -> None:
        try:
            await self._channel.deliver(notification)
        except Exception:
            # The notification is committed and a retry would only replay it, so failing the
            # call cannot bring a second attempt; the operator gets the id to resend by hand.
            self._process.log.exception(
                "delivery failed notification=%s order=%s channel=%s",
                notification.notification_id,
                notification.order_id,
                self._channel.name,
            )

    @rpc(mutating=False)
    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, call: CallContext
    ) -> pb.ListNotificationsResponse:
        page_size, before_seq = service.validate_list(request.order_id, request.page_size, request.page_token)
        page = await self._process.database.transaction(
            lambda c: service.list_notifications(c, request.order_id, page_size, before_seq)
        )
        return pb.ListNotificationsResponse(
            notifications=[_notification_pb(n) for n in page.notifications],
            next_page_token=page.next_page_token,
        )


def build_process(settings: NotifySettings) -> ServiceProcess:
    process = ServiceProcess(settings, contract="sagasuite.notify.v1")
    channel = make_channel(settings.notify_channel, settings.data_dir)
    target = f" to {channel.path}" if isinstance(channel, FileChannel) else ""
    process.log.info("delivering notifications through the %s channel%s", channel.name, target)
    servicer = NotifyServicer(process, channel)
    process.add_service(
        lambda server: pb_grpc.add_NotifyServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["NotifyService"].full_name,
    )
    return process
