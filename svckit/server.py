"""Server bootstrap shared by every process: the RPC wrapper, health, reflection and graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # grpc-stubs lacks the aio module
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from svckit.config import ServiceSettings
from svckit.errors import DomainError, InvalidArgument, MalformedRequest, RetryableError, status_from_error
from svckit.faults import FaultInjector, parse_faults
from svckit.idempotency_key import IDEMPOTENCY_HEADER
from svckit.metrics import MetricsServer, RpcMetrics, serve_metrics
from svckit.telemetry import configure_tracing, quiet_methods, server_interceptors, shutdown_tracing

__all__ = ["IDEMPOTENCY_HEADER", "CallContext", "CallObserver", "GrpcServer", "RequestGuard", "RpcServer", "rpc"]

_MAX_KEY_LENGTH = 200

log = logging.getLogger("sagasuite.rpc")

ServicerT = TypeVar("ServicerT")

if TYPE_CHECKING:
    # Generic only in the stubs (subscripting it at run time raises); the guard serves every method's messages.
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


@dataclass
class CallContext:
    """What a handler needs from its call besides the request (key, deadline) and what it reports back."""

    method: str
    idempotency_key: str
    deadline: float | None
    grpc_context: grpc.aio.ServicerContext[Any, Any]
    # Set by the handler when the idempotency store answered with a recorded response.
    replayed: bool = False


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


def _idempotency_key(context: grpc.aio.ServicerContext[Any, Any], required: bool) -> str:
    if _metadata_value(context, IDEMPOTENCY_HEADER + "-bin") is not None:
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, "must be printable ASCII text, not a binary header")
    raw = _metadata_value(context, IDEMPOTENCY_HEADER)
    if raw is None or raw == "":
        if required:
            raise InvalidArgument.of(IDEMPOTENCY_HEADER, "metadata header is required on this mutating call")
        return ""
    key = raw.decode() if isinstance(raw, bytes) else raw
    if len(key) > _MAX_KEY_LENGTH:
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, f"must be at most {_MAX_KEY_LENGTH} characters")
    if not key.isascii() or not key.isprintable():
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, "must be printable ASCII text")
    return key


CallObserver = Callable[[str, str, float, bool], None]
"""Told of every finished call: method, status code name, milliseconds, whether it was replayed."""


class RpcServer:
    """Per-server state the RPC wrapper uses: fault injection, call observers, whether calls are traced,
    which methods are polled (their successful calls are logged at DEBUG, not INFO).

    Every servicer whose methods rpc() wraps holds one as its `rpc_server` attribute, and the
    server's RequestGuard the same one, so two servers in one process share nothing.
    """

    def __init__(
        self, faults: FaultInjector | None = None, *, tracing: bool = False, quiet_methods: Iterable[str] = ()
    ) -> None:
        self.faults = faults if faults is not None else FaultInjector([])
        self.observers: list[CallObserver] = []
        self.tracing = tracing
        # Full names ("package.Service/Method"), and the short names of those the served services have:
        # rpc() knows its method by the short name only.
        self.quiet_methods = frozenset(name.lstrip("/") for name in quiet_methods)
        self.quiet: set[str] = set()

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> RpcServer:
        """FAULTS and QUIET_METHODS read, and tracing as the OTEL_* variables ask (set up here, once per process)."""
        return cls(
            FaultInjector(parse_faults(settings.faults)),
            tracing=configure_tracing(settings.service_name) is not None,
            quiet_methods=quiet_methods(),
        )

    def serving(self, service_name: str) -> None:
        """Note that a service (its full name) is served: its quiet methods are logged at DEBUG from now on."""
        prefix = service_name + "/"
        self.quiet.update(name.removeprefix(prefix) for name in self.quiet_methods if name.startswith(prefix))


def rpc(*, mutating: bool) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Wrap a servicer method: key check, faults, error conversion and one log line per call (at DEBUG for
    a successful call of a quiet method, see RpcServer).

    The wrapped method is called as method(self, request, call: CallContext) and returns the
    response; it raises DomainError or RetryableError for refusals, never a gRPC status. The
    servicer (self) holds the RpcServer it reports to as `rpc_server`.
    """

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        method = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            server: RpcServer = self.rpc_server
            key = ""
            replayed = False
            failure: grpc.Status | None = None
            try:
                key = _idempotency_key(context, required=mutating)
                if key and server.tracing:
                    # The server span the tracing interceptor opened around this call.
                    trace.get_current_span().set_attribute("idempotency.key", key)
                order_id = getattr(request, "order_id", "")
                await server.faults.before(method, key, order_id)
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                call = CallContext(method, key, deadline, context)
                response = await handler(self, request, call)
                replayed = call.replayed
                if replayed and server.tracing:
                    trace.get_current_span().set_attribute("idempotency.replayed", True)
                await server.faults.after(method, key, order_id)
            except (DomainError, RetryableError) as error:
                failure = status_from_error(error)
            except asyncio.CancelledError:
                log.info("method=%s key=%s code=CANCELLED", method, key or "-")
                raise
            except Exception:
                reference = uuid.uuid4().hex[:12]
                log.exception("method=%s key=%s code=INTERNAL ref=%s", method, key or "-", reference)
                failure = status_from_error(
                    RetryableError(f"internal error, reference {reference}", grpc.StatusCode.INTERNAL)
                )
            elapsed_ms = (time.perf_counter() - started) * 1000
            code_name = failure.code.name if failure else "OK"
            # A polled method's answers would drown the log; its refusals still say something.
            level = logging.DEBUG if failure is None and method in server.quiet else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "method=%s key=%s code=%s ms=%.1f%s",
                    method,
                    key or "-",
                    code_name,
                    elapsed_ms,
                    " replayed" if replayed else "",
                )
            for observer in server.observers:
                observer(method, code_name, elapsed_ms, replayed)
            if failure is not None:
                await context.abort(
                    failure.code,
                    failure.details,
                    trailing_metadata=failure.trailing_metadata,
                )
            return response

        return wrapper

    return decorate


