"""Operator calls need a bearer token: refusals leave sagas unchanged, granted calls are carried out and audited."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from devstack.launcher import ManagedProcess, ProcessFailed
from devstack.stack import LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import error_reason
from tests.orchestrator_helpers import (
    Clients,
    connect,
    frozen,
    ledger_kinds,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
    wait_until,
)

ALICE = "alice-token-0123456789abcdef"  # operator, from OPERATOR_TOKENS
APP = "app-token-0123456789abcdef"  # client role: may place orders and read, never operate
BOB = "bob-token-0123456789abcdef"  # operator, from OPERATOR_TOKENS_FILE
CAROL_OLD = "carol-old-token-0123456789"
CAROL_NEW = "carol-new-token-0123456789"
FAULTS = {
    "inventory": "ReserveStock:latency_ms=1000,order_contains=slow-",
    # Refused once, non-retryably: the saga needs attention until an operator retries it.
    "notify": "SendConfirmation:fail_first=1,code=FAILED_PRECONDITION,order_contains=confirm-once",
}
ENDED = ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")
OPERATIONS: dict[str, Callable[[pb_grpc.OrchestratorServiceAsyncStub, str, Any], Awaitable[Any]]] = {
    "retry": lambda stub, saga_id, md: stub.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id), metadata=md),
    "pause": lambda stub, saga_id, md: stub.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id), metadata=md),
    "resume": lambda stub, saga_id, md: stub.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id), metadata=md),
    "cancel": lambda stub, saga_id, md: stub.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id), metadata=md),
    "terminate": lambda stub, saga_id, md: stub.TerminateSaga(
        pb.TerminateSagaRequest(saga_id=saga_id, reason="fraud"), metadata=md
    ),
}


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def write_atomically(path: Path, text: str) -> None:
    """How a rotation should replace the file: write beside it, then rename over it."""
    staging = path.with_suffix(".new")
    staging.write_text(text)
    os.replace(staging, path)


def remove(path: Path) -> None:
    path.unlink()


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "operator-tokens"
    path.write_text(f"# name:token[:role]\nbob:{BOB}\ncarol:{CAROL_OLD}\n")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tokens_file: Path) -> Iterator[LocalStack]:
    running = start_stack(
        tmp_path_factory.mktemp("auth"),
        faults=FAULTS,
        orchestrator_env={
            "OPERATOR_TOKENS": f"alice:{ALICE},app:{APP}:client",
            "OPERATOR_TOKENS_FILE": str(tokens_file),
            "READ_ACCESS": "token",
            "PLACE_ORDER_ACCESS": "token",
        },
    )
    yield running
    running.stop()


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    """Alice's stubs, for setting sagas up and checking them."""
    async with connect(stack, token=ALICE) as connected:
        yield connected


