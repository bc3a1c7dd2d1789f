"""Hostile requests generated from the contracts, sent to every RPC of all five real servers on SQLite and PostgreSQL.

Each must get a proper answer or a proper refusal, and leave nothing behind. How much runs:
SAGASUITE_FUZZ_PROFILE=ci (the default: 36 examples per RPC, the same ones every run) or =long (800 per RPC,
new ones each run); SAGASUITE_FUZZ_EXAMPLES=N sets the examples per RPC, SAGASUITE_FUZZ_SEED=S repeats the
examples of a long run, and SAGASUITE_FUZZ_REPORT=<file> appends every finding to the file as markdown.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from devstack.orders import DEMO_ADDRESS
from devstack.stack import SERVICES, LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import LineItem, Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2 as notify_pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
from svckit.config import ServiceSettings
from tests import hostile
from tests.orchestrator_helpers import OPERATOR_TOKEN, REPO_ROOT, fresh_postgres_database, order_request

# -- how much to run -----------------------------------------------------------------------------

# Examples per RPC by kind: one-field mutations of a valid request, random messages, malformed bytes.
_PROFILES = {
    "ci": {"mutation": 24, "random": 7, "malformed": 5},
    "long": {"mutation": 400, "random": 250, "malformed": 150},
}
PROFILE = os.environ.get("SAGASUITE_FUZZ_PROFILE", "ci")
if PROFILE not in _PROFILES:
    raise ValueError(f"SAGASUITE_FUZZ_PROFILE must be one of {', '.join(_PROFILES)}, not {PROFILE!r}")
MIX = dict(_PROFILES[PROFILE])
if os.environ.get("SAGASUITE_FUZZ_EXAMPLES"):
    total = int(os.environ["SAGASUITE_FUZZ_EXAMPLES"])
    MIX = {kind: max(1, total * share // sum(MIX.values())) for kind, share in MIX.items()}
SEED = os.environ.get("SAGASUITE_FUZZ_SEED", "")
REPORT_FILE = os.environ.get("SAGASUITE_FUZZ_REPORT", "")


def _fuzz_settings(examples: int) -> settings:
    # Examples are judged and collected, never raised, so there is nothing to shrink; CI runs the same
    # examples every time (derandomize), a long run explores new ones unless a seed is given.
    return settings(
        max_examples=examples,
        derandomize=PROFILE == "ci" and not SEED,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
        print_blob=False,
    )


# -- what is allowed -----------------------------------------------------------------------------

CALL_SECONDS = 30.0
WAIT_SECONDS = 60.0
METADATA_LIMIT = 8 * 1024
# The servers' own message size limit: grpc refuses a larger request before any handler runs,
# with RESOURCE_EXHAUSTED and no details; that refusal is the transport's, not ours to enrich.
MAX_MESSAGE_BYTES = int(ServiceSettings.model_fields["max_message_bytes"].default)
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
WITH_REASON = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
APP_TOKEN = "app-token-for-fuzz-0123456789"  # a client-role token: may start and read, never operate
# Paused sagas that operator calls aim at half the time, so they get past the saga's state check.
HELD_PREFIX = "fz-held"
HELD_SAGAS = 12
HELD_DEADLINE_SECONDS = 7 * 24 * 3600
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Far above the 8 KiB the test allows, so an oversized refusal arrives and can be measured.
    ("grpc.max_metadata_size", 4 * 1024 * 1024),
    ("grpc.absolute_max_metadata_size", 4 * 1024 * 1024),
]


# Call metadata as sent: (key, value) pairs, bytes for -bin keys.
Metadata = list[tuple[str, str | bytes]]


@dataclass(frozen=True)
class Rpc:
    """One method of one served contract, and the stack process that serves it."""

    method: MethodDescriptor
    # A second way to call the same method, fuzzed as a case of its own with its own base request
    # (StartSaga's input as input_struct or input_json beside the packed Any); "" for the method itself.
    variant: str = ""

    @property
    def process(self) -> str:
        # sagasuite.<process>.v1.<Service>: the package names the process.
        return self.method.containing_service.full_name.split(".")[1]

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return f"{self.process}.{self.method.name}"

    @property
    def case(self) -> str:
        """The method's name and its variant: what bases, regressions, findings and test ids go by."""
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)


def _rpcs() -> list[Rpc]:
    methods = hostile.contract_rpcs()
    start = next(m for m in methods if m.full_name == "sagasuite.orchestrator.v1.OrchestratorService.StartSaga")
    return [Rpc(method) for method in methods] + [Rpc(start, "input_struct"), Rpc(start, "input_json")]


RPCS = _rpcs()


# -- findings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One way an RPC broke the bad-input promise, with the smallest request seen that shows it."""

    rpc: str
    what: str
    got: str
    request: str = ""
    note: str = ""
    size: int = 0

    def group(self) -> tuple[str, str, str]:
        # Digits and long values vary between examples of one class: group on the shape of the answer.
        return self.rpc, self.what, re.sub(r"[0-9a-f]{6,}|\d+", "#", self.got)[:90]


@dataclass
class Findings:
    """Findings grouped by class, each with a count and the smallest example."""

    smallest: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, finding: Finding) -> None:
        key = finding.group()
        self.counts[key] += 1
        if key not in self.smallest or finding.size < self.smallest[key].size:
            self.smallest[key] = finding

    def __bool__(self) -> bool:
        return bool(self.smallest)

    def report(self, backend: str) -> str:
        lines = []
        for key, finding in sorted(self.smallest.items()):
            lines.append(
                f"- [{backend}] {finding.rpc}: {finding.what} (x{self.counts[key]})\n"
                f"  - got: {finding.got}\n"
                + (f"  - request: {finding.note}\n    `{finding.request}`\n" if finding.request or finding.note else "")
            )
        return "".join(lines)


def _write_report(text: str) -> None:
    if REPORT_FILE and text:
        with open(REPORT_FILE, "a", encoding="utf-8") as report:
            report.write(text)


# -- the stack -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one call answered."""

    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str | bytes], ...]
    status: status_pb2.Status | None = None
    status_error: str = ""
    responses: list[bytes] = field(default_factory=list)


