"""A real OTLP/gRPC trace receiver for tests: implements TraceService/Export and keeps the spans in memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpReceiver", "ReceivedSpan"]

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span with its resource, ids as lowercase hex ("" for no parent)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    status_message: str

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def instance(self) -> str:
        return str(self.resource.get("service.instance.id", ""))

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        return f"{self.service}:{self.name} trace={self.trace_id[:8]} span={self.span_id} parent={parent}"


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        self._receiver._add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """A gRPC server on loopback that accepts OTLP trace exports from every process of a test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        # opentelemetry-proto's gRPC module is unannotated.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (http:// makes the exporter use plaintext)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(
        self,
        condition: Callable[[list[ReceivedSpan]], bool],
        *,
        trace_id: str | None = None,
        timeout: float = 30.0,
        what: str = "spans",
    ) -> list[ReceivedSpan]:
        """Poll until condition holds for the spans received so far (of one trace, when given)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(trace_id)
            if condition(spans):
                return spans
            if time.monotonic() >= deadline:
                listing = "\n  ".join(str(s) for s in spans) or "(none)"
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; received:\n  {listing}")
            time.sleep(0.02)
