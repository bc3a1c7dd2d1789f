"""Prometheus metrics every process serves on METRICS_PORT: calls by service, method and code, and idempotent replays.

The `service` label names the process that answered (its SERVICE_NAME: inventory, payment, shipping, notify,
orchestrator), so one query over every scraped process tells them apart whatever Prometheus calls its targets.
No `_created` series are exported: they double the series count and no dashboard reads them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server

__all__ = ["LATENCY_BUCKETS", "RPC_CALLS", "RPC_REPLAYS", "RPC_SECONDS", "MetricsServer", "RpcMetrics", "serve_metrics"]

log = logging.getLogger("sagasuite.metrics")

# Seconds, from a fast local write to a slow remote call.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RPC_CALLS = Counter(
    "sagasuite_rpc_calls",
    "gRPC calls handled by this process, by service, method and status code",
    ["service", "method", "code"],
)
RPC_REPLAYS = Counter(
    "sagasuite_rpc_idempotent_replays",
    "Mutating calls answered from a stored idempotency record instead of being executed again",
    ["service", "method"],
)
RPC_SECONDS = Histogram(
    "sagasuite_rpc_duration_seconds",
    "Time to handle a gRPC call, by service and method",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)


class RpcMetrics:
    """An RpcServer observer: counts each call of `service` (with label children cached: it is on every call's path)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._calls: dict[tuple[str, str], Counter] = {}
        self._replays: dict[str, Counter] = {}
        self._seconds: dict[str, Histogram] = {}

    def __call__(self, method: str, code: str, elapsed_ms: float, replayed: bool) -> None:
        calls = self._calls.get((method, code))
        if calls is None:
            calls = self._calls[(method, code)] = RPC_CALLS.labels(self.service, method, code)
        calls.inc()
        seconds = self._seconds.get(method)
        if seconds is None:
            seconds = self._seconds[method] = RPC_SECONDS.labels(self.service, method)
        seconds.observe(elapsed_ms / 1000)
        if replayed:
            replays = self._replays.get(method)
            if replays is None:
                replays = self._replays[method] = RPC_REPLAYS.labels(self.service, method)
            replays.inc()


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint, served from a daemon thread."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(host: str, port: int) -> MetricsServer:
    """Serve the default registry on http://host:port/metrics (port 0 picks a free one), without `_created` series."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it unannotated
    server, thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("serving metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(bound, server, thread)