@dataclass
class Target:
    """A running stack under fuzz: channels, the saga operator calls aim at, and what was accepted."""

    backend: str
    stack: LocalStack
    channels: dict[str, grpc.Channel]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    counter: Iterator[int] = field(default_factory=itertools.count)
    ended_saga_id: str = ""
    ended_order_id: str = ""
    held: list[str] = field(default_factory=list)
    bases: dict[str, hostile.Base] = field(default_factory=dict)
    base_refusals: dict[str, str] = field(default_factory=dict)
    mutating: set[str] = field(default_factory=set)
    accepted_sagas: set[str] = field(default_factory=set)
    report: list[str] = field(default_factory=list)

    def fresh(self, prefix: str = "fz") -> str:
        return f"{prefix}-{self.run}-{next(self.counter)}"

    def release(self, saga_id: str) -> None:
        """An operator call on a held saga went through: it is no longer quiet."""
        if saga_id in self.held:
            self.held.remove(saga_id)

    def histories(self, rpc: Rpc) -> dict[str, int]:
        """History lengths of the quiet sagas an RPC's requests aim at: the ended one, and for an operator
        call the held ones too."""
        quiet = [self.ended_saga_id, *(self.held if rpc.name in _OPERATIONS else [])]
        return {saga_id: len(self.saga(saga_id).history) for saga_id in quiet}

    def base(self, rpc: Rpc) -> hostile.Base | None:
        """The RPC's base request; for an RPC this suite does not know, an empty request with its id-like
        fields filled in (or none when it has no such field)."""
        if rpc.case in self.bases:
            return self.bases[rpc.case]
        fields = rpc.method.input_type.fields_by_name
        keyed = [name for name in ("order_id", "business_key") if name in fields]
        if not keyed and "saga_id" not in fields:
            return None

        def generic() -> tuple[Message, str]:
            message = hostile.message_class(rpc.method.input_type)()
            key = self.fresh()
            for name in keyed:
                setattr(message, name, key)
            if "saga_id" in fields:
                message.saga_id = self.ended_saga_id  # type: ignore[attr-defined]
            return message, key if keyed else ""

        return generic

    def auth(self) -> Metadata:
        return [("authorization", f"Bearer {OPERATOR_TOKEN}")]

    def call(self, rpc: Rpc, wire: bytes, metadata: Metadata) -> Outcome:
        channel = self.channels[rpc.process]
        call: Any
        try:
            if rpc.streaming:
                stream = channel.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)
                call = stream(wire, metadata=tuple(metadata), timeout=CALL_SECONDS)
                responses = list(call)
                return Outcome(grpc.StatusCode.OK, "", tuple(call.trailing_metadata() or ()), responses=responses)
            unary = channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)
            response, call = unary.with_call(wire, metadata=tuple(metadata), timeout=CALL_SECONDS)
            return Outcome(grpc.StatusCode.OK, "", tuple(call.trailing_metadata() or ()), responses=[response])
        except grpc.RpcError as failed:
            error: Any = failed
            outcome = Outcome(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
            try:
                outcome.status = rpc_status.from_call(error)
            except ValueError as mismatch:
                outcome.status_error = str(mismatch)[:200]
            return outcome

    def stub(self, process: str) -> Any:
        stubs = {
            "orchestrator": pb_grpc.OrchestratorServiceStub,
            "inventory": inventory_grpc.InventoryServiceStub,
            "payment": payment_grpc.PaymentServiceStub,
            "shipping": shipping_grpc.ShippingServiceStub,
            "notify": notify_grpc.NotifyServiceStub,
        }
        return stubs[process](self.channels[process])

    def log_sizes(self) -> dict[str, int]:
        return {name: _size(process.log_path) for name, process in self.stack.processes().items()}

    def new_log_text(self, since: dict[str, int]) -> dict[str, str]:
        texts = {}
        for name, process in self.stack.processes().items():
            with open(process.log_path, "rb") as log:
                log.seek(since.get(name, 0))
                texts[name] = log.read().decode(errors="replace")
        return texts

    def saga_count(self) -> int:
        """How many sagas the orchestrator holds, from its stats (one small call, however many there are)."""
        stats = self.stub("orchestrator").GetSagaStats(
            pb.GetSagaStatsRequest(), metadata=self.auth(), timeout=CALL_SECONDS
        )
        return sum(count.count for count in stats.counts)

    def saga(self, saga_id: str) -> pb.Saga:
        request = pb.GetSagaRequest(saga_id=saga_id)
        saga: pb.Saga = self.stub("orchestrator").GetSaga(request, metadata=self.auth(), timeout=CALL_SECONDS).saga
        return saga

    def wait_ended(self, saga_id: str, within: float = WAIT_SECONDS) -> pb.Saga:
        """The saga once it has ended (or needs attention), or as it stands after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            saga = self.saga(saga_id)
            if saga.status not in (pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED):
                return saga
            if time.monotonic() > deadline:
                return saga
            time.sleep(0.05)

    def not_serving(self) -> list[str]:
        broken = []
        for name, channel in self.channels.items():
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=CALL_SECONDS
                )
                if answer.status != health_pb2.HealthCheckResponse.SERVING:
                    broken.append(f"{name}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}")
            except grpc.RpcError as error:
                broken.append(f"{name}: health check {error.code().name}")
            if not self.stack.processes()[name].is_running():
                broken.append(f"{name}: process exited")
        return broken


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _start_stack(data_dir: Path, database_urls: dict[str, str]) -> LocalStack:
    """The whole stack with operator tokens on (reads and starts need a token too), on the given databases."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    orchestrator_env = {
        "PYTHONPATH": python_path,
        "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN},app:{APP_TOKEN}:client",
        "READ_ACCESS": "token",
        "PLACE_ORDER_ACCESS": "token",
    }
    service_env: dict[str, dict[str, str]] = {name: {} for name in SERVICES}
    for name, url in database_urls.items():
        if name in SERVICES:
            service_env[name]["DATABASE_URL"] = url
    # Held orders take a while to reserve, long enough to be paused while the call is in flight.
    service_env["inventory"]["FAULTS"] = f"ReserveStock:latency_ms=1500,order_contains={HELD_PREFIX}"
    config = StackConfig(
        data_dir,
        orchestrator_database_url=database_urls.get("orchestrator", ""),
        service_env=service_env,
        orchestrator_env=orchestrator_env,
    )
    return LocalStack(config).start()


