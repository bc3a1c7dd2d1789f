"""The whole suite on Consul discovery: real service and orchestrator processes register, fail over and deregister."""

# Against the Consul stand-in (tests/consul_standin.py, run as its own process) by default. With
# CONSUL_HTTP_ADDR set (and CONSUL_HTTP_TOKEN when the agent has ACLs) the same tests run against that
# agent, which must be able to reach 127.0.0.1 on this host for its gRPC checks and should be dedicated to
# the test (the orchestrator resolves every instance named inventory, payment, ...). Only the scenario
# that stops Consul is skipped there.

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import requests

from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import SERVICES
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from sagasuite.payment.v1 import payment_service_pb2 as pay_pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pay_grpc
from svckit.discovery import ConsulSettings

STANDIN_SCRIPT = Path(__file__).resolve().parents[1] / "consul_standin.py"
REAL_AGENT = bool(os.environ.get("CONSUL_HTTP_ADDR"))
NEEDS_STANDIN = pytest.mark.skipif(REAL_AGENT, reason="stops and restarts Consul: stand-in only")
# The stand-in runs checks at the registered 200ms; a real agent raises intervals below 1s to 1s.
PROCESS_ENV = {
    "HOST": "127.0.0.1",
    "PORT": "0",
    "LOG_LEVEL": "INFO",
    "DISCOVERY": "consul",
    "CONSUL_CHECK_INTERVAL": "200ms",
    "CONSUL_CHECK_TIMEOUT": "1s",
    # Long, so an instance that leaves Consul was deregistered, not reaped for being critical.
    "CONSUL_DEREGISTER_AFTER": "10m",
    "CONSUL_RESYNC_SECONDS": "0.5",
    "CONSUL_RETRY_MAX_SECONDS": "1",
}
SETTLE = 20.0
ENDED = {
    orch_pb.SAGA_STATUS_COMPLETED,
    orch_pb.SAGA_STATUS_COMPENSATED,
    orch_pb.SAGA_STATUS_NEEDS_ATTENTION,
    orch_pb.SAGA_STATUS_TERMINATED,
}

