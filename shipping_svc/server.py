"""gRPC transport of the shipping service: contract messages in, domain calls, messages out."""

from __future__ import annotations

from sqlalchemy import Connection

from sagasuite.shipping.v1 import shipping_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as pb_grpc
from shipping_svc import service
from shipping_svc.config import ShippingSettings
from svckit.convert import address_from_pb, address_to_pb, lines_from_pb, lines_to_pb, timestamp
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


class ShippingServicer(pb_grpc.ShippingServiceServicer):
    """Implements sagasuite.shipping.v1.ShippingService."""

    def __init__(self, process: ServiceProcess) -> None:
        self._process = process
        self.rpc_server = process.rpc_server  # what rpc() reports each call to

    @rpc(mutating=True)
    async def CreateShipment(self, request: pb.CreateShipmentRequest, call: CallContext) -> pb.CreateShipmentResponse:
        address = address_from_pb(request, "address")
        lines = lines_from_pb(request.items)
        service.validate_create(request.order_id, address, lines)
        assert address is not None  # validate_create refuses a request without one

        def effect(connection: Connection) -> pb.CreateShipmentResponse:
            shipment = service.create_shipment(connection, request.order_id, address, lines)
            return pb.CreateShipmentResponse(shipment=_shipment_pb(shipment))

        return await self._process.idempotent(call, request, effect, pb.CreateShipmentResponse)

    @rpc(mutating=True)
    async def CancelShipment(self, request: pb.CancelShipmentRequest, call: CallContext) -> pb.CancelShipmentResponse:
        service.validate_cancel(request.order_id, request.reason)

        def effect(connection: Connection) -> pb.CancelShipmentResponse:
            shipment, was_created = service.cancel_shipment(connection, request.order_id)
            return pb.CancelShipmentResponse(shipment=_shipment_pb(shipment), was_created=was_created)

        return await self._process.idempotent(call, request, effect, pb.CancelShipmentResponse)

    @rpc(mutating=False)
    async def GetShipment(self, request: pb.GetShipmentRequest, call: CallContext) -> pb.GetShipmentResponse:
        violations = Violations()
        violations.identifier("order_id", request.order_id)
        violations.raise_if_any()
        shipment = await self._process.database.transaction(lambda c: service.get_shipment(c, request.order_id))
        return pb.GetShipmentResponse(shipment=_shipment_pb(shipment))


def build_process(settings: ShippingSettings) -> ServiceProcess:
    process = ServiceProcess(settings, contract="sagasuite.shipping.v1")
    servicer = ShippingServicer(process)
    process.add_service(
        lambda server: pb_grpc.add_ShippingServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["ShippingService"].full_name,
    )
    return process