def _stop(stack: LocalStack) -> None:
    """The orchestrator first, then every service at once: a graceful stop takes a second or two each."""
    if stack.orchestrator is not None:
        stack.orchestrator.stop()
    for process in stack.services.values():
        if process.popen is not None and process.is_running():
            process.popen.send_signal(signal.SIGTERM)
    stack.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One stack per backend for the whole module: every process on SQLite files, or each on its own
    PostgreSQL database."""
    with ExitStack() as cleanup:
        urls: dict[str, str] = {}
        if request.param == "postgresql":
            admin_url = request.getfixturevalue("postgres_admin_url")
            urls = {
                name: cleanup.enter_context(fresh_postgres_database(admin_url)) for name in [*SERVICES, "orchestrator"]
            }
        stack = _start_stack(tmp_path_factory.mktemp(f"fuzz-{request.param}"), urls)
        cleanup.callback(_stop, stack)
        channels = {
            name: grpc.insecure_channel(p.address, options=CHANNEL_OPTIONS) for name, p in stack.processes().items()
        }
        for channel in channels.values():
            cleanup.callback(channel.close)
        running = Target(request.param, stack, channels)
        _prepare(running)
        yield running
        _write_report("".join(running.report))


def _prepare(target: Target) -> None:
    """A saga that has ended, for reads and operator calls to aim at; the base requests, each tried once as it
    is (which tells the RPCs that need an idempotency key)."""
    order_id = target.fresh("fz-ended")
    placed = target.stub("orchestrator").PlaceOrder(
        order_request(order_id), metadata=target.auth(), timeout=CALL_SECONDS
    )
    saga = target.wait_ended(placed.saga_id)
    assert saga.status == pb.SAGA_STATUS_COMPLETED, f"the seed order did not complete: {saga}"
    target.ended_saga_id, target.ended_order_id = placed.saga_id, order_id
    target.held = _held_sagas(target)
    target.bases = _bases(target)
    for rpc in RPCS:
        base = target.base(rpc)
        if base is None:
            continue
        metadata = target.auth() if rpc.process == "orchestrator" else []
        message = base()[0]
        outcome = target.call(rpc, message.SerializeToString(), metadata)
        if outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "idempotency-key" in _fields(outcome):
            target.mutating.add(rpc.name)
            keyed = [*metadata, ("idempotency-key", target.fresh("key"))]
            message = base()[0]
            outcome = target.call(rpc, message.SerializeToString(), keyed)
        # Operator calls on an ended saga are refused by the saga's state; everything else must go through.
        if outcome.code not in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION):
            target.base_refusals[rpc.case] = _got(outcome)
        if outcome.code == grpc.StatusCode.OK and rpc.name in _STARTS:
            target.accepted_sagas.add(_started_saga_id(rpc, outcome))
        if outcome.code == grpc.StatusCode.OK and rpc.name in _OPERATIONS:
            target.release(getattr(message, "saga_id", ""))


def _held_sagas(target: Target) -> list[str]:
    """Orders paused while their first call is in flight, once that call has finished: quiet, paused sagas."""
    stub, held = target.stub("orchestrator"), []
    for _ in range(HELD_SAGAS):
        request = order_request(target.fresh(HELD_PREFIX), deadline_seconds=HELD_DEADLINE_SECONDS)
        saga_id = stub.PlaceOrder(request, metadata=target.auth(), timeout=CALL_SECONDS).saga_id
        try:
            pause = pb.PauseSagaRequest(saga_id=saga_id, reason="held")
            stub.PauseSaga(pause, metadata=target.auth(), timeout=CALL_SECONDS)
            held.append(saga_id)
        except grpc.RpcError:
            continue  # it ended before the pause came (a very busy machine): one fewer held saga
    assert held, "no saga could be held"
    deadline = time.monotonic() + WAIT_SECONDS
    for saga_id in held:
        while True:
            saga = target.saga(saga_id)
            attempts = [attempt for step in saga.steps for attempt in step.attempts]
            # Paused, and the call that was in flight has its outcome: nothing more happens to it.
            if saga.status == pb.SAGA_STATUS_PAUSED and attempts and all(a.HasField("ended_at") for a in attempts):
                break
            assert time.monotonic() < deadline, f"held saga {saga_id} did not come to rest: {saga}"
            time.sleep(0.05)
    return held


# -- base requests -------------------------------------------------------------------------------


def _summary() -> notify_pb.OrderSummary:
    return notify_pb.OrderSummary(
        items=[LineItem(sku="TEE-007", quantity=1)],
        amount=Money(currency_code="USD", minor_units=1999),
        tracking_number="TRK-0001",
    )


def _bases(target: Target) -> dict[str, hostile.Base]:
    """A valid request for each RPC, with a fresh business key each time one is made where the RPC takes one."""
    ended_saga, ended_order = target.ended_saga_id, target.ended_order_id
    lines = [LineItem(sku="TEE-007", quantity=1)]

    def place_order() -> tuple[Message, str]:
        key = target.fresh()
        return order_request(key, items=[("TEE-007", 1)]), key

    def start_saga() -> tuple[Message, str]:
        key = target.fresh()
        packed = any_pb2.Any()
        packed.Pack(order_request(key, items=[("TEE-007", 1)]))
        return pb.StartSagaRequest(saga_type="OrderSaga", business_key=key, input=packed), key

    def start_saga_struct() -> tuple[Message, str]:
        key = target.fresh()
        struct = struct_pb2.Struct()
        struct.update(json_format.MessageToDict(order_request(key, items=[("TEE-007", 1)])))
        return pb.StartSagaRequest(saga_type="OrderSaga", business_key=key, input_struct=struct), key

    def start_saga_json() -> tuple[Message, str]:
        # Pretty-printed, as a file is, and without a business key: the orchestrator derives it from the input.
        key = target.fresh()
        text = json_format.MessageToJson(order_request(key, items=[("TEE-007", 1)]))
        return pb.StartSagaRequest(saga_type="OrderSaga", input_json=text), key

    def keyed(build: Callable[[str], Message]) -> hostile.Base:
        def make() -> tuple[Message, str]:
            key = target.fresh()
            return build(key), key

        return make

    def wrapped(base: hostile.Base, wrap: Callable[[Any], Message]) -> hostile.Base:
        def make() -> tuple[Message, str]:
            message, key = base()
            return wrap(message), key

        return make

    def fixed(message: Message) -> hostile.Base:
        return lambda: (message, "")

    def operator(build: Callable[[str], Message]) -> hostile.Base:
        # Every other request aims at a held (paused, quiet) saga while any is left, the rest at the ended one.
        def make() -> tuple[Message, str]:
            turn = next(target.counter)
            held = target.held[turn // 2 % len(target.held)] if target.held and turn % 2 == 0 else ended_saga
            return build(held), ""

        return make

    an_hour_ago = timestamp_pb2.Timestamp(seconds=int(time.time()) - 3600)
    bases: dict[str, hostile.Base] = {
        "orchestrator.PlaceOrder": place_order,
        "orchestrator.StartSaga": start_saga,
        # The start-and-wait calls take the same requests; an accepted one answers when its saga ends.
        "orchestrator.PlaceOrderAndWait": wrapped(place_order, lambda m: pb.PlaceOrderAndWaitRequest(order=m)),
        "orchestrator.StartSagaAndWait": wrapped(start_saga, lambda m: pb.StartSagaAndWaitRequest(start=m)),
        "orchestrator.StartSaga[input_struct]": start_saga_struct,
        "orchestrator.StartSaga[input_json]": start_saga_json,
        "orchestrator.GetSaga": fixed(pb.GetSagaRequest(saga_id=ended_saga)),
        "orchestrator.ListSagas": fixed(
            pb.ListSagasRequest(
                statuses=[pb.SAGA_STATUS_COMPLETED], saga_type="OrderSaga", created_after=an_hour_ago, page_size=10
            )
        ),
        "orchestrator.WatchSaga": fixed(pb.WatchSagaRequest(saga_id=ended_saga, after_seq=1)),
        "orchestrator.RetrySaga": operator(lambda saga_id: pb.RetrySagaRequest(saga_id=saga_id)),
        "orchestrator.PauseSaga": operator(lambda saga_id: pb.PauseSagaRequest(saga_id=saga_id, reason="fuzz")),
        "orchestrator.ResumeSaga": operator(lambda saga_id: pb.ResumeSagaRequest(saga_id=saga_id)),
        "orchestrator.CancelSaga": operator(lambda saga_id: pb.CancelSagaRequest(saga_id=saga_id, reason="fuzz")),
        "orchestrator.TerminateSaga": operator(lambda saga_id: pb.TerminateSagaRequest(saga_id=saga_id, reason="fuzz")),
        "orchestrator.GetSagaStats": fixed(pb.GetSagaStatsRequest(created_after=an_hour_ago)),
        # Both refused FAILED_PRECONDITION SAGA_ENDED after every check of the request itself.
        "orchestrator.SignalSaga": fixed(
            pb.SignalSagaRequest(
                saga_id=ended_saga,
                name="payment_ok",
                signal_id="fuzz-signal-1",
                payload=struct_pb2.Struct(fields={"note": struct_pb2.Value(string_value="fuzz")}),
            )
        ),
        "orchestrator.DecideApproval": fixed(
            pb.DecideApprovalRequest(saga_id=ended_saga, step="fraud_review", approve=True, reason="fuzz")
        ),
        "orchestrator.ListDefinitions": fixed(pb.ListDefinitionsRequest(name="OrderSaga")),
        "inventory.ReserveStock": keyed(lambda key: inventory_pb.ReserveStockRequest(order_id=key, items=lines)),
        "inventory.ReleaseStock": keyed(lambda key: inventory_pb.ReleaseStockRequest(order_id=key, reason="fuzz")),
        "inventory.GetReservation": fixed(inventory_pb.GetReservationRequest(order_id=ended_order)),
        "inventory.GetStock": fixed(inventory_pb.GetStockRequest(skus=["TEE-007", "BOOK-001"])),
        "payment.Charge": keyed(
            lambda key: payment_pb.ChargeRequest(
                order_id=key, amount=Money(currency_code="USD", minor_units=1999), payment_token="tok_visa"
            )
        ),
        "payment.Refund": keyed(lambda key: payment_pb.RefundRequest(order_id=key, reason="fuzz")),
        "payment.GetPayment": fixed(payment_pb.GetPaymentRequest(order_id=ended_order)),
        "payment.ListPayments": fixed(payment_pb.ListPaymentsRequest(order_id=ended_order, page_size=10)),
        "shipping.CreateShipment": keyed(
            lambda key: shipping_pb.CreateShipmentRequest(order_id=key, address=DEMO_ADDRESS, items=lines)
        ),
        "shipping.CancelShipment": keyed(lambda key: shipping_pb.CancelShipmentRequest(order_id=key, reason="fuzz")),
        "shipping.GetShipment": fixed(shipping_pb.GetShipmentRequest(order_id=ended_order)),
        "notify.SendConfirmation": keyed(
            lambda key: notify_pb.SendConfirmationRequest(order_id=key, recipient="ada@example.com", summary=_summary())
        ),
        "notify.ListNotifications": fixed(notify_pb.ListNotificationsRequest(order_id=ended_order, page_size=10)),
    }
    return bases


# -- metadata ------------------------------------------------------------------------------------

FRESH = "<fresh key>"
_HOSTILE_KEYS: list[Metadata] = [
    [],
    [("idempotency-key", "")],
    [("idempotency-key", "k" * 201)],
    [("idempotency-key", "k" * 3000)],
    [("idempotency-key", " ")],
    [("idempotency-key", "a b")],
    [("idempotency-key", "'\";--%00%0a")],
    [("idempotency-key-bin", b"\x00\xff\nkey")],
    [("idempotency-key", FRESH), ("idempotency-key", FRESH)],
]
_HOSTILE_AUTH: list[Metadata] = [
    [],
    [("authorization", "Bearer")],
    [("authorization", "Bearer wrong-token-0123456789abcdef")],
    [("authorization", "Basic b3BlcmF0b3I6eA==")],
    [("authorization", "Bearer " + "x" * 3000)],
    [("authorization", f"Bearer {APP_TOKEN}")],
    [("authorization-bin", b"\x00\xff")],
    [("authorization", "Bearer wrong-token-0123456789abcdef"), ("authorization", f"Bearer {OPERATOR_TOKEN}")],
]


@st.composite
def call_metadata(draw: st.DrawFn, process: str) -> Metadata:
    """Mostly a fresh idempotency key (and, for the orchestrator, the operator token); now and then none or a
    hostile one."""
    key = draw(st.sampled_from(("fresh",) * 8 + ("hostile",) * 2))
    metadata: Metadata = [("idempotency-key", FRESH)] if key == "fresh" else list(draw(st.sampled_from(_HOSTILE_KEYS)))
    if process == "orchestrator":
        auth = draw(st.sampled_from(("operator",) * 8 + ("hostile",) * 2))
        bearer: Metadata = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
        metadata += bearer if auth == "operator" else draw(st.sampled_from(_HOSTILE_AUTH))
    return metadata


def _resolve(target: Target, metadata: Metadata) -> Metadata:
    return [(k, target.fresh("key") if v == FRESH else v) for k, v in metadata]


# The RPCs that start sagas: what they accept runs across every participant.
_STARTS = (
    "orchestrator.PlaceOrder",
    "orchestrator.StartSaga",
    "orchestrator.PlaceOrderAndWait",
    "orchestrator.StartSagaAndWait",
)
_START_RESPONSES: dict[str, type[Message]] = {
    "PlaceOrder": pb.PlaceOrderResponse,
    "StartSaga": pb.StartSagaResponse,
    "PlaceOrderAndWait": pb.PlaceOrderAndWaitResponse,
    "StartSagaAndWait": pb.StartSagaAndWaitResponse,
}
# The operator calls: what they accept changes the saga they name.
_OPERATIONS = tuple(f"orchestrator.{name}Saga" for name in ("Retry", "Pause", "Resume", "Cancel", "Terminate"))


# -- judging -------------------------------------------------------------------------------------


def _details_of(outcome: Outcome, detail_type: Any) -> list[Any]:
    found = []
    for detail in outcome.status.details if outcome.status else []:
        if detail.Is(detail_type.DESCRIPTOR):
            message = detail_type()
            detail.Unpack(message)
            found.append(message)
    return found


def _fields(outcome: Outcome) -> list[str]:
    return [v.field for bad in _details_of(outcome, error_details_pb2.BadRequest) for v in bad.field_violations]


def _reasons(outcome: Outcome) -> list[str]:
    return [info.reason for info in _details_of(outcome, error_details_pb2.ErrorInfo)]


def trailer_bytes(outcome: Outcome) -> int:
    """About what the status takes in HTTP/2 trailers: grpc-message percent-encoded, -bin values in base64,
    and 32 bytes a header as HTTP/2 counts it."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in outcome.details.encode())
    total = len("grpc-status") + 1 + 32 + len("grpc-message") + message + 32
    for key, value in outcome.trailing:
        raw = value if isinstance(value, bytes) else value.encode()
        total += len(key) + (len(base64.b64encode(raw)) if key.endswith("-bin") else len(raw)) + 32
    return total


