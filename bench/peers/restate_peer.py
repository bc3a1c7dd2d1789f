"""Restate as a peer: the real server (npm `@restatedev/restate-server`) and an order-saga service on the Python SDK.

The server binary comes from the npm package, installed once with npm into `.tools/` (pinned:
RESTATE_SERVER_VERSION); the SDK (`restate-sdk`), its ASGI server (hypercorn) and the client that
calls the ingress (aiohttp) come with the bench extra: `pip install '.[bench]'`. The service is a
process of its own (`python -m bench.peers.restate_peer`, configured by environment variables):
one handler whose four `ctx.run` steps make the same keyed calls, with the same 2 s deadline,
against the same service processes as the orchestrator and the floor, and undo the earlier ones on
a refusal. It is registered with the server's admin API and invoked over the ingress, one HTTP
request per saga that answers with its outcome. The server keeps its state (RocksDB) in the bench
data dir, on free ports.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from bench.targets import CHANNEL_OPTIONS, PeerUnavailable, SagaTiming, Target
from devstack.launcher import ManagedProcess

__all__ = [
    "RESTATE_SERVER_PACKAGE",
    "RESTATE_SERVER_VERSION",
    "RestatePeer",
    "RestateTarget",
    "install_restate_server",
]

RESTATE_SERVER_PACKAGE = "@restatedev/restate-server"
RESTATE_SERVER_VERSION = "1.7.12"
SERVICE_NAME = "OrderSaga"
HANDLER_NAME = "run"
# One saga's request to the ingress: generous, as PlaceOrderAndWait's deadline is.
INVOKE_TIMEOUT = 120.0
STEP_TIMEOUT = 2.0
NPM_TIMEOUT = 600.0
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def default_tools_dir(data_dir: Path) -> Path:
    """`.tools/` of the checkout (kept between runs, git-ignored), or the bench data dir when installed elsewhere."""
    return _REPO_ROOT / ".tools" if (_REPO_ROOT / "pyproject.toml").exists() else Path(data_dir) / "tools"


def _server_binary(prefix: Path) -> Path | None:
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    system = sys.platform if sys.platform != "darwin" else "darwin"
    binary = prefix / "node_modules" / "@restatedev" / f"restate-server-{system}-{machine}" / "bin" / "restate-server"
    return binary if binary.exists() else None


def install_restate_server(tools_dir: Path) -> Path:
    """The restate-server binary of the pinned npm package, installed with npm first if it is not there yet."""
    prefix = Path(tools_dir) / f"restate-server-{RESTATE_SERVER_VERSION}"
    binary = _server_binary(prefix)
    if binary is not None:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise PeerUnavailable(f"restate: npm is not installed, and it installs {RESTATE_SERVER_PACKAGE}")
    prefix.mkdir(parents=True, exist_ok=True)
    spec = f"{RESTATE_SERVER_PACKAGE}@{RESTATE_SERVER_VERSION}"
    try:
        # --ignore-scripts: the package's only script is a download counter (scarf), nothing the binary needs.
        done = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts",
             "--loglevel=error", spec],
            capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"restate: npm install {spec} got no answer in {NPM_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise PeerUnavailable(f"restate: npm install {spec} failed: {_one_line(done.stderr or done.stdout)}")
    binary = _server_binary(prefix)
    if binary is None:
        raise PeerUnavailable(f"restate: {spec} installed no server binary for {sys.platform}/{platform.machine()}")
    return binary


def _check_sdk() -> str:
    """The SDK's version; PeerUnavailable when the bench extra is not installed."""
    try:
        from importlib.metadata import version

        import aiohttp  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        import hypercorn  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        import restate  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        return version("restate-sdk")
    except ImportError as error:
        raise PeerUnavailable(
            f"restate: {error.name} is not installed: pip install '.[bench]' (restate-sdk, hypercorn, aiohttp)"
        ) from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _http(method: str, url: str, body: object | None = None, timeout: float = 10.0) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")


