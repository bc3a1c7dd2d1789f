"""The kit's side of the wire: raw calls that keep the bytes as they came, health checks and reflection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from svckit.idempotency_key import IDEMPOTENCY_HEADER

__all__ = ["Answer", "Caller", "MethodDescription", "TargetUnreachable", "describe_method"]

_STATUS_DETAILS_HEADER = "grpc-status-details-bin"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# v1 first, as grpcurl does; v1alpha has the same messages on the wire, so one set of messages serves both.
_REFLECTION_METHODS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


class TargetUnreachable(Exception):
    """A target's address did not accept a connection in time."""

    def __init__(self, service: str, address: str, seconds: float) -> None:
        super().__init__(f"cannot reach {service} at {address} (no connection within {seconds:g} s)")
        self.service = service
        self.address = address


@dataclass(frozen=True)
class Answer:
    """What one call answered, as it came: the response bytes, or the status with its details bytes."""

    code: grpc.StatusCode
    payload: bytes = b""
    message: str = ""
    status_details: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def reason(self) -> str:
        """The google.rpc.ErrorInfo reason in the status details; "" when there is none."""
        if not self.status_details:
            return ""
        try:
            status = status_pb2.Status.FromString(self.status_details)
        except Exception:
            return ""
        for packed in status.details:
            if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                packed.Unpack(info)
                return str(info.reason)
        return ""

    def short(self) -> str:
        """The code and the reason alone: `FAILED_PRECONDITION ORDER_REFUNDED`, or `OK (57 bytes)`."""
        if self.ok:
            return f"OK ({len(self.payload)} bytes)"
        return f"{self.code.name} {self.reason}" if self.reason else f"{self.code.name} (no reason)"

    def describe(self) -> str:
        """One short phrase: `OK (57 bytes)` or `FAILED_PRECONDITION ORDER_REFUNDED: order o-1 was refunded`."""
        if self.ok:
            return f"OK ({len(self.payload)} bytes)"
        reason = f" {self.reason}" if self.reason else ""
        message = self.message if len(self.message) <= 120 else self.message[:120] + "..."
        return f"{self.code.name}{reason}: {message}" if message else f"{self.code.name}{reason}"


@dataclass(frozen=True)
class MethodDescription:
    """A method as the server's reflection describes it: its request and response message names."""

    input_type: str
    output_type: str


def _identity(payload: bytes) -> bytes:
    return payload


def _answer_of(error: grpc.RpcError) -> Answer:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else str(error)) or ""
    details = b""
    if isinstance(error, grpc.Call):
        for name, value in error.trailing_metadata() or ():
            if name == _STATUS_DETAILS_HEADER and isinstance(value, bytes):
                details = value
    return Answer(code, message=message, status_details=details)


class Caller:
    """One channel per target address; every call sends and receives raw bytes."""

    def __init__(self, targets: Mapping[str, str], timeout: float) -> None:
        self._addresses = dict(targets)
        self.timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}

    def connect(self, services: set[str]) -> None:
        """Open a channel to each service's target; TargetUnreachable when one accepts no connection in time."""
        for service in sorted(services):
            channel = self._channel(service)
            try:
                grpc.channel_ready_future(channel).result(timeout=self.timeout)
            except grpc.FutureTimeoutError:
                raise TargetUnreachable(service, self._addresses[service], self.timeout) from None

    def _channel(self, service: str) -> grpc.Channel:
        address = self._addresses[service]
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.insecure_channel(address)
            self._channels[address] = channel
        return channel

    def address(self, service: str) -> str:
        return self._addresses[service]

    def _method(self, service: str, path: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
        return self._channel(service).unary_unary(path, request_serializer=_identity, response_deserializer=_identity)

    def call(self, service: str, path: str, request: bytes, key: str) -> Answer:
        """One unary call with the idempotency key, the way the orchestrator sends it."""
        try:
            payload = self._method(service, path)(request, timeout=self.timeout, metadata=((IDEMPOTENCY_HEADER, key),))
        except grpc.RpcError as error:
            return _answer_of(error)
        return Answer(grpc.StatusCode.OK, payload=bytes(payload))

    def call_concurrently(self, service: str, path: str, request: bytes, key: str, count: int) -> list[Answer]:
        """count copies of one call, all in flight before the first answer is read."""
        method = self._method(service, path)
        metadata = ((IDEMPOTENCY_HEADER, key),)
        pending = [method.future(request, timeout=self.timeout, metadata=metadata) for _ in range(count)]
        answers = []
        for future in pending:
            try:
                answers.append(Answer(grpc.StatusCode.OK, payload=bytes(future.result())))
            except grpc.RpcError as error:
                answers.append(_answer_of(error))
        return answers

    def health(self, service: str, name: str) -> Answer:
        """grpc.health.v1 Check for name; the answer's payload is the HealthCheckResponse."""
        request = health_pb2.HealthCheckRequest(service=name).SerializeToString()
        try:
            payload = self._method(service, _HEALTH_CHECK)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            return _answer_of(error)
        return Answer(grpc.StatusCode.OK, payload=bytes(payload))

    def reflect(self, service: str, symbol: str) -> tuple[Answer, list[str], list[descriptor_pb2.FileDescriptorProto]]:
        """Server reflection: the services it lists, and the files that define symbol (with their imports)."""
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol),
        ]
        last = Answer(grpc.StatusCode.UNIMPLEMENTED)
        for path in _REFLECTION_METHODS:
            stream = self._channel(service).stream_stream(
                path,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            try:
                responses = list(stream(iter(requests), timeout=self.timeout))
            except grpc.RpcError as error:
                last = _answer_of(error)
                if last.code is grpc.StatusCode.UNIMPLEMENTED:
                    continue
                return last, [], []
            names: list[str] = []
            files: list[descriptor_pb2.FileDescriptorProto] = []
            for response in responses:
                if response.HasField("list_services_response"):
                    names += [listed.name for listed in response.list_services_response.service]
                elif response.HasField("file_descriptor_response"):
                    files += [
                        descriptor_pb2.FileDescriptorProto.FromString(raw)
                        for raw in response.file_descriptor_response.file_descriptor_proto
                    ]
                elif response.HasField("error_response"):
                    refused = response.error_response
                    return Answer(_code(refused.error_code), message=refused.error_message), names, files
            return Answer(grpc.StatusCode.OK), names, files
        return last, [], []

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def describe_method(files: list[descriptor_pb2.FileDescriptorProto], method_path: str) -> MethodDescription | None:
    """The method of `/package.Service/Method` as files define it; None when they do not."""
    service_name, _, method_name = method_path.lstrip("/").partition("/")
    for file in files:
        for service in file.service:
            full_name = f"{file.package}.{service.name}" if file.package else service.name
            if full_name != service_name:
                continue
            for method in service.method:
                if method.name == method_name:
                    return MethodDescription(method.input_type.lstrip("."), method.output_type.lstrip("."))
    return None


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
