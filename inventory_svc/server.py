"""gRPC transport of the inventory service: contract messages in, domain calls, messages out."""

from __future__ import annotations

from inventory_svc import service
from inventory_svc.config import InventorySettings
from inventory_svc.store import seed_if_empty
from sagasuite.inventory.v1 import inventory_service_pb2 as pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as pb_grpc
from svckit.convert import lines_from_pb, lines_to_pb, timestamp
from svckit.process import ServiceProcess
from svckit.server import CallContext, rpc
from svckit.validation import MAX_LINES, Violations

__all__ = ["InventoryServicer", "build_process"]

_STATUS = {
    service.RESERVED: pb.RESERVATION_STATUS_RESERVED,
    service.RELEASED: pb.RESERVATION_STATUS_RELEASED,
    service.TOMBSTONE: pb.RESERVATION_STATUS_TOMBSTONE,
}


def _reservation_pb(reservation: service.Reservation) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=reservation.reservation_id,
        order_id=reservation.order_id,
        status=_STATUS[reservation.status],
        items=lines_to_pb(reservation.items),
        created_at=timestamp(reservation.created_at),
    )


class InventoryServicer(pb_grpc.InventoryServiceServicer):
    """Implements sagasuite.inventory.v1.InventoryService."""

    def __init__(self, process: ServiceProcess) -> None:
        self._process = process
        self.rpc_server = process.rpc_server  # what rpc() reports each call to

    @rpc(mutating=True)
    async def ReserveStock(self, request: pb.ReserveStockRequest, call: CallContext) -> pb.ReserveStockResponse:
        lines = lines_from_pb(request.items)
        service.validate_reserve(request.order_id, lines)
        return await self._process.idempotent(
            call,
            request,
            lambda c: pb.ReserveStockResponse(reservation=_reservation_pb(service.reserve(c, request.order_id, lines))),
            pb.ReserveStockResponse,
        )

    @rpc(mutating=True)
    async def ReleaseStock(self, request: pb.ReleaseStockRequest, call: CallContext) -> pb.ReleaseStockResponse:
        service.validate_release(request.order_id, request.reason)

        def effect(connection):  # type: ignore[no-untyped-def]
            reservation, was_reserved = service.release(connection, request.order_id)
            return pb.ReleaseStockResponse(reservation=_reservation_pb(reservation), was_reserved=was_reserved)

        return await self._process.idempotent(call, request, effect, pb.ReleaseStockResponse)

    @rpc(mutating=False)
    async def GetReservation(self, request: pb.GetReservationRequest, call: CallContext) -> pb.GetReservationResponse:
        violations = Violations()
        violations.identifier("order_id", request.order_id)
        violations.raise_if_any()
        reservation = await self._process.database.transaction(lambda c: service.get_reservation(c, request.order_id))
        return pb.GetReservationResponse(reservation=_reservation_pb(reservation))

    @rpc(mutating=False)
    async def GetStock(self, request: pb.GetStockRequest, call: CallContext) -> pb.GetStockResponse:
        violations = Violations()
        if violations.count("skus", request.skus, MAX_LINES):
            for index, sku in enumerate(request.skus):
                violations.identifier(f"skus[{index}]", sku)
        violations.raise_if_any()
        levels = await self._process.database.transaction(lambda c: service.stock_levels(c, list(request.skus)))
        return pb.GetStockResponse(
            levels=[pb.StockLevel(sku=s.sku, name=s.name, available=s.available, reserved=s.reserved) for s in levels]
        )


def build_process(settings: InventorySettings) -> ServiceProcess:
    process = ServiceProcess(settings, contract="sagasuite.inventory.v1")
    seeded = process.database.transaction_sync(lambda c: seed_if_empty(c, settings.inventory_seed_file))
    if seeded:
        process.log.info("seeded %d SKUs from %s", seeded, settings.inventory_seed_file)
    servicer = InventoryServicer(process)
    process.add_service(
        lambda server: pb_grpc.add_InventoryServiceServicer_to_server(servicer, server),
        pb.DESCRIPTOR.services_by_name["InventoryService"].full_name,
    )
    return process