def judge(outcome: Outcome, request: hostile.HostileRequest) -> list[str]:
    """What is wrong with an answer to a hostile request; nothing when it is a proper answer or refusal."""
    code = outcome.code
    if code == grpc.StatusCode.OK:
        return []
    problems = []
    if code in NEVER:
        problems.append(code.name)
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        if not [f for f in _fields(outcome) if f]:
            problems.append("INVALID_ARGUMENT without a google.rpc.BadRequest naming a field")
    elif code in WITH_REASON:
        oversized = code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(request.wire) > MAX_MESSAGE_BYTES
        if not oversized and not [r for r in _reasons(outcome) if r]:
            problems.append(f"{code.name} without a google.rpc.ErrorInfo reason")
    else:
        problems.append(f"{code.name} is not an allowed refusal")
    if outcome.status_error:
        problems.append(f"grpc-status-details-bin disagrees with the status: {outcome.status_error}")
    size = trailer_bytes(outcome)
    if size >= METADATA_LIMIT:
        problems.append(f"status takes {size} bytes of trailers (limit {METADATA_LIMIT})")
    return problems


def _got(outcome: Outcome) -> str:
    extra = _fields(outcome) or _reasons(outcome)
    shown = outcome.details if len(outcome.details) <= 160 else outcome.details[:150] + f"…({len(outcome.details)})"
    return f"{outcome.code.name} {shown!r}" + (f" {extra[:3]}" if extra else "")