_T = TypeVar("_T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def eventually(
    check: Callable[[], _T], what: str, within: float = SETTLE, *, context: Callable[[], str] | None = None
) -> _T:
    """Poll `check` until it returns something truthy; fail naming `what` (and `context()`) after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {within:g}s waiting for {what}{extra}")
        time.sleep(0.05)


class ConsulAgent:
    """The agent under test: a stand-in process on a fixed port (so it can be restarted), or a real one."""

    def __init__(self, log_dir: Path, *, real: bool = REAL_AGENT) -> None:
        self.log_dir = log_dir
        self.real = real
        self.process: subprocess.Popen[bytes] | None = None
        if real:
            self.settings = ConsulSettings.from_env()
            self.env: dict[str, str] = {}
        else:
            self.settings = ConsulSettings(host="127.0.0.1", port=_free_port())
            # CONSUL_HTTP_SSL decides the scheme when set: a real agent's https settings must not leak in.
            self.env = {"CONSUL_HTTP_ADDR": self.settings.address, "CONSUL_HTTP_SSL": "false"}

    def start(self) -> ConsulAgent:
        """Start the stand-in (with an empty state, like an agent without a data dir); no-op for a real agent."""
        if self.real:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(STANDIN_SCRIPT), "--port", str(self.settings.port)]
        # The agent-side minimums (1s interval, 1m deregistration, 30s reaper) lowered so tests stay fast.
        command += ["--min-check-interval", "0.05", "--min-deregister-after", "0", "--check-reap-interval", "0.1"]
        with open(self.log_dir / "consul-standin.log", "ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        eventually(self._answers, "the Consul stand-in to answer", 15.0)
        return self

    def kill(self) -> None:
        """Stop Consul the hard way: SIGKILL, so blocking queries and registrations are cut mid-flight."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def _answers(self) -> bool:
        try:
            return requests.get(self.settings.url + "/v1/status/leader", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _request(self, method: str, path: str) -> requests.Response:
        token = self.settings.token
        return requests.request(
            method,
            self.settings.url + path,
            headers={"X-Consul-Token": token} if token else {},
            verify=self.settings.verify,
            cert=self.settings.client_cert,
            timeout=10,
        )

    def get(self, path: str) -> Any:
        response = self._request("GET", path)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    def deregister(self, instance_id: str) -> None:
        self._request("PUT", f"/v1/agent/service/deregister/{instance_id}")

    def entry(self, name: str, instance_id: str) -> dict[str, Any] | None:
        """The /v1/health/service entry of one instance, with its checks, or None."""
        entries = self.get(f"/v1/health/service/{name}")
        return next((e for e in entries if e["Service"]["ID"] == instance_id), None)

    def check_status(self, name: str, instance_id: str) -> str | None:
        entry = self.entry(name, instance_id)
        if entry is None:
            return None
        status: str = next(c["Status"] for c in entry["Checks"] if c["ServiceID"] == instance_id)
        return status

    def passing_ids(self, name: str) -> set[str]:
        return {e["Service"]["ID"] for e in self.get(f"/v1/health/service/{name}?passing=true")}


@dataclass
class Instance:
    """One running process of the suite and what it should be registered as."""

    name: str
    process: ManagedProcess

    @property
    def instance_id(self) -> str:
        return f"{self.name}-127.0.0.1-{self.process.port}"


@dataclass
class ConsulStack:
    """Consul, the four services and an orchestrator, all as processes with DISCOVERY=consul."""

    consul: ConsulAgent
    data_dir: Path
    instances: dict[str, Instance] = field(default_factory=dict)
    extra: list[Instance] = field(default_factory=list)
    orchestrator_channel: grpc.Channel | None = None

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def process_env(self, label: str) -> dict[str, str]:
        return {**PROCESS_ENV, **self.consul.env, "DATA_DIR": str(self.data_dir / label)}

    def start(self) -> ConsulStack:
        self.consul.start()
        processes = {
            name: ManagedProcess(name, module, self.process_env(name), self.log_dir)
            for name, module in SERVICES.items()
        }
        with ThreadPoolExecutor(len(processes)) as pool:
            for future in [pool.submit(process.start) for process in processes.values()]:
                future.result()
        self.instances = {name: Instance(name, process) for name, process in processes.items()}
        orchestrator = ManagedProcess("orchestrator", "orchestrator", self.process_env("orchestrator"), self.log_dir)
        self.instances["orchestrator"] = Instance("orchestrator", orchestrator.start())
        self.orchestrator_channel = grpc.insecure_channel(orchestrator.address)
        return self

    def start_instance(self, name: str, label: str, **env: str) -> Instance:
        """One more instance of a service (its own database), registered in Consul like the others."""
        process = ManagedProcess(label, SERVICES[name], {**self.process_env(label), **env}, self.log_dir)
        instance = Instance(name, process)
        self.extra.append(instance)
        process.start()
        return instance

    def stop(self) -> None:
        if self.orchestrator_channel is not None:
            self.orchestrator_channel.close()
        # All at once: each SIGTERM deregisters and drains on its own.
        processes = [instance.process for instance in [*self.extra, *self.instances.values()]]
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda process: process.stop(timeout=10), processes))
        self.consul.kill()

    @property
    def orchestrator(self) -> orch_grpc.OrchestratorServiceStub:
        assert self.orchestrator_channel is not None
        return orch_grpc.OrchestratorServiceStub(self.orchestrator_channel)

    def all_passing(self, instances: list[Instance] | None = None) -> None:
        """Wait until every given instance (default: the base stack) is registered with a passing check."""
        wanted = instances if instances is not None else list(self.instances.values())

        def missing() -> list[str]:
            return [i.instance_id for i in wanted if i.instance_id not in self.consul.passing_ids(i.name)]

        eventually(lambda: not missing(), "every instance to pass its check", context=lambda: f"missing: {missing()}")

    # ------------------------------------------------------------------ sagas

    def place(self, order_id: str) -> str:
        response = self.orchestrator.PlaceOrder(_order(order_id), timeout=10)
        return str(response.saga_id)

    def wait_completed(self, saga_ids: list[str], within: float = 30.0) -> None:
        """Poll GetSaga until every saga ended; fail with the history of any that did not complete."""
        deadline = time.monotonic() + within
        pending = list(saga_ids)
        ended: dict[str, orch_pb.Saga] = {}
        while pending and time.monotonic() < deadline:
            for saga_id in list(pending):
                saga = self.orchestrator.GetSaga(orch_pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga
                if saga.status in ENDED:
                    ended[saga_id] = saga
                    pending.remove(saga_id)
            if pending:
                time.sleep(0.05)
        bad = [s for s in ended.values() if s.status != orch_pb.SAGA_STATUS_COMPLETED]
        for saga_id in pending:
            bad.append(self.orchestrator.GetSaga(orch_pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga)
        if bad:
            raise AssertionError("sagas that did not complete:\n" + "\n\n".join(_describe(saga) for saga in bad))

    def charged_orders(self, instance: Instance) -> set[str]:
        """Order ids with a CHARGE entry in one payment instance's own ledger."""
        orders: set[str] = set()
        with grpc.insecure_channel(instance.process.address) as channel:
            stub = pay_grpc.PaymentServiceStub(channel)
            token = ""
            while True:
                page = stub.ListPayments(pay_pb.ListPaymentsRequest(page_size=500, page_token=token), timeout=10)
                orders |= {e.order_id for e in page.entries if e.kind == pay_pb.LEDGER_ENTRY_KIND_CHARGE}
                token = page.next_page_token
                if not token:
                    return orders


def _order(order_id: str) -> orch_pb.PlaceOrderRequest:
    return order_request(order_id, items=[("BOOK-001", 1)], minor_units=2999, currency="EUR")


def _describe(saga: orch_pb.Saga) -> str:
    status = orch_pb.SagaStatus.Name(saga.status)
    lines = [f"saga {saga.saga_id} ({saga.business_key}): {status} {saga.last_error}"]
    lines += [f"  {e.seq} {e.type} {e.step} #{e.attempt} {e.code} {e.message}" for e in saga.history]
    return "\n".join(lines)


def _contains(path: Path, text: str) -> bool:
    return text in path.read_text()


def _orders(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}-{n}" for n in range(count)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulStack]:
    data_dir = tmp_path_factory.mktemp("consul-stack")
    under_test = ConsulStack(ConsulAgent(data_dir / "logs"), data_dir)
    try:
        under_test.start()
        yield under_test
    finally:
        under_test.stop()


# --------------------------------------------------------------------------- registration


def test_every_process_registers_with_a_passing_grpc_check_meta_and_tags(stack: ConsulStack) -> None:
    stack.all_passing()
    for name, instance in stack.instances.items():
        entry = stack.consul.entry(name, instance.instance_id)
        assert entry is not None, f"{instance.instance_id} is not registered"
        service = entry["Service"]
        assert (service["Service"], service["Address"], service["Port"]) == (name, "127.0.0.1", instance.process.port)
        assert service["Tags"] == ["grpc", "v1"]
        assert service["Meta"]["contract"] == f"sagasuite.{name}.v1"
        assert service["Meta"]["contract_version"] == "v1"
        assert service["Meta"]["version"]
        [check] = [c for c in entry["Checks"] if c["ServiceID"] == instance.instance_id]
        assert check["CheckID"] == f"service:{instance.instance_id}"
        assert (check["Type"], check["Status"]) == ("grpc", "passing"), check
        assert "success" in check["Output"], check
        log = instance.process.log_path.read_text()
        assert f"registered {instance.instance_id} in consul" in log

    # Consul's view is what the orchestrator routes by: a saga goes through all four services.
    stack.wait_completed([stack.place(order_id) for order_id in _orders("registered", 2)])


# --------------------------------------------------------------------------- failover


def test_sigkilled_payment_instance_goes_critical_and_sagas_complete_through_the_survivor(stack: ConsulStack) -> None:
    survivor = stack.instances["payment"]
    doomed = stack.start_instance("payment", "payment-doomed")
    try:
        stack.all_passing([survivor, doomed])
        # Round-robin spreads the charges over both healthy instances, each with its own ledger.
        before: list[str] = []

        def both_charged() -> bool:
            batch = _orders("spread", 4)
            stack.wait_completed([stack.place(order_id) for order_id in batch])
            before.extend(batch)
            return bool(stack.charged_orders(survivor) & set(before)) and bool(
                stack.charged_orders(doomed) & set(before)
            )

        eventually(both_charged, "charges on both payment instances")

        doomed.process.kill()
        eventually(
            lambda: stack.consul.check_status("payment", doomed.instance_id) == "critical",
            "the killed instance's gRPC check to go critical",
        )
        assert stack.consul.passing_ids("payment") >= {survivor.instance_id}
        assert doomed.instance_id not in stack.consul.passing_ids("payment")

        after = _orders("after-kill", 6)
        stack.wait_completed([stack.place(order_id) for order_id in after])
        assert set(after) <= stack.charged_orders(survivor), "every saga after the kill charged the survivor"
    finally:
        doomed.process.kill()
        stack.consul.deregister(doomed.instance_id)


def test_sigterm_deregisters_before_draining(stack: ConsulStack) -> None:
    leaving = stack.start_instance("shipping", "shipping-leaving")
    stack.all_passing([leaving])
    assert leaving.process.stop(timeout=15) == 0
    # Deregistration happens before the server stops, so it is done once the process has exited; with
    # DeregisterCriticalServiceAfter at 10m no reaper could have removed it instead.
    assert leaving.instance_id not in stack.consul.get("/v1/agent/services")
    assert stack.consul.entry("shipping", leaving.instance_id) is None
    lines = leaving.process.log_path.read_text().splitlines()
    deregistered = next(n for n, line in enumerate(lines) if f"deregistered {leaving.instance_id} from consul" in line)
    stopped = next(n for n, line in enumerate(lines) if " stopped " in line)
    assert deregistered < stopped, "deregistration must come before the server stops"
    # The remaining shipping instance takes the sagas.
    stack.wait_completed([stack.place(order_id) for order_id in _orders("after-sigterm", 2)])


def test_registration_retries_in_the_background_until_consul_answers(stack: ConsulStack, tmp_path: Path) -> None:
    # A private stand-in, started only after the service: the shared agent is not disturbed.
    late = ConsulAgent(tmp_path / "late-consul", real=False)
    process = ManagedProcess(
        "notify-early", SERVICES["notify"], {**PROCESS_ENV, **late.env, "DATA_DIR": str(tmp_path)}, tmp_path / "logs"
    )
    # Without Consul the process still starts and serves.
    instance = Instance("notify", process.start())
    try:
        eventually(
            lambda: "consul registration of" in process.log_path.read_text(),
            "a logged registration failure",
        )
        assert "failed (attempt 1)" in process.log_path.read_text()
        late.start()
        eventually(
            lambda: instance.instance_id in late.passing_ids("notify"),
            "the late registration to pass",
            context=process.log_tail,
        )
        assert "succeeded after" in process.log_path.read_text()
    finally:
        process.stop(timeout=10)
        late.kill()


def test_lost_registration_is_restored(stack: ConsulStack) -> None:
    notify = stack.instances["notify"]
    stack.all_passing([notify])
    # As if the agent had restarted without its state: the instance is gone behind its back.
    stack.consul.deregister(notify.instance_id)
    eventually(
        lambda: notify.instance_id in stack.consul.passing_ids("notify"),
        "the instance to register again",
        context=notify.process.log_tail,
    )
    assert "registering again" in notify.process.log_path.read_text()


# --------------------------------------------------------------------------- Consul trouble


@NEEDS_STANDIN
def test_sagas_keep_completing_on_the_last_known_list_while_consul_is_down(stack: ConsulStack) -> None:
    stack.all_passing()
    stack.wait_completed([stack.place(order_id) for order_id in _orders("before-outage", 2)])
    orchestrator_log = stack.instances["orchestrator"].process.log_path

    stack.consul.kill()
    # The orchestrator's blocking queries are cut: it says so and keeps the instances it knew.
    for name in SERVICES:
        notice = f"consul query for '{name}' failed, keeping 1 known address(es)"
        eventually(partial(_contains, orchestrator_log, notice), f"the orchestrator to keep its last list of {name}")
    during = _orders("during-outage", 6)
    stack.wait_completed([stack.place(order_id) for order_id in during])
    assert set(during) <= stack.charged_orders(stack.instances["payment"])

    # A fresh agent (no state) on the same address: every process registers again by itself.
    stack.consul.start()
    stack.all_passing()
    stack.wait_completed([stack.place(order_id) for order_id in _orders("after-outage", 2)])
