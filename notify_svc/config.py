"""Settings of the notification service process."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from svckit.config import ServiceSettings

__all__ = ["NotifySettings"]


class NotifySettings(ServiceSettings):
    """NOTIFY_CHANNEL picks the delivery channel: "log" (one log line) or "file" (a JSON line file)."""

    service_name: str = "notify"
    port: int = Field(50054, ge=0, le=65535)
    notify_channel: Literal["log", "file"] = Field(
        "log", description="how notifications are delivered: log, or file (DATA_DIR/notifications.jsonl)"
    )
