"""A small synchronous client of the orchestrator for the CLI: address, bearer token, TLS and error classes."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from sagactl.settings import ClientConfig

__all__ = [
    "OPERATIONS",
    "STATUS_WORDS",
    "BadOption",
    "ClientError",
    "SagaClient",
    "check_address",
    "filter_request",
    "health_of",
    "parse_duration",
    "parse_statuses",
    "stamp_ago",
]

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_REFUSED = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
}

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

# Operator call name -> (RPC name, request type, whether the request takes a reason).
OPERATIONS: dict[str, tuple[str, Any, bool]] = {
    "retry": ("RetrySaga", pb.RetrySagaRequest, False),
    "pause": ("PauseSaga", pb.PauseSagaRequest, True),
    "resume": ("ResumeSaga", pb.ResumeSagaRequest, False),
    "cancel": ("CancelSaga", pb.CancelSagaRequest, True),
    "terminate": ("TerminateSaga", pb.TerminateSagaRequest, True),
}


# How many sagas of one business key resolve() looks at: the order's saga, its children, and sagas of other types.
_KEY_SAGAS_LOOKED_AT = 20

# The words --status takes, each naming the statuses it selects.
STATUS_WORDS: dict[str, list[int]] = {
    "running": [pb.SAGA_STATUS_RUNNING],
    "compensating": [pb.SAGA_STATUS_COMPENSATING],
    "paused": [pb.SAGA_STATUS_PAUSED],
    "completed": [pb.SAGA_STATUS_COMPLETED],
    "compensated": [pb.SAGA_STATUS_COMPENSATED],
    "needs_attention": [pb.SAGA_STATUS_NEEDS_ATTENTION],
    "attention": [pb.SAGA_STATUS_NEEDS_ATTENTION],
    "terminated": [pb.SAGA_STATUS_TERMINATED],
    "in_flight": [pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED],
    "ended": [pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED, pb.SAGA_STATUS_TERMINATED],
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BadOption(ValueError):
    """An option value the CLI cannot use, with the option it was given to."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.message = message
        self.option = option


def parse_duration(text: str, option: str) -> float:
    """Seconds in "90s", "10m", "1h30m", "2d"; BadOption otherwise."""
    compact = text.replace(" ", "").lower()
    if not compact or _DURATION.sub("", compact):
        raise BadOption(f"{text!r} is not a duration like 30s, 10m, 1h30m or 2d", option)
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION.findall(compact))


def parse_statuses(values: list[str] | None) -> list[int]:
    """The statuses the --status words select (repeated or separated by commas), in order, once each."""
    statuses: list[int] = []
    for value in values or []:
        for word in filter(None, (part.strip() for part in value.split(","))):
            key = word.lower().replace("-", "_").removeprefix("saga_status_")
            if key not in STATUS_WORDS:
                raise BadOption(f"unknown status {word!r}; use one of {', '.join(STATUS_WORDS)}", "--status")
            statuses += [s for s in STATUS_WORDS[key] if s not in statuses]
    return statuses


def stamp_ago(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() - seconds) * 1e9))
    return stamp


def filter_request(statuses: list[int], saga_type: str, order: str, since: str, older_than: str) -> pb.ListSagasRequest:
    """A ListSagasRequest for the filter options; BadOption for a duration it cannot read."""
    request = pb.ListSagasRequest(statuses=statuses, saga_type=saga_type, business_key=order)  # type: ignore[arg-type]
    if since:
        request.created_after.CopyFrom(stamp_ago(parse_duration(since, "--since")))
    if older_than:
        request.created_before.CopyFrom(stamp_ago(parse_duration(older_than, "--older-than")))
    return request


