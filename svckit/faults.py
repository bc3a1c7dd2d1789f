"""Fault injection for tests and demos: per-method latency and errors, off unless FAULTS is set."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from dataclasses import dataclass

import grpc

from svckit.errors import RetryableError

__all__ = ["FaultInjector", "FaultRule", "parse_faults"]

log = logging.getLogger("sagasuite.faults")


@dataclass(frozen=True)
class FaultRule:
    """What to do to calls of one method (or of every method, for "*").

    reply_delay_first=N limits reply_delay_ms to the first N replies per method and key (0: every
    reply), so a retry with the same key gets its replayed answer in time; latency_first=N limits
    latency_ms to the first N calls per method and key the same way, so a resend is not slowed.
    """

    method: str
    latency_ms: float = 0.0
    latency_first: int = 0
    reply_delay_ms: float = 0.0
    reply_delay_first: int = 0
    error_rate: float = 0.0
    fail_first: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    key_contains: str = ""
    order_contains: str = ""

    def applies_to(self, method: str, key: str, order_id: str = "") -> bool:
        return (
            self.method in ("*", method)
            and (not self.key_contains or self.key_contains in key)
            and (not self.order_contains or self.order_contains in order_id)
        )


_NUMERIC_FIELDS = {
    "latency_ms": float,
    "latency_first": int,
    "reply_delay_ms": float,
    "reply_delay_first": int,
    "error_rate": float,
    "fail_first": int,
}


def parse_faults(spec: str) -> list[FaultRule]:
    """Parse "Method:field=value,field=value;Other:..." into rules; raises ValueError naming the problem."""
    rules: list[FaultRule] = []
    for chunk in filter(None, (part.strip() for part in spec.split(";"))):
        method, _, fields_text = chunk.partition(":")
        if not method or not fields_text:
            raise ValueError(f"FAULTS rule {chunk!r}: expected Method:field=value[,field=value]")
        values: dict[str, object] = {}
        for assignment in fields_text.split(","):
            name, _, raw = assignment.strip().partition("=")
            if name in _NUMERIC_FIELDS:
                try:
                    values[name] = _NUMERIC_FIELDS[name](raw)
                except ValueError as error:
                    raise ValueError(f"FAULTS rule {chunk!r}: {name} must be a number") from error
            elif name == "code":
                try:
                    values[name] = grpc.StatusCode[raw.upper()]
                except KeyError as error:
                    raise ValueError(f"FAULTS rule {chunk!r}: unknown status code {raw!r}") from error
            elif name in ("key_contains", "order_contains"):
                values[name] = raw
            else:
                raise ValueError(f"FAULTS rule {chunk!r}: unknown field {name!r}")
        rule = FaultRule(method=method.strip(), **values)  # type: ignore[arg-type]
        if not 0.0 <= rule.error_rate <= 1.0:
            raise ValueError(f"FAULTS rule {chunk!r}: error_rate must be within 0..1")
        rules.append(rule)
    return rules


class FaultInjector:
    """Applies the rules to calls: delays before the work, errors instead of it, delays after it."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self._rules = rules
        self._calls_by_key: Counter[tuple[str, str]] = Counter()
        self._delayed_by_key: Counter[tuple[str, str]] = Counter()
        self._replies_by_key: Counter[tuple[str, str]] = Counter()

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    async def before(self, method: str, key: str, order_id: str = "") -> None:
        for rule in self._rules:
            if not rule.applies_to(method, key, order_id):
                continue
            if rule.latency_ms:
                self._delayed_by_key[(method, key)] += 1
                if not rule.latency_first or self._delayed_by_key[(method, key)] <= rule.latency_first:
                    # Said when it starts, so that a test can act while the call is on the wire.
                    log.info("injected latency: %s, key %s, sleeps %g ms before its work", method, key,
                             rule.latency_ms)  # fmt: skip
                    await asyncio.sleep(rule.latency_ms / 1000)
            if rule.fail_first:
                self._calls_by_key[(method, key)] += 1
                if self._calls_by_key[(method, key)] <= rule.fail_first:
                    raise RetryableError(f"injected fault: {method} fails its first calls", rule.code)
            if rule.error_rate and random.random() < rule.error_rate:
                raise RetryableError(f"injected fault: {method} error", rule.code)

    async def after(self, method: str, key: str, order_id: str = "") -> None:
        for rule in self._rules:
            if rule.reply_delay_ms and rule.applies_to(method, key, order_id):
                if rule.reply_delay_first:
                    self._replies_by_key[(method, key)] += 1
                    if self._replies_by_key[(method, key)] > rule.reply_delay_first:
                        continue
                log.info("injected reply delay: %s, key %s, holds its reply %g ms after its work", method, key,
                         rule.reply_delay_ms)  # fmt: skip
                await asyncio.sleep(rule.reply_delay_ms / 1000)