class RestatePeer:
    """Starts the Restate server and the order-saga service, registers the service, stops both; a target group."""

    name = "restate"

    def __init__(self, data_dir: Path, *, log_level: str = "WARNING", tools_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.tools_dir = Path(tools_dir) if tools_dir is not None else default_tools_dir(self.data_dir)
        self.service_addresses: dict[str, str] = {}
        self.service_pids: dict[str, int] = {}
        self.log_level = log_level
        self.notes: list[str] = []
        self.binary: Path | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.service: ManagedProcess | None = None
        self.ingress = ""
        self.admin = ""

    def prepare(self) -> None:
        sdk_version = _check_sdk()
        self.binary = install_restate_server(self.tools_dir)
        self.notes.append(
            f"Restate: server {RESTATE_SERVER_VERSION} (npm {RESTATE_SERVER_PACKAGE}, defaults, state in the bench "
            f"data dir), Python SDK {sdk_version} on hypercorn (HTTP/2), one handler of four ctx.run steps; "
            "the client POSTs to the ingress and waits for the outcome"
        )

    def bind(self, service_addresses: Mapping[str, str], service_pids: Mapping[str, int]) -> None:
        self.service_addresses = dict(service_addresses)
        self.service_pids = dict(service_pids)

    def start(self) -> Sequence[Target]:
        assert self.binary is not None, "prepare() first"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "LOG_LEVEL": self.log_level,
            **{f"{name.upper()}_ADDR": address for name, address in self.service_addresses.items()},
        }
        try:
            self.service = ManagedProcess("restate-service", "bench.peers.restate_peer", env, self.data_dir).start(60)
            self._start_server()
            self._register(f"http://127.0.0.1:{self.service.port}")
        except BaseException:
            self.stop()
            raise
        assert self.server is not None and self.service.pid
        pids = {**self.service_pids, "restate server": self.server.pid, "restate service": self.service.pid}
        return [RestateTarget(self.ingress, pids)]

    def _start_server(self) -> None:
        assert self.binary is not None
        ingress, admin, fabric = _free_port(), _free_port(), _free_port()
        self.ingress, self.admin = f"http://127.0.0.1:{ingress}", f"http://127.0.0.1:{admin}"
        env = {
            **os.environ,
            "RESTATE_INGRESS__BIND_ADDRESS": f"127.0.0.1:{ingress}",
            "RESTATE_ADMIN__BIND_ADDRESS": f"127.0.0.1:{admin}",
            "RESTATE_BIND_ADDRESS": f"127.0.0.1:{fabric}",
            "RESTATE_LISTEN_MODE": "tcp",
            "RESTATE_DISABLE_TELEMETRY": "true",
            "RESTATE_LOG_FORMAT": "compact",
            "RESTATE_LOG_DISABLE_ANSI_CODES": "true",
        }
        log_path = self.data_dir / "restate-server.log"
        with open(log_path, "ab") as log_file:
            # It asks GitHub for a newer version at every start: that fails at once here and is harmless.
            self.server = subprocess.Popen(
                [str(self.binary), "--no-logo", "--base-dir", str(self.data_dir / "restate-data"),
                 "--node-name", "bench"],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"restate-server exited with {self.server.returncode}:\n{tail}")
            try:
                if _http("GET", f"{self.admin}/health", timeout=2)[0] == 200:
                    if _http("GET", f"{self.ingress}/restate/health", timeout=2)[0] == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"restate-server was not healthy within 60 s; see {log_path}")
            time.sleep(0.1)

    def _register(self, uri: str) -> None:
        status, body = _http("POST", f"{self.admin}/deployments", {"uri": uri, "force": True}, timeout=30)
        if status not in (200, 201):
            raise RuntimeError(f"restate: registering {uri} failed with HTTP {status}: {body[:300]}")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None
        if self.service is not None:
            self.service.stop(10)
        self.service = None


class IngressError(RuntimeError):
    """The ingress answered a saga's request with something other than its outcome."""


