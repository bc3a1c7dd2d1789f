"""The deliverer: claims due rows of the delivery outbox in batches, hands them to the channel, records the outcome.

Guarantees (docs/notifications.md): every committed notification is delivered at least once,
across crashes and restarts; two instances on one database never attempt one row at the same
time (a claim leases its rows; on PostgreSQL `FOR UPDATE SKIP LOCKED` keeps concurrent claims
apart); a failed attempt is retried with exponential backoff and jitter until max_attempts, then
the row is FAILED for an operator. Nothing is held in memory per pending row: rows are claimed by
due time, and a claim whose deliverer dies comes due again when its lease expires.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy import Connection

from notify_svc import store
from notify_svc.channels import Channel
from notify_svc.config import NotifySettings
from notify_svc.service import DeliveryState, Notification
from notify_svc.store import ClaimedDelivery, DeliveryFailure
from svckit.db import Database
from svckit.faults import FaultInjector

__all__ = ["DELIVERIES", "DELIVER_FAULT", "Deliverer", "DeliveryPolicy", "retry_delay"]

# The name FAULTS rules use for delivery attempts, e.g. "Deliver:fail_first=2".
DELIVER_FAULT = "Deliver"
_JITTER = 0.2
_MAX_ERROR_LENGTH = 500

DELIVERIES = Counter(
    "sagasuite_notify_deliveries",
    "Delivery attempts by outcome: delivered, already_delivered (found at the channel), retry, failed (for good)",
    ["outcome"],
)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the deliverer claims, times out and retries (the NOTIFY_DELIVERY_* settings)."""

    batch: int = 64
    poll_seconds: float = 1.0
    timeout_seconds: float = 5.0
    lease_seconds: float = 15.0
    max_attempts: int = 10
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0

    @classmethod
    def from_settings(cls, settings: NotifySettings) -> DeliveryPolicy:
        return cls(
            batch=settings.notify_delivery_batch,
            poll_seconds=settings.notify_delivery_poll_seconds,
            timeout_seconds=settings.notify_delivery_timeout_seconds,
            lease_seconds=settings.notify_delivery_lease_seconds,
            max_attempts=settings.notify_delivery_max_attempts,
            backoff_initial_seconds=settings.notify_delivery_backoff_initial_seconds,
            backoff_max_seconds=settings.notify_delivery_backoff_max_seconds,
        )


def retry_delay(policy: DeliveryPolicy, attempts: int, rng: random.Random) -> float:
    """Seconds to wait after the attempts-th failed attempt: doubling from the initial pause, capped, +-20%."""
    base = min(policy.backoff_max_seconds, policy.backoff_initial_seconds * 2.0 ** min(attempts - 1, 64))
    return base * (1 + _JITTER * (2 * rng.random() - 1))


@dataclass(frozen=True)
class _Outcome:
    claimed: ClaimedDelivery
    error: str = ""
    # The attempt ended without a known outcome (it timed out): it may have delivered.
    uncertain: bool = False
    found_at_channel: bool = False

    @property
    def delivered(self) -> bool:
        return not self.error


def _notification(claimed: ClaimedDelivery) -> Notification:
    row = claimed.notification
    return Notification(row.notification_id, row.order_id, row.recipient, row.channel, row.body, row.sent_at)


