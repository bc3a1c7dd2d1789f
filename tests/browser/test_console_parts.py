"""The console's parts that need no browser: filters, the login's guards, listen addresses, timeline and stuck views."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from sagactl.web.security import safe_next, token_problem
from sagactl.web.settings import BadListenAddress, WebSettings, parse_listen
from sagactl.web.timeline import gantt_svg
from sagactl.web.views import BadFilter, ListFilter, node_states, operations_for, why_stuck
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC).timestamp()


def stamp(seconds_before_now: float) -> Timestamp:
    found = Timestamp()
    found.FromNanoseconds(int((NOW - seconds_before_now) * 1e9))
    return found


def test_a_filter_reads_its_query_and_writes_it_back() -> None:
    chosen = ListFilter.parse({"status": ["running,needs_attention", "running"], "key": [" ord- "], "since": ["15m"]})
    assert chosen.statuses == ("running", "needs_attention") and chosen.key_prefix == "ord-"
    request = chosen.request(NOW)
    assert list(request.statuses) == [pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_NEEDS_ATTENTION]
    assert request.business_key_prefix == "ord-" and request.created_after.ToSeconds() == NOW - 900
    assert chosen.query(page="abc") == "status=running&status=needs_attention&key=ord-&since=15m&page=abc"
    at = ListFilter.parse({"until": ["2026-12-01T07:30"]}).request(NOW)
    assert at.created_before.ToSeconds() == datetime(2026, 12, 1, 7, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("query", "field"),
    [({"status": ["sleeping"]}, "status"), ({"since": ["last tuesday"]}, "since"), ({"limit": ["0"]}, "limit")],
)
def test_a_filter_value_it_cannot_read_is_refused_naming_its_field(query: dict[str, list[str]], field: str) -> None:
    with pytest.raises(BadFilter) as refused:
        ListFilter.parse(query)
    assert refused.value.field_name == field


def test_a_login_goes_back_only_to_a_page_of_the_console_and_takes_only_tokens() -> None:
    assert safe_next("/sagas/abc?x=1") == "/sagas/abc?x=1"
    for elsewhere in ("https://evil.test/", "//evil.test/x", "/\\evil.test", "javascript:alert(1)", ""):
        assert safe_next(elsewhere) == "/", elsewhere
    assert token_problem("operator-token-for-tests-0123456789") is None
    for bad in ("short", "has a space in it somewhere", "x" * 2000, "newline\r\nX-Evil: 1 0123456789"):
        assert token_problem(bad), bad


def test_listen_addresses_and_the_session_secret() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    for bad in ("8080", "host:", "host:http", "host:70000"):
        with pytest.raises(BadListenAddress):
            parse_listen(bad)
    assert WebSettings().session_secret != WebSettings().session_secret  # random unless given
    with pytest.raises(ValueError, match="at least 16"):
        WebSettings(session_secret="short")


def _paused_saga() -> pb.Saga:
    step = pb.SagaStep(name="charge_<b>payment</b>", kind="call", state="running", index=0)
    step.attempts.add(direction="action", attempt=1, code="UNAVAILABLE", message="down", started_at=stamp(20),
                      ended_at=stamp(19))  # fmt: skip
    step.attempts.add(direction="action", attempt=2, started_at=stamp(10))
    wait = pb.SagaWait(kind="approval", step="review", signal="reviewer", since=stamp(30), until=stamp(-60))
    return pb.Saga(
        saga_id="a" * 32,
        business_key="<script>alert(1)</script>",
        status=pb.SAGA_STATUS_PAUSED,
        created_at=stamp(40),
        steps=[step, pb.SagaStep(name="review", kind="approval", state="waiting", index=1)],
        waits=[wait],
        history=[pb.HistoryEvent(seq=1, type="SagaPaused", at=stamp(5), actor="alice", message="incident")],
    )


def test_the_timeline_escapes_names_and_draws_attempts_backoffs_waits_and_pauses() -> None:
    drawn = str(gantt_svg(_paused_saga(), NOW))
    assert "<b>" not in drawn and "charge_&lt;b&gt;payment&lt;/b&gt;" in drawn
    assert drawn.count('class="bar attempt action failed"') == 1
    assert drawn.count('class="bar attempt action running"') == 1
    assert drawn.count('class="backoff"') == 1 and 'class="paused"' in drawn
    assert 'class="bar wait open"' in drawn


def test_why_it_stands_names_the_pause_the_wait_and_the_call_on_the_wire() -> None:
    saga = _paused_saga()
    titles = [fact.title for fact in why_stuck(saga, NOW)]
    assert titles[0] == "paused by alice: no call is made until it is resumed"
    assert "waits for an approval of review by role reviewer" in titles
    assert "charge_<b>payment</b>: action attempt 2 is on the wire" in titles
    assert node_states(saga) == {"charge_<b>payment</b>": "running", "review": "waiting"}
    assert [spec.name for spec in operations_for(saga)] == ["resume", "cancel", "terminate"]