class RestateTarget:
    """One POST to the ingress per saga, which answers with the handler's result: no start apart from the end."""

    name = "restate"
    has_start = False

    def __init__(self, ingress: str, pids: Mapping[str, int]) -> None:
        self._url = f"{ingress}/{SERVICE_NAME}/{HANDLER_NAME}"
        self._pids = dict(pids)
        self._session: Any = None

    async def open(self) -> None:
        import aiohttp  # type: ignore[import-not-found, unused-ignore]

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=INVOKE_TIMEOUT)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def calibrate(self, order_id: str) -> None:
        """One saga first, so the server has opened its connections to the service."""
        await self.run_one(f"restate-{order_id}", time.perf_counter())

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        async with self._session.post(self._url, json=order_id) as response:
            text = await response.text()
        if response.status != 200:
            raise IngressError(f"HTTP {response.status}: {text[:200]}")
        ended = time.perf_counter()
        return SagaTiming(due, ended, ended, str(json.loads(text)))


# -- the service process -------------------------------------------------------------------------


def _service(addresses: Mapping[str, str]) -> Any:
    """The order saga as a Restate service: four ctx.run steps, each keyed by invocation and step."""
    import restate  # type: ignore[import-not-found, unused-ignore]
    from restate import RunOptions, TerminalError  # type: ignore[import-not-found, unused-ignore]

    from bench.targets import bench_order
    from orchestrator.sagas.order import REASON
    from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
    from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
    from sagasuite.notify.v1 import notify_service_pb2 as notify
    from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
    from sagasuite.payment.v1 import payment_service_pb2 as payment
    from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
    from sagasuite.shipping.v1 import shipping_service_pb2 as shipping
    from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
    from svckit.idempotency_key import IDEMPOTENCY_HEADER

    refused = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
    }
    stubs: dict[str, Any] = {}

    def stub(name: str) -> Any:
        # Channels belong to the event loop that serves the handler: opened on the first call.
        if not stubs:
            channels = {n: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for n, a in addresses.items()}
            stubs.update(
                inventory=inventory_grpc.InventoryServiceStub(channels["inventory"]),
                payment=payment_grpc.PaymentServiceStub(channels["payment"]),
                shipping=shipping_grpc.ShippingServiceStub(channels["shipping"]),
                notify=notify_grpc.NotifyServiceStub(channels["notify"]),
            )
        return stubs[name]

    async def keyed(method: Any, request: Any, key: str) -> Any:
        try:
            return await method(request, timeout=STEP_TIMEOUT, metadata=((IDEMPOTENCY_HEADER, key),))
        except grpc.aio.AioRpcError as error:
            if error.code() in refused:
                raise TerminalError(f"{error.code().name}: {error.details()}") from None
            raise

    async def reserve_stock(order_id: str, key: str) -> None:
        order = bench_order(order_id)
        request = inventory.ReserveStockRequest(order_id=order_id, items=order.items)
        await keyed(stub("inventory").ReserveStock, request, key)

    async def release_stock(order_id: str, key: str) -> None:
        request = inventory.ReleaseStockRequest(order_id=order_id, reason=REASON)
        await keyed(stub("inventory").ReleaseStock, request, key)

    async def charge_payment(order_id: str, key: str) -> None:
        order = bench_order(order_id)
        request = payment.ChargeRequest(order_id=order_id, amount=order.amount, payment_token=order.payment_token)
        await keyed(stub("payment").Charge, request, key)

    async def refund_payment(order_id: str, key: str) -> None:
        await keyed(stub("payment").Refund, payment.RefundRequest(order_id=order_id, reason=REASON), key)

    async def create_shipment(order_id: str, key: str) -> str:
        order = bench_order(order_id)
        request = shipping.CreateShipmentRequest(order_id=order_id, address=order.shipping_address, items=order.items)
        response = await keyed(stub("shipping").CreateShipment, request, key)
        return str(response.shipment.tracking_number)

    async def cancel_shipment(order_id: str, key: str) -> None:
        request = shipping.CancelShipmentRequest(order_id=order_id, reason=REASON)
        await keyed(stub("shipping").CancelShipment, request, key)

    async def send_confirmation(order_id: str, tracking: str, key: str) -> None:
        order = bench_order(order_id)
        summary = notify.OrderSummary(items=order.items, amount=order.amount, tracking_number=tracking)
        request = notify.SendConfirmationRequest(order_id=order_id, recipient=order.customer_email, summary=summary)
        await keyed(stub("notify").SendConfirmation, request, key)

    # The order saga's retry shape: 5 attempts with backoff from 50 ms; compensations 20, the confirmation 10.
    step: RunOptions[Any] = RunOptions(max_attempts=5, initial_retry_interval=timedelta(milliseconds=50))
    undo: RunOptions[Any] = RunOptions(
        max_attempts=20, initial_retry_interval=timedelta(milliseconds=50), max_retry_interval=timedelta(seconds=5)
    )
    confirm: RunOptions[Any] = RunOptions(max_attempts=10, initial_retry_interval=timedelta(milliseconds=100))
    service = restate.Service(SERVICE_NAME)

    async def run(ctx: restate.Context, order_id: str) -> str:
        invocation = ctx.request().id

        def key(name: str, direction: str = "action") -> str:
            # Stable across retries and replays: one invocation, one key per step and direction.
            return f"{invocation}/{name}/{direction}"

        done: list[tuple[str, Any]] = []
        try:
            # A step whose retries ran out may have taken effect: its own compensation runs too.
            done.append(("release_stock", release_stock))
            await ctx.run_typed("reserve_stock", reserve_stock, step, order_id, key("reserve_stock"))
            done.append(("refund_payment", refund_payment))
            await ctx.run_typed("charge_payment", charge_payment, step, order_id, key("charge_payment"))
            done.append(("cancel_shipment", cancel_shipment))
            tracking = await ctx.run_typed("create_shipment", create_shipment, step, order_id, key("create_shipment"))
        except TerminalError:
            steps = {"release_stock": "reserve_stock", "refund_payment": "charge_payment"}
            steps["cancel_shipment"] = "create_shipment"
            for name, compensation in reversed(done):
                await ctx.run_typed(name, compensation, undo, order_id, key(steps[name], "compensation"))
            return "COMPENSATED"
        await ctx.run_typed(
            "send_confirmation", send_confirmation, confirm, order_id, tracking, key("send_confirmation")
        )
        return "COMPLETED"

    # The SDK reads the handler's annotations as objects; this module's are strings (future annotations)
    # naming a local import, so they are given as the objects themselves.
    run.__annotations__ = {"ctx": restate.Context, "order_id": str, "return": str}
    service.handler(HANDLER_NAME)(run)
    return service


