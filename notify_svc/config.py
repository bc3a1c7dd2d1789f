"""Settings of the notification service process."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from svckit.config import ServiceSettings

__all__ = ["NotifySettings"]


class NotifySettings(ServiceSettings):
    """NOTIFY_CHANNEL picks the delivery channel; NOTIFY_DELIVERY_* tune the deliverer (docs/notifications.md)."""

    service_name: str = "notify"
    port: int = Field(50054, ge=0, le=65535)
    notify_channel: Literal["log", "file"] = Field(
        "log", description="how notifications are delivered: log, or file (DATA_DIR/notifications.jsonl)"
    )
    notify_delivery_enabled: bool = Field(
        True,
        description="false: this instance records notifications but delivers none; they wait, PENDING, for "
        "an instance (or a restart) with delivery on. For operations (record while a channel is down) and tests",
    )
    notify_delivery_batch: int = Field(64, ge=1, le=1000, description="notifications claimed per round")
    notify_delivery_poll_seconds: float = Field(
        1.0, gt=0, le=3600, description="how often the deliverer looks for due rows when nothing woke it"
    )
    notify_delivery_timeout_seconds: float = Field(
        5.0, gt=0, le=3600, description="longest one delivery attempt may take; then its outcome is unknown"
    )
    notify_delivery_lease_seconds: float = Field(
        15.0,
        gt=0,
        le=86400,
        description="how long a claim holds its rows; a crashed instance's rows are delivered after it",
    )
    notify_delivery_max_attempts: int = Field(10, ge=1, le=1000, description="attempts before a delivery is FAILED")
    notify_delivery_backoff_initial_seconds: float = Field(
        1.0, gt=0, le=86400, description="pause before the first retry; doubled per attempt, with jitter"
    )
    notify_delivery_backoff_max_seconds: float = Field(
        300.0, gt=0, le=86400, description="longest pause between attempts"
    )

    @field_validator("notify_delivery_lease_seconds")
    @classmethod
    def _lease_outlasts_an_attempt(cls, lease: float, info: ValidationInfo) -> float:
        # A claim that expired while its attempt still runs would let a second instance deliver too.
        timeout = info.data.get("notify_delivery_timeout_seconds")
        if timeout is not None and lease <= timeout:
            raise ValueError(f"must be longer than NOTIFY_DELIVERY_TIMEOUT_SECONDS ({timeout}s)")
        return lease
