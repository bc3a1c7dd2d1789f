"""Delivery channels for notifications: a small protocol, a log channel and a JSON-lines file channel.

Every delivery carries the notification id, so a receiver can drop the rare second delivery of
one notification (delivery is at least once: see notify_svc.delivery).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from notify_svc.service import Notification

__all__ = ["NOTIFICATIONS_FILE_NAME", "Channel", "FileChannel", "LogChannel", "make_channel"]

NOTIFICATIONS_FILE_NAME = "notifications.jsonl"


class Channel(Protocol):
    """Where a recorded notification goes; deliver() is called at least once per notification."""

    @property
    def name(self) -> str:
        """The short name stored with each notification, e.g. "log"."""
        ...

    async def deliver(self, notification: Notification) -> None:
        """Hand the notification over; raising means it was not delivered (it is retried)."""
        ...

    def delivered_among(self, notification_ids: Collection[str]) -> set[str]:
        """Those of the ids the channel can show were delivered already; blocking, run in a thread.

        Asked only before retrying an attempt whose outcome is unknown (its process died or it
        timed out), so that a channel able to tell is not given a notification twice. A channel
        that cannot tell returns an empty set, and that notification is delivered again.
        """
        ...


class LogChannel:
    """Delivers by writing one log line with the rendered body (the default)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("sagasuite.notify.delivery")

    @property
    def name(self) -> str:
        return "log"

    async def deliver(self, notification: Notification) -> None:
        self._log.info(
            "delivered notification=%s order=%s to=%s body=%r",
            notification.notification_id,
            notification.order_id,
            notification.recipient,
            notification.body,
        )

    def delivered_among(self, notification_ids: Collection[str]) -> set[str]:
        return set()  # a log line cannot be read back


# The line's first key, written by FileChannel.deliver; found without parsing every line as JSON.
_LINE_ID = re.compile(rb'^\{"notification_id":"([^"]+)"')


class FileChannel:
    """Delivers by appending one JSON line per notification to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return "file"

    async def deliver(self, notification: Notification) -> None:
        line = json.dumps(
            {
                "notification_id": notification.notification_id,
                "order_id": notification.order_id,
                "recipient": notification.recipient,
                "channel": notification.channel,
                "body": notification.body,
                "sent_at": datetime.fromtimestamp(notification.sent_at, UTC).isoformat(),
            },
            separators=(",", ":"),
        )
        # One O_APPEND write per line: lines from concurrent calls, or from several processes
        # sharing the file, never interleave. A local append takes microseconds, so it runs
        # on the event loop rather than paying a thread hop.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (line + "\n").encode())
        finally:
            os.close(descriptor)

    def delivered_among(self, notification_ids: Collection[str]) -> set[str]:
        wanted = {notification_id.encode() for notification_id in notification_ids}
        found: set[str] = set()
        try:
            with open(self.path, "rb") as lines:
                for line in lines:
                    match = _LINE_ID.match(line)
                    if match and match.group(1) in wanted:
                        found.add(match.group(1).decode())
        except FileNotFoundError:
            pass
        return found


def make_channel(kind: str, data_dir: Path) -> Channel:
    """The channel NOTIFY_CHANNEL names: "log", or "file" writing DATA_DIR/notifications.jsonl."""
    if kind == "log":
        return LogChannel()
    if kind == "file":
        return FileChannel(data_dir / NOTIFICATIONS_FILE_NAME)
    raise ValueError(f"unknown notification channel {kind!r}; expected log or file")
