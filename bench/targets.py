"""What every benchmark target shares: the order it places, the timing it reports, its channel options and shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from devstack.orders import order_request
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["CHANNEL_OPTIONS", "COMPLETED", "SagaTiming", "Target", "bench_order"]

COMPLETED = "COMPLETED"
# Quiet, fast reconnects; sagas of the bench never fail on purpose.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 500)]


def bench_order(order_id: str) -> pb.PlaceOrderRequest:
    """The order every bench saga places: two lines of plentiful stock and a card that is accepted."""
    return order_request(order_id, email="bench@example.com")


@dataclass(frozen=True)
class SagaTiming:
    """One saga as the client saw it: perf_counter times when it was due, accepted and ended, and how it ended."""

    due: float
    accepted: float
    ended: float
    outcome: str

    @property
    def start_latency(self) -> float:
        return self.accepted - self.due

    @property
    def completion_latency(self) -> float:
        return self.ended - self.due


class Target(Protocol):
    """One way of running the order saga end to end."""

    name: str
    # Whether "accepted" means something (the saga was durably started) apart from "ended".
    has_start: bool

    async def open(self) -> None: ...
    async def run_one(self, order_id: str, due: float) -> SagaTiming: ...
    async def close(self) -> None: ...
    def processes(self) -> dict[str, int]: ...