def _started_saga_id(rpc: Rpc, outcome: Outcome) -> str:
    response: Any = _START_RESPONSES[rpc.method.name].FromString(outcome.responses[0])
    return str(response.saga_id)


def _left_behind(target: Target, rpc: Rpc, key: str) -> str:
    """What the stores hold for the business key of a refused request ("" when nothing, as it should be)."""
    md, t = target.auth(), CALL_SECONDS
    try:
        if rpc.name in _STARTS:
            sagas = target.stub("orchestrator").ListSagas(pb.ListSagasRequest(business_key=key), metadata=md, timeout=t)
            return f"saga {sagas.sagas[0].saga_id}" if sagas.sagas else ""
        if rpc.process == "inventory":
            found = target.stub("inventory").GetReservation(inventory_pb.GetReservationRequest(order_id=key), timeout=t)
            return f"reservation {found.reservation.reservation_id}"
        if rpc.process == "payment":
            found = target.stub("payment").GetPayment(payment_pb.GetPaymentRequest(order_id=key), timeout=t)
            return f"payment {found.payment.payment_id}"
        if rpc.process == "shipping":
            found = target.stub("shipping").GetShipment(shipping_pb.GetShipmentRequest(order_id=key), timeout=t)
            return f"shipment {found.shipment.shipment_id}"
        if rpc.process == "notify":
            found = target.stub("notify").ListNotifications(notify_pb.ListNotificationsRequest(order_id=key), timeout=t)
            return f"{len(found.notifications)} notifications" if found.notifications else ""
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return ""
        return f"(the probe itself failed: {error.code().name})"
    return ""