async def _serve() -> None:
    import asyncio
    import logging

    import hypercorn.asyncio  # type: ignore[import-not-found, unused-ignore]
    import hypercorn.config  # type: ignore[import-not-found, unused-ignore]
    import restate  # type: ignore[import-not-found, unused-ignore]
    from restate.server import install_shutdown_hook  # type: ignore[import-not-found, unused-ignore]

    from svckit.discovery import SUITE_SERVICES

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    addresses = {name: os.environ[f"{name.upper()}_ADDR"] for name in SUITE_SERVICES}
    restate_app = restate.app(services=[_service(addresses)])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The SDK's app has no lifespan; answering it here keeps hypercorn from logging a warning.
        if scope["type"] != "lifespan":
            await restate_app(scope, receive, send)
            return
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    # A socket of our own, bound before hypercorn runs, so the port is known and listening when we say READY.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    config = hypercorn.config.Config()
    config.bind = [f"fd://{listener.fileno()}"]
    # As the SDK's own harness sets them: one long-lived HTTP/2 connection from the server.
    config.h2_max_concurrent_streams = 2**31 - 1
    config.keep_alive_max_requests = 2**31 - 1
    config.keep_alive_timeout = 2**31 - 1
    config.accesslog = None
    config.loglevel = os.environ.get("LOG_LEVEL", "WARNING")
    stopping = asyncio.Event()
    # The SDK's ASGI app installs its SIGTERM handler (to drain its invocations) on the first request,
    # replacing any other handler: shutdown is registered through the same hook, so both run.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        install_shutdown_hook(loop, stopping.set, signum)
    print(f"READY port={listener.getsockname()[1]}", flush=True)
    await hypercorn.asyncio.serve(app, config, shutdown_trigger=stopping.wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    import asyncio

    asyncio.run(_serve())
