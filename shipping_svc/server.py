"""gRPC transport of the shipping service: contract messages in, domain calls, messages out."""

from __future__ import annotations

from sagasuite.shipping.v1 import shipping_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as pb_grpc
from shipping_svc import service
from shipping_svc.config import ShippingSettings
from svckit.convert import address_from_pb, address_to_pb, lines_from_pb, lines_to_pb, timestamp
from svckit.idempotency import Effect, KeyedServicer, keyed
from svckit.process import ServiceProcess
from svckit.server import CallContext, rpc
from svckit.validation import Violations

__all__ = ["ShippingServicer", "build_process"]

_STATUS = {
    service.CREATED: pb.SHIPMENT_STATUS_CREATED,
    service.CANCELLED: pb.SHIPMENT_STATUS_CANCELLED,
    service.TOMBSTONE: pb.SHIPMENT_STATUS_TOMBSTONE,
}


def _shipment_pb(shipment: service.Shipment) -> pb.Shipment:
    message = pb.Shipment(
        shipment_id=shipment.shipment_id,
        order_id=shipment.order_id,
        status=_STATUS[shipment.status],
        tracking_number=shipment.tracking_number,
        items=lines_to_pb(shipment.items),
        created_at=timestamp(shipment.created_at),
    )
    if shipment.address is not None:
        message.address.CopyFrom(address_to_pb(shipment.address))
    return message


def _create_response(shipment: service.Shipment) -> pb.CreateShipmentResponse:
    return pb.CreateShipmentResponse(shipment=_shipment_pb(shipment))


def _cancel_response(shipment: service.Shipment, was_created: bool) -> pb.CancelShipmentResponse:
    return pb.CancelShipmentResponse(shipment=_shipment_pb(shipment), was_created=was_created)


class ShippingServicer(KeyedServicer, pb_grpc.ShippingServiceServicer):
    """Implements sagasuite.shipping.v1.ShippingService."""

    @keyed(pb.CreateShipmentResponse)
    def CreateShipment(self, request: pb.CreateShipmentRequest) -> Effect[pb.CreateShipmentResponse]:
        address = address_from_pb(request, "address")
        lines = lines_from_pb(request.items)
        service.validate_create(request.order_id, address, lines)
        assert address is not None  # validate_create refuses a request without one
        return lambda c: _create_response(service.create_shipment(c, request.order_id, address, lines))

    @keyed(pb.CancelShipmentResponse)
    def CancelShipment(self, request: pb.CancelShipmentRequest) -> Effect[pb.CancelShipmentResponse]:
        service.validate_cancel(request.order_id, request.reason)
        return lambda c: _cancel_response(*service.cancel_shipment(c, request.order_id))

    @rpc(mutating=False)
    async def GetShipment(self, request: pb.GetShipmentRequest, call: CallContext) -> pb.GetShipmentResponse:
        violations = Violations()
        violations.identifier("order_id", request.order_id)
        violations.raise_if_any()
        shipment = await self.database.transaction(lambda c: service.get_shipment(c, request.order_id))
        return pb.GetShipmentResponse(shipment=_shipment_pb(shipment))


def build_process(settings: ShippingSettings) -> ServiceProcess:
    process = ServiceProcess(settings, contract="sagasuite.shipping.v1")
    servicer = ShippingServicer(process)
    process.add_service(
        lambda server: pb_grpc.add_ShippingServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["ShippingService"].full_name,
    )
    return process
