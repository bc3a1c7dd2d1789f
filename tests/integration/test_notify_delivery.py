"""notify's delivery outbox on real processes: delivered after the call, across kill -9, retried, once per row.

Every test runs on a SQLite file and on PostgreSQL, except the two about several instances on one
database, which need PostgreSQL. The file channel is the sink: one JSON line per delivery in
DATA_DIR/notifications.jsonl, which start_process shares between the processes of a test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy

from devstack.launcher import ManagedProcess
from notify_svc.channels import NOTIFICATIONS_FILE_NAME
from sagasuite.common.v1.common_pb2 import LineItem, Money
from sagasuite.notify.v1 import notify_service_pb2 as pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import keyed
from tests.orchestrator_helpers import wait_until

StartProcess = Callable[..., ManagedProcess]

# Long enough that a row delivered within a test was delivered because the commit woke the
# deliverer, not because a poll came round.
NO_POLL = {"NOTIFY_DELIVERY_POLL_SECONDS": "3600"}
# Quick polls and retries, for the tests that wait for a lease to expire or a retry to come due.
QUICK = {
    "NOTIFY_DELIVERY_POLL_SECONDS": "0.3",
    "NOTIFY_DELIVERY_BACKOFF_INITIAL_SECONDS": "0.2",
    "NOTIFY_DELIVERY_BACKOFF_MAX_SECONDS": "0.5",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment that puts notify on a SQLite file in DATA_DIR, or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": request.getfixturevalue("postgres_url")}


def start_notify(start_process: StartProcess, name: str, database: dict[str, str], **env: str) -> ManagedProcess:
    return start_process("notify_svc", name=name, NOTIFY_CHANNEL="file", **database, **env)


def confirmation(order_id: str) -> pb.SendConfirmationRequest:
    return pb.SendConfirmationRequest(
        order_id=order_id,
        recipient="ada@example.com",
        summary=pb.OrderSummary(
            items=[LineItem(sku="LAMP-3", quantity=1)],
            amount=Money(currency_code="EUR", minor_units=990),
            tracking_number="TRK-7",
        ),
    )


def new_order(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sink_path(process: ManagedProcess) -> Path:
    return Path(process.env["DATA_DIR"]) / NOTIFICATIONS_FILE_NAME


def sink_ids(process: ManagedProcess) -> Counter[str]:
    """How many times the file channel delivered each notification id."""
    path = sink_path(process)
    if not path.is_file():
        return Counter()
    return Counter(json.loads(line)["notification_id"] for line in path.read_text().splitlines())


async def send(process: ManagedProcess, order_id: str) -> pb.Notification:
    async with grpc.aio.insecure_channel(process.address) as channel:
        response = await pb_grpc.NotifyServiceStub(channel).SendConfirmation(
            confirmation(order_id), metadata=keyed(f"{order_id}/4/action"), timeout=30
        )
    return response.notification


async def listing(process: ManagedProcess, **filters: object) -> list[pb.Notification]:
    async with grpc.aio.insecure_channel(process.address) as channel:
        request = pb.ListNotificationsRequest(page_size=500, **filters)  # type: ignore[arg-type]
        response = await pb_grpc.NotifyServiceStub(channel).ListNotifications(request, timeout=30)
    return list(response.notifications)


async def delivery(process: ManagedProcess, order_id: str) -> pb.Delivery:
    (notification,) = await listing(process, order_id=order_id)
    return notification.delivery


async def wait_delivered(process: ManagedProcess, order_ids: list[str], *, within: float = 30.0) -> None:
    async def all_delivered() -> bool:
        states = [(await delivery(process, order_id)).state for order_id in order_ids]
        return all(state == pb.DELIVERY_STATE_DELIVERED for state in states)

    await wait_until(all_delivered, f"{len(order_ids)} notifications to show DELIVERED", within=within)


async def test_delivered_right_after_the_commit_and_shown_delivered(
    start_process: StartProcess, database: dict[str, str]
) -> None:
    notify = start_notify(start_process, "notify", database, **NO_POLL)
    order_id = new_order("happy")
    notification = await send(notify, order_id)
    # The response is the recording; delivery follows it and is reported by ListNotifications.
    assert not notification.HasField("delivery")
    await wait_delivered(notify, [order_id])
    shown = await delivery(notify, order_id)
    assert (shown.attempts, shown.last_error) == (1, "")
    assert shown.delivered_at.ToNanoseconds() >= notification.sent_at.ToNanoseconds()
    assert not shown.HasField("next_attempt_at")
    assert sink_ids(notify) == {notification.notification_id: 1}
    (line,) = sink_path(notify).read_text().splitlines()
    assert json.loads(line)["body"] == notification.body


async def test_the_call_returns_without_waiting_for_delivery(
    start_process: StartProcess, database: dict[str, str]
) -> None:
    # Every delivery attempt first sleeps a minute: the call must not be the one waiting.
    slow = {"FAULTS": "Deliver:latency_ms=60000", "NOTIFY_DELIVERY_TIMEOUT_SECONDS": "120"}
    notify = start_notify(start_process, "notify", database, NOTIFY_DELIVERY_LEASE_SECONDS="130", **slow, **NO_POLL)
    order_id = new_order("nowait")
    notification = await send(notify, order_id)

    async def attempt_started() -> bool:
        return (await delivery(notify, order_id)).attempts == 1

    await wait_until(attempt_started, "the woken deliverer to claim the notification")
    shown = await delivery(notify, order_id)
    assert shown.state == pb.DELIVERY_STATE_PENDING
    assert shown.next_attempt_at.ToNanoseconds() > notification.sent_at.ToNanoseconds()
    assert sink_ids(notify) == Counter()


async def test_kill_after_the_commit_before_delivery_then_restart_delivers_once(
    start_process: StartProcess, database: dict[str, str]
) -> None:
    # With delivery off, the process stands exactly where a kill -9 right after a commit leaves it.
    notify = start_notify(start_process, "notify", database, NOTIFY_DELIVERY_ENABLED="false")
    order_ids = [new_order(f"crash{n}") for n in range(3)]
    recorded = [await send(notify, order_id) for order_id in order_ids]
    for order_id in order_ids:
        pending = await delivery(notify, order_id)
        assert (pending.state, pending.attempts) == (pb.DELIVERY_STATE_PENDING, 0)
        assert pending.HasField("next_attempt_at")
    assert sink_ids(notify) == Counter()
    notify.kill()

    notify.env["NOTIFY_DELIVERY_ENABLED"] = "true"
    notify.restart()
    await wait_delivered(notify, order_ids)
    assert sink_ids(notify) == {n.notification_id: 1 for n in recorded}
    # The saga's retry of a call that had committed replays it: same notification, no second delivery.
    again = await send(notify, order_ids[0])
    assert again == recorded[0]
    assert (await delivery(notify, order_ids[0])).attempts == 1
    assert sink_ids(notify) == {n.notification_id: 1 for n in recorded}


async def test_kill_after_the_sink_write_before_it_is_recorded_does_not_deliver_twice(
    start_process: StartProcess, database: dict[str, str]
) -> None:
    # The sink gets the line, then the attempt stalls before its outcome is recorded: the
    # process is killed there. The row comes due when the claim's lease runs out (or the
    # attempt's timeout records it as unknown, if that comes first); the next attempt asks the
    # file whether the line is there before writing it.
    stall = {"FAULTS": "Deliver:reply_delay_ms=60000", "NOTIFY_DELIVERY_TIMEOUT_SECONDS": "2"}
    notify = start_notify(start_process, "notify", database, NOTIFY_DELIVERY_LEASE_SECONDS="3", **stall, **QUICK)
    order_id = new_order("torn")
    notification = await send(notify, order_id)

    async def written() -> bool:
        return sink_ids(notify)[notification.notification_id] == 1

    await wait_until(written, "the sink to receive the line")
    notify.kill()

    del notify.env["FAULTS"]
    notify.restart()
    await wait_delivered(notify, [order_id])
    assert sink_ids(notify) == {notification.notification_id: 1}
    shown = await delivery(notify, order_id)
    assert shown.attempts >= 2
    assert f"notification={notification.notification_id} order={order_id} was delivered by an earlier attempt" in (
        notify.log_path.read_text()
    )


async def test_failing_sink_is_retried_with_backoff_then_delivered(
    start_process: StartProcess, database: dict[str, str], tmp_path: Path
) -> None:
    # A directory where the file should be: every append fails until it is removed.
    broken = tmp_path / "data" / NOTIFICATIONS_FILE_NAME
    broken.mkdir(parents=True)
    notify = start_notify(start_process, "notify", database, NOTIFY_DELIVERY_MAX_ATTEMPTS="1000", **QUICK)
    order_id = new_order("retry")
    notification = await send(notify, order_id)

    async def retried() -> bool:
        return (await delivery(notify, order_id)).attempts >= 3

    await wait_until(retried, "three failed attempts")
    failing = await delivery(notify, order_id)
    assert failing.state == pb.DELIVERY_STATE_PENDING
    assert failing.last_error.startswith("IsADirectoryError")
    assert failing.HasField("next_attempt_at") and not failing.HasField("delivered_at")

    broken.rmdir()
    await wait_delivered(notify, [order_id])
    shown = await delivery(notify, order_id)
    assert shown.attempts >= 3
    assert shown.last_error.startswith("IsADirectoryError")  # the latest failure stays on record
    assert sink_ids(notify) == {notification.notification_id: 1}
    assert "failed, will retry: IsADirectoryError" in notify.log_path.read_text()


async def test_delivery_failing_every_attempt_ends_failed_and_is_listed_for_operators(
    start_process: StartProcess, database: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "data" / NOTIFICATIONS_FILE_NAME).mkdir(parents=True)
    notify = start_notify(start_process, "notify", database, NOTIFY_DELIVERY_MAX_ATTEMPTS="3", **QUICK)
    order_id, other_id = new_order("dead"), new_order("other")
    notification = await send(notify, order_id)

    async def failed_for_good() -> bool:
        return (await delivery(notify, order_id)).state == pb.DELIVERY_STATE_FAILED

    await wait_until(failed_for_good, "the delivery to end FAILED")
    shown = await delivery(notify, order_id)
    assert shown.attempts == 3
    assert shown.last_error.startswith("IsADirectoryError")
    assert not shown.HasField("next_attempt_at") and not shown.HasField("delivered_at")
    await send(notify, other_id)
    failed = await listing(notify, delivery_state=pb.DELIVERY_STATE_FAILED)
    assert [n.notification_id for n in failed] == [notification.notification_id]
    pending = await listing(notify, delivery_state=pb.DELIVERY_STATE_PENDING)
    assert [n.order_id for n in pending] == [other_id]
    log = notify.log_path.read_text()
    assert f"delivery of notification={notification.notification_id} order={order_id} FAILED after 3 attempts" in log


async def test_two_instances_on_one_postgresql_deliver_each_notification_once(
    start_process: StartProcess, postgres_url: str
) -> None:
    database = {"DATABASE_URL": postgres_url}
    recorder = start_notify(start_process, "notify-recorder", database, NOTIFY_DELIVERY_ENABLED="false")
    order_ids = [new_order(f"pair{n}") for n in range(300)]
    for start in range(0, len(order_ids), 50):
        await asyncio.gather(*(send(recorder, order_id) for order_id in order_ids[start : start + 50]))
    # Two deliverers launched together on one backlog, small batches with a slow sink so their
    # claims overlap for seconds; both append to the one shared file.
    contenders = {"NOTIFY_DELIVERY_BATCH": "5", "FAULTS": "Deliver:latency_ms=40", **database, **QUICK}
    deliverers = [
        ManagedProcess(
            name,
            "notify_svc",
            {**recorder.env, **contenders, "NOTIFY_DELIVERY_ENABLED": "true"},
            recorder.log_path.parent,
        )
        for name in ("notify-a", "notify-b")
    ]
    try:
        for process in deliverers:
            process.launch()
        for process in deliverers:
            process.wait_ready()

        async def backlog_delivered() -> bool:
            return not await listing(recorder, delivery_state=pb.DELIVERY_STATE_PENDING)

        await wait_until(backlog_delivered, "the backlog to be delivered", within=90)
    finally:
        for process in deliverers:
            process.stop(timeout=5)
    notifications = await listing(recorder)
    assert len(notifications) == len(order_ids)
    assert {n.delivery.state for n in notifications} == {pb.DELIVERY_STATE_DELIVERED}
    assert {n.delivery.attempts for n in notifications} == {1}
    assert sink_ids(recorder) == {n.notification_id: 1 for n in notifications}


async def test_a_claim_skips_rows_another_claim_holds_on_postgresql(
    start_process: StartProcess, postgres_url: str
) -> None:
    database = {"DATABASE_URL": postgres_url}
    recorder = start_notify(start_process, "notify-recorder", database, NOTIFY_DELIVERY_ENABLED="false")
    order_ids = [new_order(f"skip{n}") for n in range(3)]
    recorded = [await send(recorder, order_id) for order_id in order_ids]
    held = recorded[0].notification_id
    # Another instance's claim in progress: its transaction holds the row's lock.
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as other:
            other.exec_driver_sql(
                "SELECT notification_id FROM notification_delivery WHERE notification_id = %(id)s FOR UPDATE",
                {"id": held},
            )
            deliverer = start_notify(start_process, "notify-deliverer", database, **QUICK)
            await wait_delivered(deliverer, order_ids[1:])
            # Skipped, not waited for: the held row is untouched while the others went out.
            untouched = await delivery(deliverer, order_ids[0])
            assert (untouched.state, untouched.attempts) == (pb.DELIVERY_STATE_PENDING, 0)
            other.rollback()
        await wait_delivered(deliverer, order_ids)
    finally:
        engine.dispose()
    assert sink_ids(recorder) == {n.notification_id: 1 for n in recorded}


async def test_injected_delivery_faults_are_retried_on_the_log_channel(
    start_process: StartProcess, database: dict[str, str]
) -> None:
    notify = start_process(
        "notify_svc", name="notify", NOTIFY_CHANNEL="log", FAULTS="Deliver:fail_first=2", **database, **QUICK
    )
    order_id = new_order("flaky")
    notification = await send(notify, order_id)
    await wait_delivered(notify, [order_id])
    shown = await delivery(notify, order_id)
    assert shown.attempts == 3
    assert "injected fault" in shown.last_error
    lines = notify.log_path.read_text().splitlines()
    assert len([line for line in lines if f"delivered notification={notification.notification_id} " in line]) == 1
    assert len([line for line in lines if f"of notification={notification.notification_id} " in line]) == 2
