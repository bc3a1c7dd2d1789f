"""gRPC transport of the payment service: contract messages in, domain calls, messages out."""

from __future__ import annotations

from payment_svc import service
from payment_svc.config import PaymentSettings
from sagasuite.payment.v1 import payment_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pb_grpc
from svckit.convert import money_from_pb, money_to_pb, timestamp
from svckit.idempotency import Effect, KeyedServicer, keyed
from svckit.process import ServiceProcess
from svckit.server import CallContext, rpc

__all__ = ["PaymentServicer", "build_process"]

_STATUS = {
    service.CHARGED: pb.PAYMENT_STATUS_CHARGED,
    service.REFUNDED: pb.PAYMENT_STATUS_REFUNDED,
    service.TOMBSTONE: pb.PAYMENT_STATUS_TOMBSTONE,
}
_KIND = {service.CHARGE: pb.LEDGER_ENTRY_KIND_CHARGE, service.REFUND: pb.LEDGER_ENTRY_KIND_REFUND}


def _payment_pb(payment: service.Payment) -> pb.Payment:
    message = pb.Payment(
        payment_id=payment.payment_id,
        order_id=payment.order_id,
        status=_STATUS[payment.status],
        created_at=timestamp(payment.created_at),
    )
    if payment.amount is not None:
        message.amount.CopyFrom(money_to_pb(payment.amount))
    return message


def _entry_pb(entry: service.LedgerEntry) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        entry_id=entry.entry_id,
        order_id=entry.order_id,
        kind=_KIND[entry.kind],
        amount=money_to_pb(entry.amount),
        created_at=timestamp(entry.created_at),
    )


def _charge_response(payment: service.Payment) -> pb.ChargeResponse:
    return pb.ChargeResponse(payment=_payment_pb(payment))


def _refund_response(payment: service.Payment, was_charged: bool) -> pb.RefundResponse:
    return pb.RefundResponse(payment=_payment_pb(payment), was_charged=was_charged)


class PaymentServicer(KeyedServicer, pb_grpc.PaymentServiceServicer):
    """Implements sagasuite.payment.v1.PaymentService."""

    @keyed(pb.ChargeResponse)
    def Charge(self, request: pb.ChargeRequest) -> Effect[pb.ChargeResponse]:
        amount = money_from_pb(request, "amount")
        service.validate_charge(request.order_id, amount, request.payment_token)
        assert amount is not None  # validate_charge refuses a missing amount
        return lambda c: _charge_response(service.charge(c, request.order_id, amount, request.payment_token))

    @keyed(pb.RefundResponse)
    def Refund(self, request: pb.RefundRequest) -> Effect[pb.RefundResponse]:
        service.validate_refund(request.order_id, request.reason)
        return lambda c: _refund_response(*service.refund(c, request.order_id))

    @rpc(mutating=False)
    async def GetPayment(self, request: pb.GetPaymentRequest, call: CallContext) -> pb.GetPaymentResponse:
        service.validate_order_id(request.order_id)
        payment = await self.database.transaction(lambda c: service.get_payment(c, request.order_id))
        return pb.GetPaymentResponse(payment=_payment_pb(payment))

    @rpc(mutating=False)
    async def ListPayments(self, request: pb.ListPaymentsRequest, call: CallContext) -> pb.ListPaymentsResponse:
        query = service.parse_ledger_query(request.order_id, request.page_size, request.page_token)
        page = await self.database.transaction(lambda c: service.ledger_page(c, query))
        return pb.ListPaymentsResponse(
            entries=[_entry_pb(entry) for entry in page.entries], next_page_token=page.next_page_token
        )


def build_process(settings: PaymentSettings) -> ServiceProcess:
    process = ServiceProcess(settings, contract="sagasuite.payment.v1")
    servicer = PaymentServicer(process)
    process.add_service(
        lambda server: pb_grpc.add_PaymentServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["PaymentService"].full_name,
    )
    return process