class FuzzRun:
    """Sends the examples for one RPC and collects what went wrong."""

    def __init__(self, target: Target, rpc: Rpc) -> None:
        self.target, self.rpc = target, rpc
        self.findings = Findings()
        self.codes: Counter[str] = Counter()
        self.created = 0
        self.operated: set[str] = set()  # sagas an accepted operator call changed

    def finding(self, what: str, got: str, request: hostile.HostileRequest | None = None) -> None:
        self.findings.add(
            Finding(
                self.rpc.case,
                what,
                got,
                request.text() if request else "",
                request.note if request else "",
                len(request.wire) if request else 0,
            )
        )

    def example(self, request: hostile.HostileRequest, metadata: Metadata) -> None:
        target, rpc = self.target, self.rpc
        sent = _resolve(target, metadata)
        outcome = target.call(rpc, request.wire, sent)
        self.codes[outcome.code.name] += 1
        for problem in judge(outcome, request):
            self.finding(problem, _got(outcome), request)
        if outcome.code == grpc.StatusCode.OK:
            for where, why in hostile.unacceptable(request.message) if request.message is not None else []:
                kind = re.sub(r"'.*'|\{.*\}|-?\d+", "…", why)
                self.finding("accepted a value every field must refuse", f"OK with {where}: {kind}", request)
            if rpc.name in _STARTS:
                response: Any = _START_RESPONSES[rpc.method.name].FromString(outcome.responses[0])
                self.created += response.created
                target.accepted_sagas.add(response.saga_id)
            elif rpc.name in _OPERATIONS and request.message is not None:
                saga_id = getattr(request.message, "saga_id", "")
                self.operated.add(saga_id)
                target.release(saga_id)
            return
        if request.base_key:
            left = _left_behind(target, rpc, request.base_key)
            if left:
                self.finding("a refused request left a record behind", f"{_got(outcome)}; store holds {left}", request)
        self._check_key_released(request, outcome, sent)

    def _check_key_released(self, request: hostile.HostileRequest, outcome: Outcome, sent: Metadata) -> None:
        """A request refused as invalid leaves its idempotency key unused: a valid request may take it."""
        keys = [v for k, v in sent if k == "idempotency-key"]
        if outcome.code != grpc.StatusCode.INVALID_ARGUMENT or self.rpc.name not in self.target.mutating:
            return
        if len(keys) != 1 or not str(keys[0]).startswith(f"key-{self.target.run}-"):
            return  # only a fresh key: a fixed hostile one may have been taken by an earlier example
        base = self.target.base(self.rpc)
        assert base is not None
        message, _ = base()
        again = self.target.call(self.rpc, message.SerializeToString(), [("idempotency-key", keys[0])])
        if again.code != grpc.StatusCode.OK:
            self.finding(
                "the key of a request refused as invalid was kept: a valid request with it is refused",
                f"first {_got(outcome)}; then {_got(again)}",
                request,
            )


def _tracebacks(texts: dict[str, str]) -> list[tuple[str, str]]:
    """(process, "<exception line> at <innermost frame of ours>") for each traceback in the log texts."""
    found = []
    for name, text in texts.items():
        for block in re.split(r"(?=Traceback \(most recent call last\):)", text)[1:]:
            lines = block.splitlines()[1:]
            frames = [line.strip() for line in lines if line.startswith("  File ")]
            ours = [f for f in frames if "site-packages" not in f] or frames
            raised = next((line for line in lines if line and not line.startswith(" ")), "(no exception line)")
            found.append((name, f"{raised[:240]} at {ours[-1] if ours else '?'}"))
    return found


def _forged_lines(texts: dict[str, str]) -> list[tuple[str, str]]:
    """Log lines that begin with the forged audit record hostile strings carry after a newline."""
    forged = hostile.FORGED_LOG_LINE.strip()[:24]
    return [
        (name, line[:200])
        for name, text in texts.items()
        for line in text.splitlines()
        if line.lstrip().startswith(forged)
    ]


# -- regressions ---------------------------------------------------------------------------------

Edit = Callable[[Any], None]


def _set(path: str, value: Any) -> Edit:
    """An edit that sets a dotted field path (through singular messages and [index] elements) to value."""

    def edit(message: Any) -> None:
        *parents, last = path.split(".")
        for part in parents:
            name, _, index = part.partition("[")
            message = getattr(message, name)[int(index[:-1])] if index else getattr(message, name)
        container = getattr(message, last)
        if isinstance(value, list):
            del container[:]
            container.extend(value)
        elif isinstance(value, Message):
            container.CopyFrom(value)
        else:
            setattr(message, last, value)

    return edit


def _every_input(message: Any) -> None:
    """All three inputs at once (the order as an Any, a Struct and JSON text): exactly one is allowed."""
    order = order_request(message.business_key or "fz-every-input")
    message.input.Pack(order)
    message.input_struct.update(json_format.MessageToDict(order))
    message.input_json = json_format.MessageToJson(order)