class Deliverer:
    """One per process: run() claims and delivers until cancelled; wake() after a commit skips the poll wait."""

    def __init__(
        self,
        database: Database,
        channel: Channel,
        policy: DeliveryPolicy,
        *,
        faults: FaultInjector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._database = database
        self._channel = channel
        self._policy = policy
        self._faults = faults or FaultInjector([])
        self._rng = rng or random.Random()
        self._log = logging.getLogger("sagasuite.notify.delivery")
        # Claims are named instance#n, so the rows of one claim are found again, and an outcome
        # is written only while its claim still holds the row.
        self.instance = f"{socket.gethostname()[:40]}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._claims = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def wake(self) -> None:
        """Look for due rows now: called once a recording has committed."""
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver due rows until cancelled: at once on start (rows left by a previous run), then when woken."""
        self._log.info(
            "deliverer %s started: %s channel, batches of %d, up to %d attempts",
            self.instance,
            self._channel.name,
            self._policy.batch,
            self._policy.max_attempts,
        )
        while True:
            try:
                more = await self.deliver_due()
            except Exception:
                # The database is down or the round broke: the rows stay due (or come due when
                # their lease expires), so the next round delivers them.
                self._log.exception("a delivery round failed; trying again in %.1fs", self._policy.poll_seconds)
                more = False
            if more:
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._policy.poll_seconds)
            except TimeoutError:
                pass
            self._wakeup.clear()

    async def deliver_due(self) -> bool:
        """One round: claim a batch of due rows, deliver them, record the outcomes; True if the batch was full."""
        now = time.time()
        claim = f"{self.instance}#{next(self._claims)}"
        lease_until = now + self._policy.lease_seconds
        limit = self._policy.batch
        claimed = await self._database.transaction(
            lambda connection: store.claim_due(connection, claim, now, lease_until, limit)
        )
        if not claimed:
            return False
        found = await self._found_at_channel([row for row in claimed if row.uncertain])
        outcomes = await asyncio.gather(
            *(
                self._attempt(row) if row.notification.notification_id not in found else self._already(row)
                for row in claimed
            )
        )
        finished = time.time()
        failures = [self._failure(outcome, claim, finished) for outcome in outcomes if not outcome.delivered]
        delivered = [(o.claimed.notification.notification_id, finished) for o in outcomes if o.delivered]

        def record(connection: Connection) -> None:
            store.mark_delivered(connection, delivered, pending=DeliveryState.PENDING, state=DeliveryState.DELIVERED)
            store.record_failures(connection, failures)

        await self._database.transaction(record)
        for outcome in outcomes:
            self._report(outcome)
        retries = [failure.due_at for failure in failures if failure.due_at is not None]
        if retries:
            self._wake_at(min(retries))
        return len(claimed) == limit

    async def _found_at_channel(self, uncertain: list[ClaimedDelivery]) -> set[str]:
        if not uncertain:
            return set()
        ids = [row.notification.notification_id for row in uncertain]
        try:
            return await asyncio.to_thread(self._channel.delivered_among, ids)
        except Exception:
            # Not knowing is no reason to hold the delivery back: at least once, as promised.
            self._log.exception("could not ask the %s channel what it delivered; delivering again", self._channel.name)
            return set()

    async def _already(self, claimed: ClaimedDelivery) -> _Outcome:
        return _Outcome(claimed, found_at_channel=True)

    async def _attempt(self, claimed: ClaimedDelivery) -> _Outcome:
        notification = _notification(claimed)
        key, order_id = notification.notification_id, notification.order_id
        try:
            async with asyncio.timeout(self._policy.timeout_seconds):
                await self._faults.before(DELIVER_FAULT, key, order_id)
                await self._channel.deliver(notification)
                await self._faults.after(DELIVER_FAULT, key, order_id)
        except TimeoutError:
            reason = f"TimeoutError: the attempt did not finish within {self._policy.timeout_seconds:g}s"
            return _Outcome(claimed, error=reason, uncertain=True)
        except Exception as error:
            return _Outcome(claimed, error=f"{type(error).__name__}: {error}"[:_MAX_ERROR_LENGTH])
        return _Outcome(claimed)

    def _failure(self, outcome: _Outcome, claim: str, now: float) -> DeliveryFailure:
        attempts = outcome.claimed.attempts
        notification_id = outcome.claimed.notification.notification_id
        if attempts >= self._policy.max_attempts:
            return DeliveryFailure(notification_id, claim, DeliveryState.FAILED, None, outcome.error, outcome.uncertain)
        due_at = now + retry_delay(self._policy, attempts, self._rng)
        return DeliveryFailure(notification_id, claim, DeliveryState.PENDING, due_at, outcome.error, outcome.uncertain)

    def _report(self, outcome: _Outcome) -> None:
        row = outcome.claimed.notification
        attempts = outcome.claimed.attempts
        if outcome.found_at_channel:
            DELIVERIES.labels("already_delivered").inc()
            self._log.info(
                "notification=%s order=%s was delivered by an earlier attempt whose outcome was lost; not resent",
                row.notification_id,
                row.order_id,
            )
        elif outcome.delivered:
            DELIVERIES.labels("delivered").inc()
        elif attempts >= self._policy.max_attempts:
            DELIVERIES.labels("failed").inc()
            self._log.error(
                "delivery of notification=%s order=%s FAILED after %d attempts, last error: %s; "
                "ListNotifications with delivery_state=FAILED lists it (docs/notifications.md)",
                row.notification_id,
                row.order_id,
                attempts,
                outcome.error,
            )
        else:
            DELIVERIES.labels("retry").inc()
            self._log.warning(
                "delivery attempt %d of notification=%s order=%s failed, will retry: %s",
                attempts,
                row.notification_id,
                row.order_id,
                outcome.error,
            )

    def _wake_at(self, when: float) -> None:
        # One timer for the earliest retry this process scheduled; later ones are found by the
        # round that timer starts, or by the poll.
        delay = when - time.time()
        if delay >= self._policy.poll_seconds or when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._wakeup.set()