@pytest.fixture
async def bare(stack: LocalStack) -> AsyncIterator[pb_grpc.OrchestratorServiceAsyncStub]:
    """A stub that sends only the metadata each call is given."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


def audit_lines(stack: LocalStack, saga_id: str) -> list[str]:
    assert stack.orchestrator is not None
    text = stack.orchestrator.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if " audit " in line and f"saga={saga_id} " in line]


async def wait_for_audit(stack: LocalStack, saga_id: str, pattern: str) -> None:
    async def logged() -> bool:
        return any(re.search(pattern, line) for line in audit_lines(stack, saga_id))

    await wait_until(logged, f"an audit line matching {pattern!r} for saga {saga_id}")


async def saga_needing_attention(clients: Clients) -> tuple[str, str]:
    order_id = new_order_id("confirm-once")
    saga_id = await clients.place(order_request(order_id))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "NEEDS_ATTENTION", render(saga)
    return order_id, saga_id


BAD_CREDENTIALS = {
    "no token": ((), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REQUIRED"),
    "wrong token": (bearer("not-a-token-0123456789abcdef"), grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    "token not in the file (yet)": (bearer(CAROL_NEW), grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    "not a bearer token": (
        (("authorization", f"Basic {ALICE}"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "MALFORMED_AUTHORIZATION",
    ),
    "empty bearer": ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED, "MALFORMED_AUTHORIZATION"),
    "client token": (bearer(APP), grpc.StatusCode.PERMISSION_DENIED, "OPERATOR_ROLE_REQUIRED"),
}


async def test_operator_calls_without_the_right_token_are_refused_and_change_nothing(
    stack: LocalStack, clients: Clients, bare: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    order_id, saga_id = await saga_needing_attention(clients)
    before = await clients.saga(saga_id)
    for credential, (metadata, code, reason) in BAD_CREDENTIALS.items():
        for operation, call in OPERATIONS.items():
            error = await refused(call(bare, saga_id, metadata))
            assert (error.code(), error_reason(error)) == (code, reason), f"{operation} with {credential}"
            # Refused before anything is looked up: the answer says nothing about the saga.
            assert saga_id not in (error.details() or "")
    # Every refusal is audited, and none of them touched the saga or its payment.
    await wait_for_audit(stack, saga_id, r"actor=app action=terminate .*outcome=refused code=PERMISSION_DENIED")
    refusals = [line for line in audit_lines(stack, saga_id) if "outcome=refused" in line]
    assert len(refusals) == len(BAD_CREDENTIALS) * len(OPERATIONS), "\n".join(refusals)
    assert any("actor=- action=retry" in line and "reason=TOKEN_REQUIRED" in line for line in refusals)
    after = await clients.saga(saga_id)
    assert after == before, render(after)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


async def test_the_right_token_carries_the_call_out_and_names_the_operator(
    stack: LocalStack, clients: Clients, bare: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    _, saga_id = await saga_needing_attention(clients)
    retried = await bare.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id), metadata=bearer(ALICE))
    assert status_name(retried.saga.status) in ("RUNNING", "COMPLETED")
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert [e.actor for e in saga.history if e.type == "SagaRetried"] == ["alice"], render(saga)
    await wait_for_audit(stack, saga_id, r"audit actor=alice action=retry saga=\S+ outcome=ok peer=")

    # A token from the file works as well; a granted call that the saga's state refuses is audited as failed.
    # Inventory is frozen: the saga cannot get past its first step before it is paused.
    with frozen(stack.services["inventory"]):
        slow_id = await clients.place(order_request(new_order_id("slow-auth")))
        paused = await bare.PauseSaga(pb.PauseSagaRequest(saga_id=slow_id, reason="incident 42"), metadata=bearer(BOB))
    assert status_name(paused.saga.status) == "PAUSED"
    error = await refused(bare.PauseSaga(pb.PauseSagaRequest(saga_id=slow_id), metadata=bearer(BOB)))
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_STATE_FOR_PAUSE")
    await bare.ResumeSaga(pb.ResumeSagaRequest(saga_id=slow_id), metadata=bearer(ALICE))
    saga = await wait_for(clients, slow_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    actors = {e.type: (e.actor, e.message) for e in saga.history if e.type in ("SagaPaused", "SagaResumed")}
    assert actors == {"SagaPaused": ("bob", "incident 42"), "SagaResumed": ("alice", "")}, render(saga)
    await wait_for_audit(stack, slow_id, r"actor=bob action=pause .*outcome=failed code=FAILED_PRECONDITION")
    outcomes = [re.search(r"actor=(\S+) action=(\S+) .*outcome=(\S+)", line) for line in audit_lines(stack, slow_id)]
    assert [m.groups() for m in outcomes if m] == [
        ("bob", "pause", "ok"),
        ("bob", "pause", "failed"),
        ("alice", "resume", "ok"),
    ]


async def test_a_rotated_tokens_file_takes_effect_without_a_restart(
    stack: LocalStack, tokens_file: Path, clients: Clients, bare: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    """Authenticated calls on a completed saga are refused by its state; unauthenticated ones earlier."""
    saga_id = await clients.place(order_request(new_order_id("rotate")))
    await wait_for(clients, saga_id, ("COMPLETED",))

    async def answer(token: str) -> str:
        error = await refused(bare.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id), metadata=bearer(token)))
        return error_reason(error)

    async def becomes(token: str, reason: str) -> None:
        async def check() -> bool:
            return await answer(token) == reason

        await wait_until(check, f"{reason} for a token after the file changed")

    accepted, rejected = "ILLEGAL_STATE_FOR_RESUME", "INVALID_TOKEN"
    assert await answer(CAROL_OLD) == accepted
    # Step 1 of a rotation: both tokens are valid while clients move over.
    write_atomically(tokens_file, f"bob:{BOB}\ncarol:{CAROL_OLD}\ncarol:{CAROL_NEW}\n")
    await becomes(CAROL_NEW, accepted)
    assert await answer(CAROL_OLD) == accepted
    # Step 2: the old token is removed, and refused from then on.
    write_atomically(tokens_file, f"bob:{BOB}\ncarol:{CAROL_NEW}\n")
    await becomes(CAROL_OLD, rejected)
    assert await answer(CAROL_NEW) == accepted
    # A botched edit keeps the tokens read last; a deleted file revokes its tokens.
    write_atomically(tokens_file, f"bob:{BOB}\ncarol:short\n")
    assert await answer(CAROL_NEW) == accepted
    # The file is looked at on every call: the one above saw the botched edit and kept the old tokens.
    assert stack.orchestrator is not None
    assert "was changed but is invalid, keeping the tokens read last" in stack.orchestrator.log_path.read_text()
    remove(tokens_file)
    await becomes(BOB, rejected)
    assert await answer(ALICE) == accepted  # OPERATOR_TOKENS are not affected
    write_atomically(tokens_file, f"bob:{BOB}\ncarol:{CAROL_OLD}\n")
    await becomes(BOB, accepted)


async def test_reads_and_orders_need_a_token_when_so_configured(
    clients: Clients, bare: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    order_id = new_order_id("needs-token")
    for metadata in ((), bearer("not-a-token-0123456789abcdef")):
        error = await refused(bare.PlaceOrder(order_request(order_id), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = await clients.orchestrator.ListSagas(pb.ListSagasRequest(business_key=order_id))
    assert list(listed.sagas) == []

    placed = await bare.PlaceOrder(order_request(order_id), metadata=bearer(APP))
    saga_id = placed.saga_id
    reads: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "GetSaga": lambda md: bare.GetSaga(pb.GetSagaRequest(saga_id=saga_id), metadata=md),
        "ListSagas": lambda md: bare.ListSagas(pb.ListSagasRequest(business_key=order_id), metadata=md),
        "GetSagaStats": lambda md: bare.GetSagaStats(pb.GetSagaStatsRequest(), metadata=md),
        "WatchSaga": lambda md: _first_event(bare.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id), metadata=md)),
    }
    for name, read in reads.items():
        error = await refused(read(()))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REQUIRED"), name
        assert await read(bearer(APP)), name
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)


async def _first_event(stream: Any) -> pb.WatchSagaResponse:
    async for response in stream:
        stream.cancel()
        return response  # type: ignore[no-any-return]
    raise AssertionError("the watch ended without an event")


def orchestrator_alone(tmp_path: Path, **env: str) -> ManagedProcess:
    """An orchestrator with no services behind it: enough for calls that are refused before any saga work."""
    addresses = {f"{name}_ADDR": "127.0.0.1:9" for name in ("INVENTORY", "PAYMENT", "SHIPPING", "NOTIFY")}
    process = ManagedProcess(
        "orchestrator", "orchestrator", {"PORT": "0", "DATA_DIR": str(tmp_path), **addresses, **env}, tmp_path
    )
    return process


async def test_without_any_token_configured_operator_calls_are_disabled(tmp_path: Path) -> None:
    process = orchestrator_alone(tmp_path).start()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            for operation, call in OPERATIONS.items():
                error = await refused(call(stub, "any-saga", bearer(ALICE)))
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, operation
                assert error_reason(error) == "OPERATOR_CALLS_DISABLED", operation
            # Reads and orders stay open by default.
            assert await stub.ListSagas(pb.ListSagasRequest()) is not None
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPERATOR_TOKENS": "alice:short"}, "OPERATOR_TOKENS entry 1 (alice): the token must be at least 16"),
        ({"OPERATOR_TOKENS_FILE": "/nonexistent/tokens"}, "OPERATOR_TOKENS_FILE='/nonexistent/tokens' cannot be read"),
    ],
)
def test_bad_access_settings_stop_the_orchestrator_at_start(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ProcessFailed) as failed:
        orchestrator_alone(tmp_path, **env).start()
    assert "configuration error" in str(failed.value)
    assert message in str(failed.value)
    assert "short" not in str(failed.value).replace(message, ""), "a configuration error must not print the token"
