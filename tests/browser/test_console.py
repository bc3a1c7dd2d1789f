"""The web console in Debian's chromium: list, saga page, login, live approval, graph and timeline, CSRF, escaping."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.browser.conftest import JAEGER_URL, Console, ended, get, log_in, place_reviewed, wait_saga
from tests.orchestrator_helpers import OPERATOR_TOKEN, new_order_id, order_request, status_name

# Without playwright the module still loads: the browser fixture then skips each test, saying what is missing.
if TYPE_CHECKING or importlib.util.find_spec("playwright") is not None:
    from playwright.sync_api import BrowserContext, FloatRect, Page, expect

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
SCRIPT_KEY = "<script>alert(1)</script>"
LIVE = 30_000  # ms: how long a page may take to show what the saga did


def probe(stub: pb_grpc.OrchestratorServiceStub, key: str) -> pb.Saga:
    """A MarkupProbe saga (a four-minute timer) whose business key is `key`."""
    request = pb.StartSagaRequest(saga_type="MarkupProbe")
    order = order_request(new_order_id("probe"))
    order.shipping_address.recipient_name = key
    request.input.Pack(order)
    return get(stub, stub.StartSaga(request, timeout=10).saga_id)


@pytest.fixture(scope="module")
def orders(stub: pb_grpc.OrchestratorServiceStub) -> dict[str, pb.Saga]:
    """The sagas the list shows: one completed (with its child), one compensated after two retries, one waiting for
    its fraud review, and one probe with a <script> business key."""
    found = {"waiting": place_reviewed(stub)}
    completed = stub.PlaceOrder(order_request(new_order_id("web-ok")), timeout=10).saga_id
    declined = stub.PlaceOrder(order_request(new_order_id("web-flaky"), token="tok_declined"), timeout=10).saga_id
    found["probe"] = probe(stub, SCRIPT_KEY)
    found["completed"] = wait_saga(stub, completed, ended)
    found["compensated"] = wait_saga(stub, declined, ended)
    assert status_name(found["compensated"].status) == "COMPENSATED"
    return found


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    opened = context.new_page()
    # A dialog the console did not ask for (an alert from saga data) fails the test; its own confirms are accepted.
    opened.on("dialog", lambda dialog: dialog.accept() if dialog.type == "confirm" else pytest.fail(dialog.message))
    yield opened


def test_the_list_counts_filters_and_looks_sagas_up(page: Page, console: Console, orders: dict[str, pb.Saga]) -> None:
    response = page.goto(console.url)
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    expect(page.locator('.count[data-status="COMPENSATED"] .count-number')).not_to_have_text("0")
    for saga in orders.values():
        expect(page.locator(f'#sagas tr[data-saga-id="{saga.saga_id}"]')).to_be_visible()
    page.screenshot(path=str(IMAGES / "web-list.png"), full_page=True)

    page.check("#filters input[name=status][value=compensated]")
    page.click("#filters button[type=submit]")
    expect(page.locator("#sagas tbody tr")).not_to_have_count(0)
    for row in page.locator("#sagas tbody tr .status").all():
        expect(row).to_have_text("COMPENSATED")
    expect(page.locator(f'#sagas tr[data-saga-id="{orders["completed"].saga_id}"]')).to_have_count(0)

    # A short id is enough, and so is a business key.
    compensated = orders["compensated"]
    page.fill(".lookup input[name=q]", compensated.saga_id[:8])
    page.press(".lookup input[name=q]", "Enter")
    page.wait_for_url(f"{console.url}/sagas/{compensated.saga_id}")
    page.fill(".lookup input[name=q]", orders["completed"].business_key)
    page.press(".lookup input[name=q]", "Enter")
    page.wait_for_url(f"{console.url}/sagas/{orders['completed'].saga_id}")
    missing = page.goto(f"{console.url}/lookup?q=no-such-order-anywhere")
    assert missing is not None and missing.status == 404
    expect(page.locator("#list-problem")).to_contain_text("no saga has the id, id prefix or business key")
    bad = page.goto(f"{console.url}/?since=yesterday-ish")
    assert bad is not None and bad.status == 400
    expect(page.locator("#list-problem")).to_contain_text("since:")


def test_a_compensated_saga_shows_graph_states_and_timeline(
    page: Page, console: Console, orders: dict[str, pb.Saga]
) -> None:
    saga = orders["compensated"]
    page.goto(f"{console.url}/sagas/{saga.saga_id}")
    expect(page.locator("#saga-status")).to_have_text("COMPENSATED")
    expect(page.locator("#live-indicator")).to_have_attribute("data-state", "ended")
    graph = page.locator("#graph")
    expect(graph.locator('g[data-node="reserve_stock"]')).to_have_attribute("data-state", "compensated")
    expect(graph.locator('g[data-node="charge_payment"]')).to_have_attribute("data-state", "failed")
    expect(graph.locator('g[data-node="reserve_and_charge"]')).to_have_attribute("data-state", "failed")
    for skipped in ("fraud_review", "fulfilment"):
        expect(graph.locator(f'g[data-node="{skipped}"]')).to_have_attribute("data-state", "skipped")
    expect(graph.locator("g.node .compensation-edge")).to_have_count(2)

    timeline = page.locator("#timeline")
    # Two injected UNAVAILABLEs and the decline, with a backoff before each retry; the stock released once.
    expect(timeline.locator('rect.attempt.action.failed[data-step="charge_payment"]')).to_have_count(3)
    expect(timeline.locator('line.backoff[data-step="charge_payment"]')).to_have_count(2)
    expect(timeline.locator('rect.attempt.action.ok[data-step="reserve_stock"]')).to_have_count(1)
    expect(timeline.locator('rect.attempt.compensation.ok[data-step="reserve_stock"]')).to_have_count(1)
    expect(timeline.locator("line.compensation-start")).to_have_count(1)

    expect(page.locator('#history tr[data-type="CompensationSucceeded"]')).to_contain_text("reserve_stock")
    expect(page.locator('#history tr[data-type="StepFailed"]').last).to_contain_text("FAILED_PRECONDITION")
    expect(page.locator("#part-results")).to_contain_text("reservation_id")
    expect(page.locator("#trace-link")).to_have_attribute("href", f"{JAEGER_URL}/trace/{saga.trace_id}")
    # The page down to the steps table: header, where it stands, the graph, the timeline and the steps.
    box = page.locator("#part-steps").bounding_box()
    assert box is not None
    clip: FloatRect = {"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 16}
    page.screenshot(path=str(IMAGES / "web-saga-compensated.png"), full_page=True, clip=clip)


def test_list_saga_login_approve_and_the_page_follows_live(
    browser_pages: Callable[[], Page], console: Console, stub: pb_grpc.OrchestratorServiceStub,
    reviewed_saga: Callable[[], pb.Saga],
) -> None:  # fmt: skip
    saga = reviewed_saga()
    # A second person has the page open, read-only; it must follow the saga without a reload.
    watcher = browser_pages()
    watcher.goto(f"{console.url}/sagas/{saga.saga_id}")
    expect(watcher.locator("#live-indicator")).to_have_attribute("data-state", "live")
    expect(watcher.locator("#why-stuck")).to_contain_text("waits for an approval of fraud_review by role reviewer")
    watcher.evaluate("window.notReloaded = true")

    operator = browser_pages()
    operator.goto(f"{console.url}/?key={saga.business_key}")
    operator.click(f'#sagas tr[data-saga-id="{saga.saga_id}"] a')
    operator.wait_for_url(f"{console.url}/sagas/{saga.saga_id}")
    expect(operator.locator("#read-only-note")).to_be_visible()
    operator.click("#read-only-note a")
    operator.fill("#token", OPERATOR_TOKEN)
    operator.click("#login-form button[type=submit]")
    operator.wait_for_url(f"{console.url}/sagas/{saga.saga_id}")
    expect(operator.locator("#flash")).to_contain_text("logged in")
    operator.fill("#approval-fraud_review input[name=reason]", "known customer")
    operator.click("#approve")
    expect(operator.locator("#flash")).to_contain_text("fraud_review approved")
    expect(operator.locator("#saga-status")).to_have_text("COMPLETED", timeout=LIVE)

    expect(watcher.locator("#saga-status")).to_have_text("COMPLETED", timeout=LIVE)
    expect(watcher.locator('#history tr[data-type="SagaCompleted"]')).to_have_count(1)
    expect(watcher.locator('#history tr[data-type="ApprovalDecided"] .actor')).to_have_text("operator")
    expect(watcher.locator("#live-indicator")).to_have_attribute("data-state", "ended")
    assert watcher.evaluate("window.notReloaded") is True
    assert status_name(get(stub, saga.saga_id).status) == "COMPLETED"

    # The child saga is linked from the timeline, and links back to its parent.
    watcher.click("#timeline a.child-link")
    expect(watcher.locator("#parent-link")).to_have_text(saga.saga_id)
    expect(watcher.locator("#saga-status")).to_have_text("COMPLETED")


@pytest.fixture
def browser_pages(context: BrowserContext) -> Iterator[Callable[[], Page]]:
    """Pages of separate browser profiles (each with its own cookies), closed after the test."""
    from playwright.sync_api import Browser

    browser = context.browser
    assert isinstance(browser, Browser)
    opened: list[BrowserContext] = []

    def new_page() -> Page:
        profile = browser.new_context(viewport={"width": 1280, "height": 900})
        profile.set_default_timeout(15_000)
        opened.append(profile)
        return profile.new_page()

    yield new_page
    for profile in opened:
        profile.close()


def test_without_a_login_the_console_is_read_only(
    page: Page, context: BrowserContext, console: Console, stub: pb_grpc.OrchestratorServiceStub,
    reviewed_saga: Callable[[], pb.Saga],
) -> None:  # fmt: skip
    saga = reviewed_saga()
    page.goto(f"{console.url}/sagas/{saga.saga_id}")
    expect(page.locator("#read-only-note")).to_be_visible()
    expect(page.locator("#part-actions form")).to_have_count(0)
    expect(page.locator("#login-state")).to_have_text("read-only")
    refused = context.request.post(
        f"{console.url}/sagas/{saga.saga_id}/decide", form={"decision": "approve", "step": "fraud_review"}
    )
    assert refused.status == 403 and "read-only" in refused.text()
    batch = context.request.get(f"{console.url}/batch?operation=terminate")
    assert batch.status == 403
    assert get(stub, saga.saga_id).waits, "a refused form changed the saga"
    # A token the orchestrator does not know is taken at the login; the call that uses it says so.
    log_in(page, console, f"/sagas/{saga.saga_id}", token="not-a-known-token-0123456789")
    page.click("#approve")
    expect(page.locator("#flash")).to_contain_text("refused (UNAUTHENTICATED INVALID_TOKEN)")
    assert get(stub, saga.saga_id).waits, "a refused decision changed the saga"


def test_forms_without_the_csrf_token_are_refused(
    page: Page, context: BrowserContext, console: Console, stub: pb_grpc.OrchestratorServiceStub,
    reviewed_saga: Callable[[], pb.Saga],
) -> None:  # fmt: skip
    saga = reviewed_saga()
    log_in(page, console, f"/sagas/{saga.saga_id}")
    (cookie,) = [cookie for cookie in context.cookies() if cookie["name"] == "saga_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert OPERATOR_TOKEN not in page.url and OPERATOR_TOKEN not in page.content()
    decide = f"{console.url}/sagas/{saga.saga_id}/decide"
    forms: list[dict[str, str | float | bool]] = [
        {"decision": "approve", "step": "fraud_review"},
        {"decision": "approve", "step": "fraud_review", "csrf_token": "forged"},
    ]
    for form in forms:
        refused = context.request.post(decide, form=form)
        assert refused.status == 403 and "CSRF" in refused.text(), refused.text()
    other_site = context.request.post(
        decide,
        form={"decision": "approve", "step": "fraud_review",
              "csrf_token": page.locator("#approval-fraud_review input[name=csrf_token]").input_value()},
        headers={"origin": "http://evil.test"},
    )  # fmt: skip
    assert other_site.status == 403
    assert get(stub, saga.saga_id).waits, "a refused form changed the saga"
    # The page's own form goes through; a refusal by the orchestrator is shown with its status and reason.
    page.click("#reject")
    expect(page.locator("#flash")).to_contain_text("fraud_review rejected")
    wait_saga(stub, saga.saga_id, ended)
    page.goto(f"{console.url}/sagas/{saga.saga_id}")
    expect(page.locator("#saga-status")).to_have_text("COMPENSATED")
    expect(page.locator("#part-actions")).to_contain_text("The saga has ended")
    answer = context.request.post(
        f"{console.url}/sagas/{saga.saga_id}/operate",
        form={"operation": "retry", "csrf_token": page.locator("form[action='/logout'] input").input_value()},
    )
    # Followed to the saga's page, which says what the orchestrator answered.
    assert answer.ok and "retry was not done: refused (FAILED_PRECONDITION" in answer.text(), answer.text()


def test_a_script_in_a_business_key_is_shown_as_text(page: Page, console: Console, orders: dict[str, pb.Saga]) -> None:
    saga = orders["probe"]
    page.goto(f"{console.url}/?type=MarkupProbe")
    expect(page.locator(f'#sagas tr[data-saga-id="{saga.saga_id}"] td.key')).to_have_text(SCRIPT_KEY)
    page.goto(f"{console.url}/sagas/{saga.saga_id}")
    expect(page.locator("#saga-key")).to_have_text(SCRIPT_KEY)
    expect(page.locator("#saga-input")).to_contain_text(SCRIPT_KEY)
    # The page's only script is the console's own file; the key is in the HTML as escaped text.
    assert page.eval_on_selector_all("script", "nodes => nodes.map(node => node.getAttribute('src'))") == [
        "/static/console.js"
    ]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.content()


def test_a_batch_lists_the_sagas_before_it_acts(
    page: Page, console: Console, stub: pb_grpc.OrchestratorServiceStub
) -> None:
    prefix = new_order_id("batch")
    sagas = [probe(stub, f"{prefix}-{number}") for number in (1, 2)]
    log_in(page, console, f"/?type=MarkupProbe&key={prefix}")
    page.select_option("#batch select[name=operation]", "terminate")
    page.click("#batch-review")
    expect(page.locator("#batch-sagas tbody tr")).to_have_count(2)
    assert all(status_name(get(stub, saga.saga_id).status) == "RUNNING" for saga in sagas), "listing acted"
    page.fill("#batch-run input[name=reason]", "cleaning up the probes")
    page.click("#batch-confirm")
    expect(page.locator("#batch-summary")).to_have_text("terminate: 2 done, 0 refused")
    for saga in sagas:
        after = get(stub, saga.saga_id)
        assert status_name(after.status) == "TERMINATED"
        assert any(
            event.type == "SagaTerminated" and event.message == "cleaning up the probes" for event in after.history
        )


def test_an_unknown_saga_is_a_clear_error_page(page: Page, console: Console) -> None:
    response = page.goto(f"{console.url}/sagas/{'f' * 32}")
    assert response is not None and response.status == 404
    expect(page.locator("#problem-message")).to_contain_text("NOT_FOUND")
    assert "Traceback" not in page.content()