class _Malformed:
    """What a guarded deserializer returns for bytes that are not a valid request message."""


_MALFORMED = _Malformed()


class RequestGuard(_ServerInterceptor):
    """Refuses request bytes that are not a valid message, and drops unknown fields from those that are.

    grpc decodes a request with the handler's deserializer before any servicer code runs, so a
    decoding failure (not protobuf at all, a truncated field, invalid UTF-8 in a string, groups
    nested past the parser's limit) would otherwise come back as UNKNOWN with an ERROR traceback
    from grpc itself. Here the deserializer of every method, health and reflection included,
    returns a marker instead, and the method answers it with INVALID_ARGUMENT (MalformedRequest).
    A decoded request loses its unknown fields, those of messages packed in its Any fields too, so
    nothing a client adds beyond the contract is ever stored, hashed or forwarded. Async handlers
    of all four kinds are guarded; a streaming request is checked message by message as the
    handler iterates it (a handler calling context.read() itself would see the marker).
    """

    def __init__(self, rpc_server: RpcServer) -> None:
        self._rpc_server = rpc_server
        # method path -> (the handler found, its guarded copy): a method's handler is built once.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # no such method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _guard(handler, method, self._rpc_server.observers)
        self._guarded[method] = (handler, guarded)
        return guarded


def _guard(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, observers: Sequence[CallObserver]
) -> grpc.RpcMethodHandler[Any, Any]:
    """handler with a deserializer that never raises and a behaviour that refuses what it could not decode."""
    behavior, factory = _behavior_and_factory(handler)
    deserializer = handler.request_deserializer
    if deserializer is None or not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        # Raw bytes cannot be malformed; a synchronous handler runs in grpc's thread pool, and none is served here.
        return handler
    assert behavior is not None  # checked just above
    handle: Callable[..., Any] = behavior
    message_name = _request_message_name(deserializer, method)
    decode = _tolerant(deserializer)

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await _refuse_malformed(context, method, message_name, observers)

    guarded: Callable[..., Any]
    if handler.request_streaming:

        async def checked(
            requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for request in requests:
                if request is _MALFORMED:
                    await refuse(context)
                yield request

        if inspect.isasyncgenfunction(behavior):

            async def guarded(
                requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with contextlib.aclosing(handle(checked(requests, context), context)) as responses:
                    async for response in responses:
                        yield response

        else:

            async def guarded(requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await handle(checked(requests, context), context)

    elif inspect.isasyncgenfunction(behavior):

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await refuse(context)
                return
            # aclosing: a cancelled or abandoned call closes the handler's generator at once.
            async with contextlib.aclosing(handle(request, context)) as responses:
                async for response in responses:
                    yield response

    else:

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is _MALFORMED:
                await refuse(context)
            return await handle(request, context)

    return factory(guarded, request_deserializer=decode, response_serializer=handler.response_serializer)


def _behavior_and_factory(
    handler: grpc.RpcMethodHandler[Any, Any],
) -> tuple[Callable[..., Any] | None, Callable[..., grpc.RpcMethodHandler[Any, Any]]]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """deserializer returning _MALFORMED where it would raise, and messages without unknown fields."""

    def decode(raw: bytes) -> Any:
        try:
            request = deserializer(raw)
        except (DecodeError, ValueError, RecursionError):
            # upb raises DecodeError for every kind; the pure-Python parser also these two.
            return _MALFORMED
        if isinstance(request, Message):
            _discard_unknown_fields(request)
        return request

    return decode


def _discard_unknown_fields(message: Message, depth: int = 0) -> None:
    """Drop message's unknown fields, nested ones included, and those of every message packed in an Any in it.

    DiscardUnknownFields() stops at an Any (its value is bytes), so a packed message known to this
    process is decoded, cleaned and packed again; one that does not decode is left for its handler
    to refuse when it unpacks it.
    """
    message.DiscardUnknownFields()
    if depth >= _MAX_ANY_DEPTH or not _holds_any(message.DESCRIPTOR):
        return
    for packed in _packed_messages(message):
        try:
            descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
            inner = message_factory.GetMessageClass(descriptor)()
            inner.ParseFromString(packed.value)
        except (KeyError, DecodeError, ValueError, RecursionError):
            continue
        _discard_unknown_fields(inner, depth + 1)
        if inner.ByteSize() != len(packed.value):
            packed.value = inner.SerializeToString(deterministic=True)


# An Any in a message packed in an Any... cleaned this many levels down; the parser's own nesting
# limit bounds what can arrive anyway.
_MAX_ANY_DEPTH = 8


@functools.cache
def _holds_any(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a google.protobuf.Any, at any depth (worked out once per type)."""
    seen: set[str] = set()
    pending = [descriptor]
    while pending:
        current = pending.pop()
        if current.full_name == any_pb2.Any.DESCRIPTOR.full_name:
            return True
        if current.full_name not in seen:
            seen.add(current.full_name)
            pending.extend(f.message_type for f in current.fields if f.message_type is not None)
    return False


def _packed_messages(message: Message) -> Iterator[any_pb2.Any]:
    """Every Any set in message, at any depth, map values included."""
    for field_descriptor, value in message.ListFields():
        field_type = field_descriptor.message_type
        if field_type is None or not _holds_any(field_type):
            continue
        if field_type.GetOptions().map_entry:
            if field_type.fields_by_name["value"].message_type is None:
                continue
            values = list(value.values())
        else:
            values = list(value) if field_descriptor.is_repeated else [value]
        for nested in values:
            if isinstance(nested, any_pb2.Any):
                yield nested
            else:
                yield from _packed_messages(nested)


def _request_message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    """The full name of the message deserializer decodes (generated ones are Message.FromString)."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    if descriptor is not None and hasattr(descriptor, "full_name"):
        return str(descriptor.full_name)
    service_name, _, method_name = method.lstrip("/").partition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
        return str(service.methods_by_name[method_name].input_type.full_name)
    except KeyError:
        return "request message"


async def _refuse_malformed(
    context: grpc.aio.ServicerContext[Any, Any], method: str, message_name: str, observers: Sequence[CallObserver]
) -> None:
    """Abort the call with INVALID_ARGUMENT; logged like any other refusal, at INFO, with no traceback."""
    short_name = method.rsplit("/", 1)[-1]
    log.info("method=%s key=- code=INVALID_ARGUMENT ms=0.0 request is not a valid %s", short_name, message_name)
    for observer in observers:
        observer(short_name, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0, False)
    failure = status_from_error(MalformedRequest(message_name))
    await context.abort(
        failure.code,
        failure.details,
        trailing_metadata=failure.trailing_metadata,
    )


class GrpcServer:
    """One process's gRPC server with health and reflection: bound when built, then started, waited on, stopped.

    Bound at once, so its port is known (PORT=0 binds a free one) before anything that names it is
    built. Every process's serve() uses it the same way, top to bottom:

        server = GrpcServer(settings, rpc_server)
        server.add_service(register, full_name)
        await server.start()
        try:
            await server.wait_for_stop_signal()
        finally:
            await server.stop_taking_calls()  # health says NOT_SERVING; leave discovery after it
            await server.stop()  # drain in-flight calls
    """

    def __init__(self, settings: ServiceSettings, rpc_server: RpcServer) -> None:
        self._settings = settings
        self._rpc_server = rpc_server
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        # The tracing interceptor goes first, so a refused malformed request still has its server span.
        self._server = grpc.aio.server(options=options, interceptors=[*server_interceptors(), RequestGuard(rpc_server)])
        self._health = health_aio.HealthServicer()
        self._service_names: list[str] = []
        self._stop_requested = asyncio.Event()
        self._metrics_server: MetricsServer | None = None
        self._started = False
        address = f"{settings.host}:{settings.port}"
        try:
            self.port = (
                self._server.add_secure_port(address, _server_credentials(settings))
                if settings.tls_cert_file
                else self._server.add_insecure_port(address)
            )
        except RuntimeError as error:
            raise SystemExit(f"configuration error: cannot listen on {address} (HOST, PORT): {error}") from None

    def add_service(self, register: Callable[[grpc.aio.Server], object], full_name: str) -> None:
        """Register a servicer (register adds it to the grpc server) under its full service name."""
        register(self._server)
        self._service_names.append(full_name)
        self._rpc_server.serving(full_name)

    async def start(self) -> None:
        """Serve: health SERVING, SIGTERM and SIGINT handled, metrics on METRICS_PORT, then READY printed."""
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*self._service_names, health_name, reflection.SERVICE_NAME], self._server)
        await self._server.start()
        self._started = True
        for name in [*self._service_names, ""]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested.set)
        log.info("serving %s on port %d", ",".join(self._service_names), self.port)
        if self._settings.metrics_port >= 0:
            self._rpc_server.observers.append(RpcMetrics(self._settings.service_name))
            self._metrics_server = serve_metrics(self._settings.host, self._settings.metrics_port)
            # Printed before READY, so whoever waits for READY finds the metrics port too.
            print(f"METRICS port={self._metrics_server.port}", flush=True)
        # Printed for the processes that start us: they read the bound port from this line.
        print(f"READY port={self.port}", flush=True)

    async def wait_for_stop_signal(self) -> None:
        """Return once SIGTERM or SIGINT arrives."""
        await self._stop_requested.wait()
        log.info("stopping: draining in-flight calls for up to %.1fs", self._settings.grace_seconds)

    async def stop_taking_calls(self) -> None:
        """Health answers NOT_SERVING from now on, so balancers move away before the drain."""
        await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Drain in-flight calls for up to GRACE_SECONDS, then close the metrics endpoint and flush traces."""
        await self._health.enter_graceful_shutdown()
        if self._started:
            await self._server.stop(self._settings.grace_seconds)
        if self._metrics_server is not None:
            self._metrics_server.close()
        shutdown_tracing()
        log.info("stopped")


def _server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    with open(settings.tls_key_file, "rb") as key_file, open(settings.tls_cert_file, "rb") as cert_file:
        key_and_cert = [(key_file.read(), cert_file.read())]
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as ca_file:
            return grpc.ssl_server_credentials(key_and_cert, ca_file.read(), require_client_auth=True)
    return grpc.ssl_server_credentials(key_and_cert)
