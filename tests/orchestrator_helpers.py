"""Helpers for tests that drive a real orchestrator stack: requests, clients, bounded polling and history views."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from devstack.audit import describe as render
from devstack.audit import status_name
from devstack.clients import Clients
from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb

__all__ = [
    "DEFINITIONS_MODULE",
    "OPERATOR_TOKEN",
    "YAML_SAGAS",
    "BearerAuth",
    "Clients",
    "connect",
    "definitions_env",
    "events",
    "fresh_postgres_database",
    "frozen",
    "ledger_kinds",
    "new_order_id",
    "order_request",
    "poll",
    "refused",
    "render",
    "start_stack",
    "status_name",
    "wait_for",
    "wait_until",
]

_T = TypeVar("_T")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS_MODULE = "tests.integration.saga_definitions_for_tests"
# Operator calls need a bearer token (orchestrator/auth.py): every test stack accepts this one, as "operator".
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
WAIT_SECONDS = 30.0


def new_order_id(prefix: str) -> str:
    """A fresh order id; the prefix lets a FAULTS rule (order_contains=...) pick the order out."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """An empty PostgreSQL database for a whole test module, dropped afterwards."""
    import sqlalchemy

    name = f"sagasuite_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# The suite's own YAML definitions: the order saga v1 and v2 and its fulfilment child.
YAML_SAGAS = REPO_ROOT / "orchestrator" / "sagas" / "yaml"


def definitions_env(*attributes: str) -> dict[str, str]:
    """Orchestrator environment that loads the named definitions of DEFINITIONS_MODULE besides its own."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": python_path, "SAGA_DEFINITIONS": ",".join(f"{DEFINITIONS_MODULE}:{a}" for a in attributes)}


def start_stack(
    data_dir: Path,
    *,
    faults: dict[str, str] | None = None,
    orchestrator_env: dict[str, str] | None = None,
    database_url: str = "",
) -> LocalStack:
    """A started local stack; faults maps a service name to its FAULTS spec; SQLite unless database_url."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    config = StackConfig(
        data_dir,
        orchestrator_database_url=database_url,
        service_env={name: {"FAULTS": spec} for name, spec in (faults or {}).items()},
        # PYTHONPATH lets the orchestrator import test definitions named in SAGA_DEFINITIONS.
        orchestrator_env={
            "PYTHONPATH": python_path,
            "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}",
            **(orchestrator_env or {}),
        },
    )
    return LocalStack(config).start()


@contextmanager
def frozen(process: ManagedProcess) -> Iterator[None]:
    """SIGSTOP a process for the block, SIGCONT after: a saga whose step calls it cannot move past
    that step until the block ends (the calls time out and are retried for about 20 s), however busy
    the machine is."""
    assert process.popen is not None and process.is_running(), f"{process.name} is not running"
    process.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.popen.send_signal(signal.SIGCONT)


# The bases are generic only in grpc-stubs (subscripting them at run time raises).
class BearerAuth(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer <token>` to every call of the channel it is installed on."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


@asynccontextmanager
async def connect(
    stack: LocalStack, token: str = OPERATOR_TOKEN, interceptors: Sequence[Any] = ()
) -> AsyncIterator[Clients]:
    """Clients of the stack, opened in the running test's event loop; orchestrator calls carry
    `token` and go through `interceptors` (a tracing client's, say)."""
    orchestrator_interceptors: list[Any] = [*interceptors, *([BearerAuth(token)] if token else [])]
    async with Clients.of(stack, orchestrator_interceptors=orchestrator_interceptors) as clients:
        yield clients


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def events(saga: pb.Saga, *types: str) -> list[tuple[str, str, str]]:
    """(type, step, code) of the history events, of the given types when any are named."""
    return [(e.type, e.step, e.code) for e in saga.history if not types or e.type in types]


def ledger_kinds(entries: Iterable[payment_pb.LedgerEntry]) -> list[str]:
    """Ledger entry kinds oldest first, as "CHARGE" / "REFUND"."""
    ordered = sorted(entries, key=lambda entry: entry.entry_id)
    return [payment_pb.LedgerEntryKind.Name(e.kind).removeprefix("LEDGER_ENTRY_KIND_") for e in ordered]


async def wait_for(
    clients: Clients,
    saga_id: str,
    condition: Callable[[pb.Saga], bool] | Iterable[str],
    *,
    within: float = WAIT_SECONDS,
) -> pb.Saga:
    """Poll GetSaga until condition holds (or the status is one of the named ones); fail with the history."""
    if callable(condition):
        check = condition
    else:
        wanted = set(condition)

        def check(saga: pb.Saga) -> bool:
            return status_name(saga.status) in wanted

    deadline = time.monotonic() + within
    while True:
        saga = await clients.saga(saga_id)
        if check(saga):
            return saga
        if time.monotonic() > deadline:
            orchestrator = clients.stack.orchestrator if clients.stack else None
            log = orchestrator.log_tail(15) if orchestrator else ""
            pytest.fail(f"saga did not reach the expected state in {within:.0f}s:\n{render(saga)}\n{log}")
        await asyncio.sleep(0.05)


def poll(what: str, condition: Callable[[], _T], *, within: float = WAIT_SECONDS) -> _T:
    """Call condition until it returns something true, and return that; fail naming what was awaited."""
    deadline = time.monotonic() + within
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f}s waiting for {what}")
        time.sleep(0.05)
    return value


async def wait_until(probe: Callable[[], Awaitable[bool]], what: str, *, within: float = WAIT_SECONDS) -> None:
    """Poll probe until it returns True; fail naming what was awaited."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)
