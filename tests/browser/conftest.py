"""Fixtures of the browser tests: Debian's chromium through Playwright, a real stack, and `saga web` as a process."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import grpc
import pytest

from devstack.stack import LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.orchestrator_helpers import OPERATOR_TOKEN, new_order_id, order_request, start_stack, status_name

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
# The flags the suite's design asks for: a headless Debian chromium that reaches nothing but loopback.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Where the saga pages' trace links point: never opened, only checked.
JAEGER_URL = "http://jaeger.test:16686"
# A YAML definition whose business key is free text (the shipping address's recipient name).
DEFINITIONS = Path(__file__).resolve().parent / "definitions"
# OrderSaga v2 with every order of 50.00 or more waiting for its fraud review; Charge fails its first two calls
# for orders whose id says "flaky", so a declined card is compensated after two retries. Spans go to the
# orchestrator's log (no collector is needed), so that each saga has a trace id to link to.
ORCHESTRATOR_ENV = {
    "ORDER_SAGA_VERSION": "2",
    "REVIEW_THRESHOLD": "5000",
    "SAGA_DEFINITIONS_DIR": str(DEFINITIONS),
    "OTEL_TRACES_EXPORTER": "console",
}
FAULTS = {"payment": "Charge:fail_first=2,order_contains=flaky"}
REVIEWED_MINOR_UNITS = 9000
WAIT_SECONDS = 30.0
_READY = re.compile(r"saga web: serving (http://\S+)")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"Debian's chromium is not installed ({CHROMIUM}): apt-get install -y chromium"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install -e '.[dev]' (never `playwright install`)"
    return None


@pytest.fixture(scope="module")
def playwright_session() -> Iterator[Playwright]:
    problem = missing_browser()
    if problem:
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright_session: Playwright) -> Iterator[Browser]:
    launched = playwright_session.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, playwright_session: Playwright) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("browser-stack"), orchestrator_env=ORCHESTRATOR_ENV, faults=FAULTS)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def stub(stack: LocalStack) -> Iterator[pb_grpc.OrchestratorServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


@dataclass(frozen=True)
class Console:
    """A running `saga web` process: its address, and its log for a failing test to show."""

    url: str
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def console(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """`saga web` on a free loopback port, against the stack, as a process of its own."""
    log = tmp_path_factory.mktemp("console") / "saga-web.log"
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", "SAGA_TOKEN": ""}
    command = [sys.executable, "-m", "sagactl.main", "web", "--listen", "127.0.0.1:0", "--address", stack.address,
               "--jaeger-url", JAEGER_URL]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT
        )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (found := _READY.search(log.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"saga web did not start (exit {process.poll()}):\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield Console(found.group(1), log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get(stub: pb_grpc.OrchestratorServiceStub, saga_id: str) -> pb.Saga:
    return stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga


def wait_saga(stub: pb_grpc.OrchestratorServiceStub, saga_id: str, condition: Callable[[pb.Saga], bool]) -> pb.Saga:
    """GetSaga until condition holds; fail with the history after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition(found := get(stub, saga_id)):
        if time.monotonic() > deadline:
            history = "\n".join(f"  {e.seq} {e.type} {e.step} {e.code} {e.message}" for e in found.history)
            pytest.fail(f"saga {saga_id} is {status_name(found.status)} after {WAIT_SECONDS:.0f}s:\n{history}")
        time.sleep(0.05)
    return found


def ended(saga: pb.Saga) -> bool:
    return status_name(saga.status) in ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")


def place_reviewed(stub: pb_grpc.OrchestratorServiceStub) -> pb.Saga:
    """Place an order that waits for its fraud review; the saga once it waits."""
    order_id = new_order_id("web-review")
    saga_id = stub.PlaceOrder(order_request(order_id, minor_units=REVIEWED_MINOR_UNITS), timeout=10).saga_id
    return wait_saga(stub, saga_id, lambda found: any(wait.step == "fraud_review" for wait in found.waits))


@pytest.fixture
def reviewed_saga(stub: pb_grpc.OrchestratorServiceStub) -> Callable[[], pb.Saga]:
    return lambda: place_reviewed(stub)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) for one test."""
    opened = browser.new_context(viewport={"width": 1280, "height": 900})
    opened.set_default_timeout(15_000)
    try:
        yield opened
    finally:
        opened.close()


def log_in(page: Page, console: Console, next_path: str = "/", token: str = OPERATOR_TOKEN) -> None:
    """Log in through the console's form; the page ends on next_path."""
    page.goto(f"{console.url}/login?{urlencode({'next': next_path})}")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{console.url}{next_path}")