class ClientError(Exception):
    """A call that did not succeed, with the exit code the CLI ends with and a one-line message."""

    def __init__(self, message: str, exit_code: int, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code
        self.reason = reason


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _details(error: grpc.RpcError) -> tuple[str, str]:
    """The ErrorInfo reason (or the BadRequest fields) carried by a refusal, and its message."""
    # Imported here, as in health_of: a call that succeeds (saga ls --json) never loads them.
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    message = _one_line(error.details() or "")
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, message
    return "", message


def classify(error: grpc.RpcError, address: str, timeout: float | None) -> ClientError:
    """Turn a failed call into a ClientError: unreachable (3), refused (4) or failed (1)."""
    code = error.code()
    reason, message = _details(error)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout:g}s" if timeout else ""
        return ClientError(f"orchestrator at {address} did not answer{within}", EXIT_UNREACHABLE, code)
    if code in _UNREACHABLE:
        return ClientError(f"orchestrator at {address} is unreachable: {message}", EXIT_UNREACHABLE, code)
    label = f"{code.name} {reason}" if reason else code.name
    if code in _REFUSED:
        return ClientError(f"refused ({label}): {message}", EXIT_REFUSED, code, reason)
    return ClientError(f"call failed ({label}): {message}", EXIT_FAILED, code, reason)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read {what} {path}: {error.strerror}", EXIT_USAGE) from None


def _credentials(ca_file: str) -> grpc.ChannelCredentials:
    # An orchestrator that requires client certificates (mTLS) gets SAGA_CERT_FILE and SAGA_KEY_FILE.
    cert_file, key_file = os.environ.get("SAGA_CERT_FILE", ""), os.environ.get("SAGA_KEY_FILE", "")
    if bool(cert_file) != bool(key_file):
        raise ClientError("SAGA_CERT_FILE and SAGA_KEY_FILE go together: set both or neither", EXIT_USAGE)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA file"),
        private_key=_read(key_file, "key file") if key_file else None,
        certificate_chain=_read(cert_file, "certificate file") if cert_file else None,
    )


def open_channel(address: str, ca_file: str = "") -> grpc.Channel:
    if ca_file:
        return grpc.secure_channel(address, _credentials(ca_file))
    return grpc.insecure_channel(address)


