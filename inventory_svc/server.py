"""gRPC transport of the inventory service: contract messages in, domain calls, messages out."""

from __future__ import annotations

from inventory_svc import service
from inventory_svc.config import InventorySettings
from inventory_svc.store import seed_if_empty
from sagasuite.inventory.v1 import inventory_service_pb2 as pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as pb_grpc
from svckit.convert import lines_from_pb, lines_to_pb, timestamp
from svckit.idempotency import Effect, KeyedServicer, keyed
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


def _reserve_response(reservation: service.Reservation) -> pb.ReserveStockResponse:
    return pb.ReserveStockResponse(reservation=_reservation_pb(reservation))


def _release_response(reservation: service.Reservation, was_reserved: bool) -> pb.ReleaseStockResponse:
    return pb.ReleaseStockResponse(reservation=_reservation_pb(reservation), was_reserved=was_reserved)


class InventoryServicer(KeyedServicer, pb_grpc.InventoryServiceServicer):
    """Implements sagasuite.inventory.v1.InventoryService."""

    @keyed(pb.ReserveStockResponse)
    def ReserveStock(self, request: pb.ReserveStockRequest) -> Effect[pb.ReserveStockResponse]:
        lines = lines_from_pb(request.items)
        service.validate_reserve(request.order_id, lines)
        return lambda c: _reserve_response(service.reserve(c, request.order_id, lines))

    @keyed(pb.ReleaseStockResponse)
    def ReleaseStock(self, request: pb.ReleaseStockRequest) -> Effect[pb.ReleaseStockResponse]:
        service.validate_release(request.order_id, request.reason)
        return lambda c: _release_response(*service.release(c, request.order_id))

    @rpc(mutating=False)
    async def GetReservation(self, request: pb.GetReservationRequest, call: CallContext) -> pb.GetReservationResponse:
        violations = Violations()
        violations.identifier("order_id", request.order_id)
        violations.raise_if_any()
        reservation = await self.database.transaction(lambda c: service.get_reservation(c, request.order_id))
        return pb.GetReservationResponse(reservation=_reservation_pb(reservation))

    @rpc(mutating=False)
    async def GetStock(self, request: pb.GetStockRequest, call: CallContext) -> pb.GetStockResponse:
        violations = Violations()
        if violations.count("skus", request.skus, MAX_LINES):
            for index, sku in enumerate(request.skus):
                violations.identifier(f"skus[{index}]", sku)
        violations.raise_if_any()
        levels = await self.database.transaction(lambda c: service.stock_levels(c, list(request.skus)))
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
