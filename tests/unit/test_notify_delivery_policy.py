"""notify_svc.delivery's retry schedule and the NOTIFY_DELIVERY_* settings: seeded random, no processes."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from notify_svc.config import NotifySettings
from notify_svc.delivery import DeliveryPolicy, retry_delay

POLICY = DeliveryPolicy(backoff_initial_seconds=1.0, backoff_max_seconds=60.0)


@pytest.mark.parametrize(("attempts", "base"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)])
def test_pause_doubles_per_failed_attempt_up_to_the_cap_within_the_jitter(attempts: int, base: float) -> None:
    rng = random.Random(7)
    pauses = [retry_delay(POLICY, attempts, rng) for _ in range(200)]
    assert all(0.8 * base <= pause <= 1.2 * base for pause in pauses)
    # Jittered: retries of notifications that failed together spread out instead of colliding.
    assert len({round(pause, 6) for pause in pauses}) > 100


def test_policy_comes_from_the_settings() -> None:
    settings = NotifySettings.model_validate(
        {
            "notify_delivery_batch": 5,
            "notify_delivery_max_attempts": 3,
            "notify_delivery_timeout_seconds": 2,
            "notify_delivery_lease_seconds": 3,
        }
    )
    policy = DeliveryPolicy.from_settings(settings)
    assert (policy.batch, policy.max_attempts, policy.timeout_seconds, policy.lease_seconds) == (5, 3, 2.0, 3.0)


def test_a_lease_no_longer_than_an_attempt_is_refused_naming_both_settings() -> None:
    # A lease that ran out while its attempt still ran would let a second instance deliver too.
    with pytest.raises(ValidationError) as refused:
        NotifySettings.model_validate({"notify_delivery_timeout_seconds": 10, "notify_delivery_lease_seconds": 10})
    (error,) = refused.value.errors()
    assert error["loc"] == ("notify_delivery_lease_seconds",)
    assert "NOTIFY_DELIVERY_TIMEOUT_SECONDS" in error["msg"]
