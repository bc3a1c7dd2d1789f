"""svckit.faults: FAULTS parsing with errors naming the bad rule, and the injector's latency and errors."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from svckit.errors import RetryableError
from svckit.faults import FaultInjector, FaultRule, parse_faults


def test_parses_every_field_of_several_rules() -> None:
    rules = parse_faults(
        " Charge:latency_ms=25,reply_delay_ms=5.5,error_rate=0.25,fail_first=2,"
        "code=aborted,key_contains=ord-7 ;"
        "*:error_rate=1 ;"
    )
    assert rules == [
        FaultRule(
            method="Charge",
            latency_ms=25.0,
            reply_delay_ms=5.5,
            error_rate=0.25,
            fail_first=2,
            code=grpc.StatusCode.ABORTED,
            key_contains="ord-7",
        ),
        FaultRule(method="*", error_rate=1.0),
    ]


@pytest.mark.parametrize("spec", ["", "  ", ";", " ; ; "])
def test_empty_spec_means_no_rules(spec: str) -> None:
    assert parse_faults(spec) == []
    assert not FaultInjector(parse_faults(spec)).enabled


def test_defaults_are_harmless() -> None:
    (rule,) = parse_faults("Charge:key_contains=x")
    assert (rule.latency_ms, rule.reply_delay_ms, rule.error_rate, rule.fail_first) == (0, 0, 0, 0)
    assert rule.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("bad_rule", "problem"),
    [
        ("Charge", "expected Method:field=value"),
        ("Charge:", "expected Method:field=value"),
        (":latency_ms=5", "expected Method:field=value"),
        ("Charge:latency=5", "unknown field 'latency'"),
        ("Charge:latency_ms=fast", "latency_ms must be a number"),
        ("Charge:fail_first=1.5", "fail_first must be a number"),
        ("Charge:latency_ms", "latency_ms must be a number"),
        ("Charge:code=BROKEN", "unknown status code 'BROKEN'"),
        ("Charge:error_rate=1.5", "error_rate must be within 0..1"),
        ("Charge:error_rate=-0.1", "error_rate must be within 0..1"),
    ],
)
def test_errors_name_the_bad_rule(bad_rule: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_faults(f"Refund:latency_ms=1;{bad_rule};Ship:error_rate=0")
    message = str(caught.value)
    assert repr(bad_rule) in message
    assert problem in message
    assert "Refund" not in message and "Ship" not in message


async def _outcomes(injector: FaultInjector, method: str, key: str, calls: int) -> list[str]:
    """'ok' or the injected status code name, per call."""
    outcomes = []
    for _ in range(calls):
        try:
            await injector.before(method, key)
            outcomes.append("ok")
        except RetryableError as error:
            outcomes.append(error.code.name)
    return outcomes


async def test_fail_first_counts_per_method_and_key() -> None:
    injector = FaultInjector(parse_faults("Charge:fail_first=2,code=resource_exhausted"))
    assert injector.enabled
    first_key = await _outcomes(injector, "Charge", "saga-1/charge/action", 4)
    assert first_key == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "ok", "ok"]
    # Another key has its own count: its first calls fail too.
    second_key = await _outcomes(injector, "Charge", "saga-2/charge/action", 3)
    assert second_key == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "ok"]
    # Other methods are untouched.
    assert await _outcomes(injector, "Refund", "saga-3/charge/compensation", 2) == ["ok", "ok"]


async def test_wildcard_rule_applies_to_every_method() -> None:
    injector = FaultInjector(parse_faults("*:fail_first=1"))
    assert await _outcomes(injector, "Charge", "k", 2) == ["UNAVAILABLE", "ok"]
    assert await _outcomes(injector, "ReserveStock", "k", 2) == ["UNAVAILABLE", "ok"]


async def test_key_contains_limits_the_rule_to_matching_keys() -> None:
    injector = FaultInjector(parse_faults("Charge:error_rate=1,key_contains=/charge/action"))
    assert await _outcomes(injector, "Charge", "saga-1/charge/action", 3) == ["UNAVAILABLE"] * 3
    assert await _outcomes(injector, "Charge", "saga-1/reserve/action", 3) == ["ok"] * 3
    assert await _outcomes(injector, "Charge", "", 1) == ["ok"]


async def test_error_rate_zero_never_fails() -> None:
    injector = FaultInjector(parse_faults("Charge:error_rate=0"))
    assert await _outcomes(injector, "Charge", "k", 500) == ["ok"] * 500


async def test_error_rate_one_always_fails_with_the_configured_code() -> None:
    injector = FaultInjector(parse_faults("Charge:error_rate=1,code=DEADLINE_EXCEEDED"))
    assert await _outcomes(injector, "Charge", "k", 200) == ["DEADLINE_EXCEEDED"] * 200
    with pytest.raises(RetryableError, match="injected fault: Charge"):
        await injector.before("Charge", "k")


async def test_latency_is_applied_before_the_call() -> None:
    injector = FaultInjector(parse_faults("Charge:latency_ms=60"))
    started = time.monotonic()
    await injector.before("Charge", "k")
    assert time.monotonic() - started >= 0.05
    # Other methods are not delayed, and after() adds nothing without reply_delay_ms.
    await injector.before("Refund", "k")
    await injector.after("Charge", "k")


async def test_latency_comes_before_an_injected_error() -> None:
    injector = FaultInjector(parse_faults("Charge:latency_ms=60,error_rate=1"))
    started = time.monotonic()
    with pytest.raises(RetryableError):
        await injector.before("Charge", "k")
    assert time.monotonic() - started >= 0.05


async def test_reply_delay_is_applied_after_the_call() -> None:
    injector = FaultInjector(parse_faults("Charge:reply_delay_ms=60,key_contains=slow"))
    started = time.monotonic()
    await injector.after("Charge", "a-slow-key")
    assert time.monotonic() - started >= 0.05
    # before() is not delayed by reply_delay_ms; a key without the marker is not delayed at all.
    await injector.before("Charge", "a-slow-key")
    await injector.after("Charge", "fast")


async def test_reply_delay_first_delays_only_the_first_replies_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    (rule,) = parse_faults("Charge:reply_delay_ms=2500,reply_delay_first=1")
    assert rule.reply_delay_first == 1
    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("svckit.faults.asyncio.sleep", record_sleep)
    injector = FaultInjector([rule])
    await injector.after("Charge", "saga-1/charge/action")
    assert slept == [2.5]
    # The retry with the same key is answered at once; another key has its own first reply delayed.
    await injector.after("Charge", "saga-1/charge/action")
    await injector.after("Charge", "saga-1/charge/action")
    assert slept == [2.5]
    await injector.after("Charge", "saga-2/charge/action")
    assert slept == [2.5, 2.5]
    # Without reply_delay_first every reply is delayed.
    every = FaultInjector(parse_faults("Charge:reply_delay_ms=10"))
    for _ in range(3):
        await every.after("Charge", "saga-1/charge/action")
    assert slept == [2.5, 2.5, 0.01, 0.01, 0.01]


def test_a_bad_faults_setting_is_one_configuration_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from payment_svc.config import PaymentSettings
    from svckit.config import load_settings

    monkeypatch.setenv("FAULTS", "Charge:latency_ms=soon")
    with pytest.raises(SystemExit) as stopped:
        load_settings(PaymentSettings)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("configuration error:")
    assert "FAULTS" in error and "latency_ms must be a number" in error
    assert "Traceback" not in error


async def test_latency_first_delays_only_the_first_calls_of_each_key(monkeypatch: pytest.MonkeyPatch) -> None:
    (rule,) = parse_faults("Reserve:latency_ms=50,latency_first=1")
    assert rule.latency_first == 1
    injector = FaultInjector([rule])
    slept: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    for key in ("k1", "k1", "k2", "k1"):
        await injector.before("Reserve", key)
    # The first call of k1 and the first of k2 wait; the resends of k1 do not.
    assert slept == [0.05, 0.05]