def _no_input(message: Any) -> None:
    for name in ("input", "input_struct", "input_json"):
        message.ClearField(name)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _deep(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


# Each class of finding in /work/notes/fuzz-findings.md, as a fixed example, so every run covers it whatever
# the generated examples happen to be (F-numbers as there).
_REGRESSIONS: dict[str, list[tuple[str, Edit]]] = {
    "orchestrator.PlaceOrder": [
        ("F0b: a 400,000-character currency_code", _set("amount.currency_code", "9" * 400_000)),
        ("F3 (issue 9.4): a NUL in customer_email", _set("customer_email", "ada@example.com\x00")),
        ("F3 (issue 9.4): a NUL in the street", _set("shipping_address.street", "12 St James's\x00 Square")),
        ("F3: a forged log line in the city", _set("shipping_address.city", "London" + hostile.FORGED_LOG_LINE)),
        ("F4: a well-formed SKU the catalogue does not hold", _set("items[0].sku", "TEE-008")),
    ],
    "orchestrator.StartSaga": [
        ("F0b: a 1 MB type_url", _set("input.type_url", "type.googleapis.com/" + "a" * 1_000_000)),
        ("input, input_struct and input_json at once", _every_input),
        ("no input at all", _no_input),
    ],
    "orchestrator.StartSaga[input_json]": [
        ("input_json nested 30,000 deep", _set("input_json", "[" * 30_000 + "]" * 30_000)),
        ("input_json objects nested 10,000 deep", _set("input_json", '{"a":' * 10_000 + "1" + "}" * 10_000)),
        ("a NaN in input_json", _set("input_json", '{"orderId": "fz-nan", "deadlineSeconds": NaN}')),
        ("1e999 in input_json", _set("input_json", '{"orderId": "fz-inf", "deadlineSeconds": 1e999}')),
        ("a 5,000-digit integer in input_json", _set("input_json", '{"deadlineSeconds": ' + "9" * 5_000 + "}")),
        ("a key given twice in input_json", _set("input_json", '{"orderId": "fz-a", "orderId": "fz-b"}')),
        ("a lone surrogate in input_json", _set("input_json", '{"orderId": "\\ud800"}')),
        ("an unknown field in input_json", _set("input_json", '{"orderId": "fz-u", "zzUnknownField": 1}')),
        ("a forged log line in an input_json key", _set("input_json", json.dumps({"x" + hostile.FORGED_LOG_LINE: 1}))),
        ("input_json of 1 MB", _set("input_json", '{"orderId": "' + "o" * 1_000_000 + '"}')),
        ("input_json of 65,537 bytes", _set("input_json", '{"orderId": "' + "o" * 65_522 + '"}')),
        ("input_json an array", _set("input_json", "[]")),
    ],
    "orchestrator.StartSaga[input_struct]": [
        ("a NaN in input_struct", _set("input_struct", _struct({"deadlineSeconds": float("nan")}))),
        ("a control character in an input_struct key", _set("input_struct", _struct({"order\x00Id": "x"}))),
        ("input_struct 40 levels deep", _set("input_struct", _struct(_deep(40, 1)))),
        ("an unknown field in input_struct", _set("input_struct", _struct({"zzUnknownField": 1}))),
    ],
    "orchestrator.ListDefinitions": [
        ("a NUL in name", _set("name", "Order\x00Saga")),
        ("a forged log line in name", _set("name", "OrderSaga" + hostile.FORGED_LOG_LINE)),
        ("a 100,000-character name", _set("name", "n" * 100_000)),
    ],
    "orchestrator.ListSagas": [
        ("F0b: 1,000 unknown statuses", _set("statuses", [28446] * 1000)),
        (
            "F1: created_before past int64 seconds",
            _set("created_before", timestamp_pb2.Timestamp(seconds=2**63 - 1, nanos=-1)),
        ),
        ("F1: created_after nanos -999999999", _set("created_after", timestamp_pb2.Timestamp(nanos=-999_999_999))),
        ("F1: created_after in year 10000", _set("created_after", timestamp_pb2.Timestamp(seconds=253_402_300_800))),
        ("F3 (issue 9.4): a NUL in business_key", _set("business_key", "ORDER-1\x00")),
        ("F3 (issue 9.4): a NUL in page_token", _set("page_token", "1.5_\x00")),
        ("F3: a C1 control in business_key", _set("business_key", "tok_visa\x80")),
    ],
    "orchestrator.GetSagaStats": [
        ("F2: created_after nanos 2^31-1", _set("created_after", timestamp_pb2.Timestamp(seconds=2, nanos=2**31 - 1))),
        (
            "F2: created_after 2^62 seconds",
            _set("created_after", timestamp_pb2.Timestamp(seconds=4_611_686_018_427_387_904)),
        ),
        ("F2: created_after nanos 1e9", _set("created_after", timestamp_pb2.Timestamp(nanos=1_000_000_000))),
    ],
    "orchestrator.SignalSaga": [
        (
            "a NaN in the payload",
            _set("payload", struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=float("nan"))})),
        ),
        ("a 100,000-character signal name", _set("name", "s" * 100_000)),
        ("a forged log line in signal_id", _set("signal_id", "sig" + hostile.FORGED_LOG_LINE)),
    ],
    "orchestrator.DecideApproval": [
        ("a forged audit line in reason", _set("reason", "fuzz" + hostile.FORGED_LOG_LINE)),
    ],
    "orchestrator.PauseSaga": [
        ("F3 (issue 9.5): a forged audit line in reason", _set("reason", "fuzz" + hostile.FORGED_LOG_LINE))
    ],
    "orchestrator.TerminateSaga": [
        ("F3 (issue 9.5): a forged audit line in reason", _set("reason", "fuzz" + hostile.FORGED_LOG_LINE))
    ],
    "inventory.ReserveStock": [("F4: an unknown SKU", _set("items[0].sku", "TEE-00"))],
    "inventory.ReleaseStock": [("F3: DEL in reason", _set("reason", "fu\x7fzz"))],
    "inventory.GetStock": [("F0b: 1,000 SKUs with a C1 control", _set("skus", ["\x85x"] * 1000))],
    "payment.Charge": [("F0b: a 64 KiB currency_code", _set("amount.currency_code", "USD" * 21_845))],
    "payment.Refund": [("F3: DEL in reason", _set("reason", "fu\x7fzz"))],
    "shipping.CreateShipment": [
        ("F3 (issue 9.4): a NUL in the street", _set("address.street", "12 St James's\x00 Square")),
        ("F3: a newline in recipient_name", _set("address.recipient_name", "Ada Lovel\nace")),
    ],
    "shipping.CancelShipment": [("F3: BEL in reason", _set("reason", "\x07fuzz"))],
    "notify.SendConfirmation": [
        ("F3 (issue 9.4): a NUL in recipient", _set("recipient", "ada@example.com\x00")),
        ("F0b: a 64 KiB currency_code", _set("summary.amount.currency_code", "USD" * 21_845)),
    ],
}