def health_of(channel: grpc.Channel, timeout: float = 0.5) -> str:
    """The standard health status of a process ("SERVING", ...), or "NO ANSWER"."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError:
        return "NO ANSWER"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def check_address(address: str) -> None:
    """A ClientError (a usage error) for an address no channel can be opened to: blank, or with control characters."""
    # gRPC would report an empty target as UNKNOWN, and blanks or control characters as a failed lookup.
    where = f"the orchestrator address (--address or {ENV_ADDRESS})"
    if not address.strip():
        empty = "empty" if not address else "blank"
        raise ClientError(f"{where} is {empty}: expected host:port, e.g. {DEFAULT_ADDRESS}", EXIT_USAGE)
    position = next((index for index, character in enumerate(address) if not character.isprintable()), None)
    if position is not None:
        shown = repr(address[:40]) + ("..." if len(address) > 40 else "")
        raise ClientError(
            f"{where} {shown} has a control character at position {position}: expected host:port", EXIT_USAGE
        )


class SagaClient:
    """One channel to the orchestrator; every call sends the bearer token when one is set."""

    def __init__(self, config: ClientConfig) -> None:
        check_address(config.address)
        self.config = config
        self.channel = open_channel(config.address, config.ca_file)
        self.stub = pb_grpc.OrchestratorServiceStub(self.channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        timeout: float | None = None,
    ) -> ResponseT:
        """A unary call (a method of self.stub); failures become ClientError."""
        timeout = timeout or self.config.timeout
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise classify(error, self.config.address, timeout) from None

    # -- reading -------------------------------------------------------------------------------

    def get_saga(self, saga_id: str) -> pb.Saga:
        return self.call(self.stub.GetSaga, pb.GetSagaRequest(saga_id=saga_id)).saga

    def list_sagas(self, request: pb.ListSagasRequest) -> pb.ListSagasResponse:
        return self.call(self.stub.ListSagas, request)

    def list_all(self, request: pb.ListSagasRequest) -> Iterator[pb.Saga]:
        """Every saga the filter matches, newest first, page after page."""
        page = pb.ListSagasRequest()
        page.CopyFrom(request)
        while True:
            response = self.list_sagas(page)
            yield from response.sagas
            if not response.next_page_token:
                return
            page.page_token = response.next_page_token

    def list_page(self, request: pb.ListSagasRequest, *, all_pages: bool) -> tuple[list[pb.Saga], str]:
        """One page of sagas and the token of the next (or every page and no token)."""
        if all_pages:
            return list(self.list_all(request)), ""
        response = self.list_sagas(request)
        return list(response.sagas), response.next_page_token

    def stats(self, request: pb.GetSagaStatsRequest) -> pb.GetSagaStatsResponse:
        return self.call(self.stub.GetSagaStats, request)

    def definitions(self, name: str = "") -> list[pb.SagaDefinitionInfo]:
        """The definitions the orchestrator has loaded (of one name, when given), by name then version."""
        return list(self.call(self.stub.ListDefinitions, pb.ListDefinitionsRequest(name=name)).definitions)

    def resolve(self, reference: str) -> pb.Saga:
        """The saga with this id or, failing that, the one saga with this business key (order id) that no
        saga started as its child: an order id of OrderSaga v2 names the order's saga and its
        FulfilmentSaga child, and means the order's."""
        try:
            return self.get_saga(reference)
        except ClientError as error:
            if error.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise
            try:
                request = pb.ListSagasRequest(business_key=reference, page_size=_KEY_SAGAS_LOOKED_AT)
                found = list(self.list_sagas(request).sagas)
            except ClientError:
                raise error from None
            # A child whose parent has another key is the only saga of its own key: it is meant then.
            candidates = [saga for saga in found if not saga.parent_saga_id] or found
            if not candidates:
                raise error from None
            if len(candidates) > 1:
                named = ", ".join(f"{saga.saga_type} {saga.saga_id}" for saga in candidates)
                raise ClientError(
                    f"{reference!r} is the business key of {len(candidates)} sagas ({named}): give a saga id",
                    EXIT_USAGE,
                ) from None
            return self.get_saga(candidates[0].saga_id)

    def watch(self, saga_id: str, after_seq: int = 0, reconnect_seconds: float = 15.0) -> Iterator[Any]:
        """The saga's history events as they happen, until it ends or needs attention.

        A stream that breaks after it was open (an orchestrator restarting) is opened again from
        the last event seen, for up to reconnect_seconds; the first connection is not retried.
        """
        opened = False
        broken_since: float | None = None
        while True:
            stream = self.stub.WatchSaga(
                pb.WatchSagaRequest(saga_id=saga_id, after_seq=after_seq), metadata=self._metadata
            )
            try:
                for response in stream:
                    opened = True
                    broken_since = None
                    after_seq = response.event.seq
                    yield response
                return
            except grpc.RpcError as error:
                if not opened or error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise classify(error, self.config.address, None) from None
                broken_since = broken_since or time.monotonic()
                if time.monotonic() - broken_since > reconnect_seconds:
                    raise classify(error, self.config.address, None) from None
                time.sleep(0.5)
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() unannotated

    # -- writing -------------------------------------------------------------------------------

    def place_order(self, request: pb.PlaceOrderRequest) -> pb.PlaceOrderResponse:
        return self.call(self.stub.PlaceOrder, request)

    def start_saga(self, request: pb.StartSagaRequest) -> pb.StartSagaResponse:
        return self.call(self.stub.StartSaga, request)

    def decide(self, saga_id: str, step: str, *, approve: bool, reason: str) -> pb.DecideApprovalResponse:
        """Approve or reject the saga's approval step."""
        request = pb.DecideApprovalRequest(saga_id=saga_id, step=step, approve=approve, reason=reason)
        return self.call(self.stub.DecideApproval, request)

    def signal(self, request: pb.SignalSagaRequest) -> pb.SignalSagaResponse:
        return self.call(self.stub.SignalSaga, request)

    def operate(self, operation: str, saga_id: str, reason: str = "") -> pb.Saga:
        """Run an operator call (retry, pause, resume, cancel, terminate); returns the saga after it."""
        method, request_type, takes_reason = OPERATIONS[operation]
        request = request_type(saga_id=saga_id, reason=reason) if takes_reason else request_type(saga_id=saga_id)
        # Looked up by name, so the response type is not known here; every operator call's carries the saga.
        saga: pb.Saga = self.call(getattr(self.stub, method), request).saga
        return saga
