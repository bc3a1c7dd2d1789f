"""How the CLI names a saga and words a failure: short ids and prefixes resolved once, in sagactl.client; errors
as one line (JSON with --json); a batch refused its caller stops at once; the token hint speaks of SAGA_TOKEN."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from typer.testing import CliRunner

from sagactl import client as client_module
from sagactl.app import app
from sagactl.client import ClientError, SagaClient, classify
from sagactl.render import error_json
from sagactl.settings import EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE, ClientConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

ORDER = "3f2a9c0e5b1d4e7f8a9b0c1d2e3f4a5b"
TWIN = "3f2a9c0e77777777777777777777777a"
OTHER = "a29c8a7e9c384bf2a9c12cea556c98b2"
CHILD = "c0ffee00c0ffee00c0ffee00c0ffee00"
# An order whose id is hex, as numeric order ids are: it is also the start of a saga id.
HEX_ORDER = "a29c"
CLEAN_ENV = {"SAGA_ADDRESS": "127.0.0.1:9", "SAGA_TOKEN": None, "SAGA_CA_FILE": None, "COLUMNS": "80"}


def saga(saga_id: str, key: str, saga_type: str = "OrderSaga", parent: str = "") -> pb.Saga:
    return pb.Saga(saga_id=saga_id, business_key=key, saga_type=saga_type, parent_saga_id=parent)


SAGAS = [
    saga(ORDER, "ord-42"),
    saga(CHILD, "ord-42", "FulfilmentSaga", parent=ORDER),
    saga(TWIN, "ord-43"),
    saga(OTHER, "ord-44"),
]


class FakeClient(SagaClient):
    """A SagaClient whose ListSagas and GetSaga answer from a list, as the orchestrator does, and are counted."""

    def __init__(self, sagas: list[pb.Saga]) -> None:
        super().__init__(ClientConfig(address="127.0.0.1:9"))
        self.sagas = sagas
        self.lists: list[pb.ListSagasRequest] = []
        self.gets: list[str] = []

    def __enter__(self) -> FakeClient:
        return self

    def list_sagas(self, request: pb.ListSagasRequest) -> pb.ListSagasResponse:
        self.lists.append(request)
        found = [
            s
            for s in self.sagas
            if s.saga_id.startswith(request.saga_id_prefix)
            and (not request.business_key or s.business_key == request.business_key)
        ]
        size = request.page_size or 50
        return pb.ListSagasResponse(sagas=found[:size], next_page_token="more" if len(found) > size else "")

    def get_saga(self, saga_id: str) -> pb.Saga:
        self.gets.append(saga_id)
        found = next((s for s in self.sagas if s.saga_id == saga_id), None)
        if found is None:
            raise ClientError(f"refused (NOT_FOUND SAGA_NOT_FOUND): no saga {saga_id}", EXIT_REFUSED)
        return found


@pytest.fixture
def fake() -> Iterator[FakeClient]:
    with FakeClient(SAGAS) as found:
        yield found


def refusal(fake: FakeClient, reference: str) -> ClientError:
    with pytest.raises(ClientError) as raised:
        fake.resolve_id(reference)
    assert "\n" not in raised.value.message
    return raised.value


def test_a_whole_id_needs_no_lookup(fake: FakeClient) -> None:
    assert fake.resolve_id(ORDER) == ORDER
    assert fake.lists == [] and fake.gets == []
    assert fake.resolve(ORDER).business_key == "ord-42" and fake.gets == [ORDER]


def test_a_unique_start_of_an_id_names_its_saga_with_one_small_lookup(fake: FakeClient) -> None:
    assert fake.resolve_id("a29c8a7e") == OTHER
    assert fake.resolve_id("A29C8A7E9C38") == OTHER  # pasted in capitals
    prefix_lookups = [request for request in fake.lists if request.saga_id_prefix]
    assert [(r.saga_id_prefix, r.page_size) for r in prefix_lookups] == [("a29c8a7e", 2), ("a29c8a7e9c38", 2)]
    assert fake.resolve("3f2a9c0e5").saga_id == ORDER and fake.gets == [ORDER]


def test_a_start_no_id_has_is_not_found_naming_it(fake: FakeClient) -> None:
    error = refusal(fake, "deadbeef")
    assert (error.exit_code, error.code, error.reason) == (EXIT_REFUSED, grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")
    assert error.message == (
        "refused (NOT_FOUND SAGA_NOT_FOUND): no saga id starts with 'deadbeef', and no saga has the order id 'deadbeef'"
    )
    other = refusal(fake, "ord-99")
    assert other.code == grpc.StatusCode.NOT_FOUND and "no saga has the order id 'ord-99'" in other.message


def test_a_start_several_ids_share_is_ambiguous_and_names_a_few(fake: FakeClient) -> None:
    error = refusal(fake, "3f2a9c0e")
    assert (error.exit_code, error.code, error.reason) == (
        EXIT_REFUSED,
        grpc.StatusCode.INVALID_ARGUMENT,
        "SAGA_ID_AMBIGUOUS",
    )
    assert "ambiguous: 2 sagas start with '3f2a9c0e'; give more characters: " in error.message
    assert f"{ORDER} (OrderSaga, order ord-42), {TWIN} (OrderSaga, order ord-43)" in error.message
    # Only on the error path: a second lookup for a few more to name.
    assert [r.page_size for r in fake.lists if r.saga_id_prefix] == [2, 5]


def test_many_sagas_sharing_a_start_are_counted_as_at_least_the_few_looked_at() -> None:
    many = [saga(f"ab{index:030x}", f"ord-{index}") for index in range(7)]
    with FakeClient(many) as fake:
        error = refusal(fake, "ab")
    assert "ambiguous: 5 or more sagas start with 'ab'; give more characters: " in error.message
    assert error.message.endswith(", ...") and error.message.count("(OrderSaga, order") == 3


def test_an_order_id_names_the_order_s_saga_not_its_child(fake: FakeClient) -> None:
    assert fake.resolve_id("ord-42") == ORDER
    # Not hex: no id starts with it, so no prefix lookup is made.
    assert [(r.business_key, r.saga_id_prefix) for r in fake.lists] == [("ord-42", "")]


def test_a_hex_order_id_that_is_also_the_start_of_another_id_is_refused_not_guessed() -> None:
    with FakeClient([*SAGAS, saga("f" * 32, HEX_ORDER)]) as fake:
        error = refusal(fake, HEX_ORDER)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SAGA_REFERENCE_AMBIGUOUS")
        assert f"'{HEX_ORDER}' is the order id of saga {'f' * 32} (OrderSaga) and the start of other saga ids" in (
            error.message
        )
    with FakeClient([saga("f" * 32, HEX_ORDER)]) as fake:
        assert fake.resolve_id(HEX_ORDER) == "f" * 32


def test_an_order_id_of_several_top_level_sagas_is_a_usage_error() -> None:
    with FakeClient([saga(ORDER, "ord-7"), saga(OTHER, "ord-7", "LoyaltySaga")]) as fake:
        error = refusal(fake, "ord-7")
    assert error.exit_code == EXIT_USAGE and "is the business key of 2 sagas" in error.message


# -- how failures are worded ---------------------------------------------------------------------


class Refusal(grpc.RpcError):
    """A refused call as grpc raises it, with an ErrorInfo reason in its rich status."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        self._code, self._message = code, message
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="sagasuite"))
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_a_missing_token_is_told_as_a_cli_user_sets_one() -> None:
    sent = "this call needs a token: send metadata 'authorization: Bearer <token>'"
    error = classify(Refusal(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REQUIRED", sent), "127.0.0.1:9", 10)
    assert (
        error.message
        == "refused (UNAUTHENTICATED TOKEN_REQUIRED): this call needs a token: set SAGA_TOKEN (or --token)"
    )
    assert (error.exit_code, error.reason) == (EXIT_REFUSED, "TOKEN_REQUIRED")
    invalid = classify(
        Refusal(grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", "the bearer token is not valid"), "a", 1
    )
    assert invalid.message.endswith("the token is not valid: check SAGA_TOKEN (or --token)")
    # Other refusals keep the orchestrator's words.
    other = classify(Refusal(grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_STATE_FOR_PAUSE", "cannot pause"), "a", 1)
    assert other.message == "refused (FAILED_PRECONDITION ILLEGAL_STATE_FOR_PAUSE): cannot pause"


def test_a_json_error_is_one_line_with_code_reason_message_and_exit_code() -> None:
    line = error_json("refused (NOT_FOUND SAGA_NOT_FOUND): no saga x", EXIT_REFUSED, "NOT_FOUND", "SAGA_NOT_FOUND")
    assert "\n" not in line
    assert json.loads(line) == {
        "error": {
            "code": "NOT_FOUND",
            "reason": "SAGA_NOT_FOUND",
            "message": "refused (NOT_FOUND SAGA_NOT_FOUND): no saga x",
            "exit_code": EXIT_REFUSED,
        }
    }
    # Without a gRPC status, the code says what the exit code means.
    assert json.loads(error_json("cannot read CA file", EXIT_USAGE))["error"]["code"] == "USAGE"


@pytest.mark.parametrize(
    ("args", "reason", "words"),
    [
        (["ls", "--bogus"], "NO_SUCH_OPTION", "No such option: --bogus (see saga ls --help)"),
        (["ls", "--since", "5x"], "BAD_PARAMETER", "Invalid value for --since: '5x' is not a duration"),
        (
            ["ls", "--limit", "0"],
            "BAD_PARAMETER",
            "Invalid value for '--limit' / '-n': Input should be greater than or equal to 1",
        ),
        (["show"], "MISSING_PARAMETER", "Missing argument 'ID'. (see saga show --help)"),
        (["pause"], "BAD_PARAMETER", "give a saga ID, or filters"),
        (["terminate", "x"], "BAD_PARAMETER", "terminate needs --reason"),
        (["bogus"], "USAGE_ERROR", "No such command 'bogus'. (see saga --help)"),
    ],
)
def test_a_usage_error_is_one_line_and_with_json_one_line_of_json(args: list[str], reason: str, words: str) -> None:
    text = CliRunner().invoke(app, args, env=CLEAN_ENV)
    assert (text.exit_code, text.stdout) == (EXIT_USAGE, "")
    assert text.stderr.startswith("saga: error: ") and text.stderr.count("\n") == 1, text.stderr
    assert words in text.stderr and "╭" not in text.stderr
    as_json = CliRunner().invoke(app, [*args, "--json"], env=CLEAN_ENV)
    assert (as_json.exit_code, as_json.stdout, as_json.stderr.count("\n")) == (EXIT_USAGE, "", 1), as_json.stderr
    error = json.loads(as_json.stderr)["error"]
    assert (error["code"], error["reason"], error["exit_code"]) == ("USAGE", reason, EXIT_USAGE)
    assert words in error["message"]


def test_help_asked_for_by_no_arguments_stays_help() -> None:
    group = CliRunner().invoke(app, ["definitions"], env=CLEAN_ENV)
    assert group.exit_code == EXIT_USAGE and "saga definitions list" in group.stdout and "error" not in group.stderr


# -- a batch refused its caller ------------------------------------------------------------------


class RefusingClient(FakeClient):
    """Lists two sagas that need attention, and refuses every operator call: no token was sent."""

    operated: list[str]

    def __init__(self, config: ClientConfig) -> None:
        super().__init__([saga(ORDER, "ord-42"), saga(OTHER, "ord-44")])
        self.operated = RefusingClient.operated

    def operate(self, operation: str, saga_id: str, reason: str = "") -> pb.Saga:
        self.operated.append(saga_id)
        hint = "this call needs a token: set SAGA_TOKEN (or --token)"
        raise ClientError(
            f"refused (UNAUTHENTICATED TOKEN_REQUIRED): {hint}",
            EXIT_REFUSED,
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REQUIRED",
        )


@pytest.mark.parametrize("as_json", [False, True])
def test_a_batch_without_a_token_stops_at_the_first_refusal_with_exit_4(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    RefusingClient.operated = []
    monkeypatch.setattr(client_module, "SagaClient", RefusingClient)
    args = ["retry", "--status", "needs_attention", "--yes", *(["--json"] if as_json else [])]
    result = CliRunner().invoke(app, args, env=CLEAN_ENV)
    assert result.exit_code == EXIT_REFUSED and result.stdout == "", result.stdout
    assert RefusingClient.operated == [ORDER]
    assert result.stderr.count("\n") == 1, result.stderr
    message = json.loads(result.stderr)["error"]["message"] if as_json else result.stderr
    assert "set SAGA_TOKEN (or --token); retry of 2 saga(s) stopped at the first saga, nothing done" in message


def test_a_batch_refused_for_some_sagas_still_reports_each(monkeypatch: pytest.MonkeyPatch) -> None:
    class StateRefusing(RefusingClient):
        def operate(self, operation: str, saga_id: str, reason: str = "") -> pb.Saga:
            self.operated.append(saga_id)
            code = grpc.StatusCode.FAILED_PRECONDITION
            raise ClientError("refused (FAILED_PRECONDITION ILLEGAL_STATE_FOR_RETRY): no", EXIT_REFUSED, code)

    RefusingClient.operated = []
    monkeypatch.setattr(client_module, "SagaClient", StateRefusing)
    result = CliRunner().invoke(app, ["retry", "--all", "--yes"], env=CLEAN_ENV)
    assert result.exit_code == EXIT_FAILED and RefusingClient.operated == [ORDER, OTHER]
    assert "retry: 0 done, 2 refused" in result.stdout
