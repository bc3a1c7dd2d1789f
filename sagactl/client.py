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
    "AUTH_REFUSALS",
    "OPERATIONS",
    "STATUS_WORDS",
    "BadOption",
    "ClientError",
    "SagaClient",
    "check_address",
    "filter_request",
    "health_of",
    "is_full_id",
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

# Refusals of the caller rather than of the saga: a batch stops at the first one.
AUTH_REFUSALS = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}

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
# A saga id is a uuid4 in 32 lowercase hex characters; any shorter run of hex characters may be the start of one.
_FULL_ID = re.compile(r"[0-9a-f]{32}")
_ID_PREFIX = re.compile(r"[0-9a-fA-F]{1,31}")
# How many sagas an ambiguous prefix is looked up for, and how many of them its error names.
_AMBIGUOUS_LOOKED_AT = 5
_AMBIGUOUS_NAMED = 3
# The orchestrator's hints name the gRPC header; a CLI user sets a variable or an option instead.
_CLI_HINTS = {
    "TOKEN_REQUIRED": "this call needs a token: set SAGA_TOKEN (or --token)",
    "INVALID_TOKEN": "the token is not valid: check SAGA_TOKEN (or --token)",
}

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


def is_full_id(reference: str) -> bool:
    """Whether reference is a whole saga id (32 lowercase hex characters), which needs no lookup."""
    return _FULL_ID.fullmatch(reference) is not None


class ClientError(Exception):
    """A call that did not succeed, with the exit code the CLI ends with and a one-line message."""

    def __init__(self, message: str, exit_code: int, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code
        self.reason = reason

    @property
    def code_name(self) -> str:
        """The gRPC status code's name ("NOT_FOUND"); "" for an error of the CLI's own (an unreadable file)."""
        return self.code.name if self.code is not None else ""


def _refused(code: grpc.StatusCode, reason: str, text: str) -> ClientError:
    """A refusal the CLI words itself, in the form of the orchestrator's (exit 4)."""
    return ClientError(f"refused ({code.name} {reason}): {text}", EXIT_REFUSED, code, reason)


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
    message = _CLI_HINTS.get(reason, message)
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
        """The saga (as GetSaga returns it) a reference names: see resolve_id."""
        return self.get_saga(self.resolve_id(reference))

    def resolve_id(self, reference: str) -> str:
        """The id of the saga a reference names: a whole id as it is (no lookup), else the one saga whose id
        starts with it, or the one saga with it as business key (order id) that no saga started as its child.

        An order id of OrderSaga v2 names the order's saga and its FulfilmentSaga child, and means the
        order's. A run of hex characters may be both the start of an id and an order id (an order 1001):
        both are looked up, and when they name different sagas it is refused rather than guessed.
        """
        if is_full_id(reference):
            return reference
        by_key = self._by_key(reference)
        if not _ID_PREFIX.fullmatch(reference):
            if by_key is None:
                text = f"no saga has the order id {reference!r}, and it is not the start of a saga id (hex characters)"
                raise _refused(grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND", text)
            return by_key.saga_id
        prefix = reference.lower()
        starting = list(self.list_sagas(pb.ListSagasRequest(saga_id_prefix=prefix, page_size=2)).sagas)
        if by_key is not None and any(saga.saga_id != by_key.saga_id for saga in starting):
            raise _refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "SAGA_REFERENCE_AMBIGUOUS",
                f"ambiguous: {reference!r} is the order id of saga {by_key.saga_id} ({by_key.saga_type}) and the "
                "start of other saga ids; give the saga id",
            )
        if by_key is not None:
            return by_key.saga_id
        if not starting:
            text = f"no saga id starts with {prefix!r}, and no saga has the order id {reference!r}"
            raise _refused(grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND", text)
        if len(starting) == 1:
            return starting[0].saga_id
        # Only now: a few more of them, to name some so that the next try can tell them apart.
        page = self.list_sagas(pb.ListSagasRequest(saga_id_prefix=prefix, page_size=_AMBIGUOUS_LOOKED_AT))
        count = f"{len(page.sagas)} or more" if page.next_page_token else str(len(page.sagas))
        named = [f"{saga.saga_id} ({saga.saga_type}, order {saga.business_key})" for saga in page.sagas]
        if len(named) > _AMBIGUOUS_NAMED or page.next_page_token:
            named = [*named[:_AMBIGUOUS_NAMED], "..."]
        raise _refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            "SAGA_ID_AMBIGUOUS",
            f"ambiguous: {count} sagas start with {prefix!r}; give more characters: {', '.join(named)}",
        )

    def _by_key(self, business_key: str) -> pb.Saga | None:
        """The one saga of this business key that no saga started; None when there is none."""
        try:
            request = pb.ListSagasRequest(business_key=business_key, page_size=_KEY_SAGAS_LOOKED_AT)
            found = list(self.list_sagas(request).sagas)
        except ClientError as error:
            # A reference no business key can be (too long, a control character) names no saga by key.
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                return None
            raise
        # A child whose parent has another key is the only saga of its own key: it is meant then.
        candidates = [saga for saga in found if not saga.parent_saga_id] or found
        if len(candidates) > 1:
            named = ", ".join(f"{saga.saga_type} {saga.saga_id}" for saga in candidates)
            raise ClientError(
                f"{business_key!r} is the business key of {len(candidates)} sagas ({named}): give a saga id",
                EXIT_USAGE,
            )
        return candidates[0] if candidates else None

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
