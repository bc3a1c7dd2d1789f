"""What every benchmark target shares: the order it places, the timing it reports, its shape, the group it runs in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from devstack.orders import order_request
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = [
    "CHANNEL_OPTIONS",
    "COMPLETED",
    "PeerGroup",
    "PeerUnavailable",
    "ResidentGroup",
    "SagaTiming",
    "Target",
    "TargetGroup",
    "bench_order",
]

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


class TargetGroup(Protocol):
    """Targets that share processes: started just before their phases of a round and stopped right after.

    So a peer's server and workers never sit idle beside another target's measured window.
    `prepare` runs once, before the stack starts, and raises PeerUnavailable when the group
    cannot run here (a package missing, an install that failed).
    """

    name: str
    notes: list[str]

    def prepare(self) -> None: ...
    def start(self) -> Sequence[Target]: ...
    def stop(self) -> None: ...


class PeerGroup(TargetGroup, Protocol):
    """A peer engine's group: made before the stack starts (so `prepare` can fail first), bound to it once it runs."""

    def bind(self, service_addresses: Mapping[str, str], service_pids: Mapping[str, int]) -> None: ...


@dataclass
class ResidentGroup:
    """Targets on processes that run for the whole benchmark (the suite's own stack): nothing to start."""

    name: str
    targets: Sequence[Target]
    notes: list[str] = field(default_factory=list)

    def prepare(self) -> None:
        pass

    def start(self) -> Sequence[Target]:
        return self.targets

    def stop(self) -> None:
        pass


class PeerUnavailable(RuntimeError):
    """A peer cannot run on this machine; the message is one line that says why and what to install."""