def regressions(target: Target, rpc: Rpc) -> list[hostile.HostileRequest]:
    """The fixed examples for the RPC: its listed edits of the base request, and for every RPC the malformed
    bytes of F0a (ff ff ff ff, a truncated varint, groups nested 200 deep, invalid UTF-8 in a string field)."""
    examples = [
        hostile.HostileRequest(hostile.MALFORMED_WIRE[note], "malformed", f"F0a: {note}")
        for note in ("ff ff ff ff", "truncated varint of field 1", "groups nested 200 deep")
    ]
    utf8 = hostile.invalid_utf8_records(rpc.method.input_type)
    if utf8:
        examples.append(hostile.HostileRequest(utf8[0][1], "malformed", f"F0a: {utf8[0][0]}"))
    base = target.base(rpc)
    if base is None:
        return examples
    for note, edit in _REGRESSIONS.get(rpc.case, []):
        message, key = base()
        copy = type(message)()
        copy.CopyFrom(message)
        edit(copy)
        examples.append(hostile.HostileRequest(copy.SerializeToString(), "mutation", note, copy, key))
    return examples


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS, ids=[rpc.case for rpc in RPCS])
def test_hostile_requests_are_refused_cleanly(target: Target, rpc: Rpc) -> None:
    run = FuzzRun(target, rpc)
    logs_before = target.log_sizes()
    sagas_before = target.saga_count()
    histories_before = target.histories(rpc)
    descriptor = rpc.method.input_type
    base = target.base(rpc)
    strategies = {
        "mutation": hostile.mutations(descriptor, base) if base is not None else hostile.random_requests(descriptor),
        "random": hostile.random_requests(descriptor),
        "malformed": hostile.malformed_requests(descriptor, base),
    }
    for kind, examples in MIX.items():
        strategy = strategies[kind]

        @_fuzz_settings(examples)
        @given(request=strategy, metadata=call_metadata(rpc.process))
        def fuzz(request: hostile.HostileRequest, metadata: Metadata) -> None:
            run.example(request, metadata)

        if SEED:
            fuzz = hypothesis_seed(int(SEED))(fuzz)
        fuzz()
    for request in regressions(target, rpc):
        run.example(request, [("idempotency-key", FRESH), *target.auth()])

    if rpc.case in target.base_refusals:
        run.finding("the valid base request is refused", target.base_refusals[rpc.case])
    for problem in target.not_serving():
        run.finding("a process is not SERVING afterwards", problem)
    new_logs = target.new_log_text(logs_before)
    for name, excerpt in _tracebacks(new_logs):
        run.finding(f"a Traceback in the {name} log", excerpt)
    for name, line in _forged_lines(new_logs):
        run.finding(f"a client's text started a line of its own in the {name} log", line)
    created = target.saga_count() - sagas_before
    if created != run.created:
        run.finding("the saga count changed by other than the sagas started", f"{created} new, {run.created} started")
    for saga_id, before in histories_before.items():
        after = len(target.saga(saga_id).history)
        if saga_id not in run.operated and after != before:
            run.finding("refused operator calls changed a saga's history", f"{saga_id}: {before} -> {after} events")

    summary = f"{rpc.case} on {target.backend}: {sum(run.codes.values())} calls, {dict(run.codes)}"
    print(summary)
    if run.findings:
        target.report.append(run.findings.report(target.backend))
    assert not run.findings, f"{summary}\n{run.findings.report(target.backend)}"


def test_every_served_service_is_fuzzed(target: Target) -> None:
    """Reflection lists what each process serves: every service there is one the contracts (and this suite) cover."""
    covered = {rpc.method.containing_service.full_name for rpc in RPCS}
    infrastructure = {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    for name, channel in target.channels.items():
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_SECONDS
        )
        served = {service.name for answer in answers for service in answer.list_services_response.service}
        assert served - infrastructure <= covered, f"{name} serves {sorted(served - infrastructure - covered)} unfuzzed"
        assert served - infrastructure, f"{name} serves nothing but infrastructure"


def test_afterwards_every_process_serves_and_a_normal_order_completes(target: Target) -> None:
    problems = [f"not SERVING: {problem}" for problem in target.not_serving()]
    tracebacks = Counter((name, re.sub(r"-?\d+", "#", where)) for name, where in _tracebacks(target.new_log_text({})))
    problems += [
        f"{count} Traceback(s) in the {name} log: {where}" for (name, where), count in sorted(tracebacks.items())
    ]
    # Input the orchestrator accepted must be input every participant accepts: each saga it started ends,
    # and no participant ever answered it INTERNAL, UNKNOWN or INVALID_ARGUMENT. Needing attention is fair
    # only when the saga ran out of time (an accepted deadline_seconds of 1 can do that on a busy machine).
    for saga_id in sorted(target.accepted_sagas):
        saga = target.wait_ended(saga_id)
        codes = {e.code for e in saga.history}
        bad_codes = sorted(codes & {"INTERNAL", "UNKNOWN", "INVALID_ARGUMENT"})
        ended = saga.status in (pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED)
        timed_out = saga.status == pb.SAGA_STATUS_NEEDS_ATTENTION and "DEADLINE_EXCEEDED" in codes
        if bad_codes or not (ended or timed_out):
            failed = [
                f"{e.type} {e.step} {e.code} {e.message[:120]!r}" for e in saga.history if e.code not in ("", "OK")
            ]
            status = pb.SagaStatus.Name(saga.status)
            problems.append(f"accepted saga {saga_id} ({saga.business_key[:40]!r}) is {status}: {failed[:4]}")
    order_id = target.fresh("fz-final")
    placed = target.stub("orchestrator").PlaceOrder(
        order_request(order_id), metadata=target.auth(), timeout=CALL_SECONDS
    )
    saga = target.wait_ended(placed.saga_id)
    if saga.status != pb.SAGA_STATUS_COMPLETED:
        history = [(e.type, e.code, e.message) for e in saga.history]
        problems.append(f"a normal order ended {pb.SagaStatus.Name(saga.status)}: {history}")
    if problems:
        target.report.append("".join(f"- [{target.backend}] after the fuzz: {p}\n" for p in problems))
    assert not problems, "\n".join(problems)


def test_malformed_wire_is_refused_by_the_decoder() -> None:
    """The fixed malformed encodings really are not messages, for every request type: the fuzz is not vacuous."""
    for rpc in RPCS:
        for note, wire in hostile.MALFORMED_WIRE.items():
            message = hostile.message_class(rpc.method.input_type)()
            with pytest.raises(DecodeError):
                message.ParseFromString(wire)
                pytest.fail(f"{note} parsed as a {rpc.method.input_type.name}")
