"""Two instances of inventory and two of payment, each pair on one PostgreSQL database, under concurrent load.

They must never deadlock (PostgreSQL's own deadlock counter for the database stays at zero), every
call must end OK or with a domain refusal, and the books must balance: no stock oversold, reserved
totals equal to the live reservations, at most one charge and one refund per order.

The load is bounded: TWO_INSTANCE_ORDERS orders (default 400) from TWO_INSTANCE_CONCURRENCY
concurrent clients (default 48). The deadlock counts are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import sqlalchemy

from devstack.launcher import ManagedProcess
from inventory_svc.config import DEFAULT_CATALOGUE
from sagasuite.common.v1.common_pb2 import LineItem, Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from svckit.validation import decode_lines
from tests.grpc_helpers import keyed
from tests.orchestrator_helpers import fresh_postgres_database

ORDERS = int(os.environ.get("TWO_INSTANCE_ORDERS", "400"))
CONCURRENCY = int(os.environ.get("TWO_INSTANCE_CONCURRENCY", "48"))
# The share of orders whose reservation and charge are sent to both instances at once.
DUPLICATES = float(os.environ.get("TWO_INSTANCE_DUPLICATES", "0.1"))
CALL_TIMEOUT = 60.0
# Overlapping SKUs every order draws from; LAMP-3 (500 in stock) runs out, and a few orders want RARE-1 (one).
SKUS = ["BOOK-001", "MUG-042", "TEE-007", "LAMP-3"]
OK = grpc.StatusCode.OK
REFUSED = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Outcomes:
    """What every call answered, by method and code, and the calls that answered anything else."""

    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    charged: set[str] = field(default_factory=set)
    refunded: set[str] = field(default_factory=set)

    async def call(self, method: str, order_id: str, invoke: Callable[[], Awaitable[object]]) -> object | None:
        try:
            response = await invoke()
        except grpc.aio.AioRpcError as error:
            self.codes[(method, error.code().name)] += 1
            if error.code() != REFUSED:
                self.unexpected.append(f"{method} {order_id}: {error.code().name} {error.details()}")
            return None
        self.codes[(method, OK.name)] += 1
        return response


def _deadlocks(url: str) -> int:
    """PostgreSQL's count of deadlocks detected in the database, once its clients have gone (stats are flushed then)."""
    database = url.rsplit("/", 1)[1]
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            deadline = time.monotonic() + 30
            others = sqlalchemy.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            )
            while connection.execute(others, {"d": database}).scalar_one() and time.monotonic() < deadline:
                time.sleep(0.1)
            connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            query = sqlalchemy.text("SELECT deadlocks FROM pg_stat_database WHERE datname = :d")
            return int(connection.execute(query, {"d": database}).scalar_one())
    finally:
        engine.dispose()


def _deadlock_lines(processes: list[ManagedProcess]) -> list[str]:
    return [
        f"{process.name}: {line}"
        for process in processes
        for line in process.log_path.read_text(errors="replace").splitlines()
        if "deadlock" in line.lower() or "40P01" in line
    ]


async def _hammer(
    inventory: list[inventory_grpc.InventoryServiceAsyncStub], payment: list[payment_grpc.PaymentServiceAsyncStub]
) -> Outcomes:
    outcomes = Outcomes()
    orders = iter(range(ORDERS))

    async def one_order(number: int, rng: random.Random) -> None:
        order_id = f"order-{number}"
        here, there = rng.sample([0, 1], 2)
        skus = rng.sample(SKUS, k=rng.randint(1, 4))  # not sorted: the service must order its locks itself
        if rng.random() < 0.05:
            skus.insert(rng.randint(0, len(skus)), "RARE-1")
        lines = [LineItem(sku=sku, quantity=rng.randint(1, 3)) for sku in skus]
        reserve = inventory_pb.ReserveStockRequest(order_id=order_id, items=lines)
        release = inventory_pb.ReleaseStockRequest(order_id=order_id, reason="test")
        token = "tok_declined" if rng.random() < 0.1 else "tok_visa"
        charge = payment_pb.ChargeRequest(
            order_id=order_id, amount=Money(currency_code="EUR", minor_units=100 + number), payment_token=token
        )
        refund = payment_pb.RefundRequest(order_id=order_id, reason="test")

        def on(stub: object, method: str, request: object, key: str) -> Callable[[], Awaitable[object]]:
            return lambda: getattr(stub, method)(request, metadata=keyed(f"{order_id}/{key}"), timeout=CALL_TIMEOUT)

        if rng.random() < 0.1:
            # Compensated before it ran: the late reservation and charge are refused by the tombstones.
            await outcomes.call("ReleaseStock", order_id, on(inventory[here], "ReleaseStock", release, "release"))
            await outcomes.call("Refund", order_id, on(payment[there], "Refund", refund, "refund"))
        if rng.random() < DUPLICATES:
            # The same call on both instances at once, as a resend after a timeout can be: one effect.
            reserves = await asyncio.gather(
                *(
                    outcomes.call("ReserveStock", order_id, on(stub, "ReserveStock", reserve, "reserve"))
                    for stub in inventory
                )
            )
            charges = await asyncio.gather(
                *(outcomes.call("Charge", order_id, on(stub, "Charge", charge, "charge")) for stub in payment)
            )
            for answers in (reserves, charges):
                if None not in answers:
                    assert answers[0] == answers[1], f"{order_id}: the duplicate did not replay the first answer"
            reserved, charged = reserves[0] or reserves[1], charges[0] or charges[1]
        else:
            reserved = await outcomes.call(
                "ReserveStock", order_id, on(inventory[here], "ReserveStock", reserve, "reserve")
            )
            charged = await outcomes.call("Charge", order_id, on(payment[here], "Charge", charge, "charge"))
        if charged is not None:
            outcomes.charged.add(order_id)
        if reserved is not None and rng.random() < 0.5:
            await outcomes.call("ReleaseStock", order_id, on(inventory[there], "ReleaseStock", release, "release"))
        if charged is not None and rng.random() < 0.4:
            refunded = await outcomes.call("Refund", order_id, on(payment[there], "Refund", refund, "refund"))
            if refunded is not None and refunded.was_charged:  # type: ignore[attr-defined]
                outcomes.refunded.add(order_id)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for number in orders:
            await one_order(number, rng)

    await asyncio.gather(*(worker(seed) for seed in range(CONCURRENCY)))
    return outcomes


def _check_inventory_books(url: str) -> None:
    initial = {entry["sku"]: int(entry["stock"]) for entry in json.loads(DEFAULT_CATALOGUE.read_text())}
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            stock = {row.sku: row for row in connection.execute(sqlalchemy.text("SELECT * FROM stock"))}
            held: Counter[str] = Counter()
            for (items,) in connection.execute(
                sqlalchemy.text("SELECT items FROM reservation WHERE status = 'RESERVED'")
            ):
                for line in decode_lines(items):
                    held[line.sku] += line.quantity
    finally:
        engine.dispose()
    for sku, row in stock.items():
        assert row.available >= 0 and row.reserved >= 0, f"{sku} oversold: {row.available} free, {row.reserved} held"
        assert row.available + row.reserved == initial[sku], f"{sku} lost or made up stock"
        assert row.reserved == held[sku], f"{sku}: {row.reserved} reserved, live reservations hold {held[sku]}"


def _check_payment_books(url: str, outcomes: Outcomes) -> None:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            entries = Counter(
                (order_id, kind)
                for order_id, kind in connection.execute(sqlalchemy.text("SELECT order_id, kind FROM ledger_entry"))
            )
    finally:
        engine.dispose()
    assert {order for order, kind in entries if kind == "CHARGE"} == outcomes.charged
    assert {order for order, kind in entries if kind == "REFUND"} == outcomes.refunded
    assert max(entries.values(), default=1) == 1


async def test_two_instances_of_each_service_on_one_database_never_deadlock(
    start_process: Callable[..., ManagedProcess], postgres_admin_url: str
) -> None:
    with (
        fresh_postgres_database(postgres_admin_url) as inventory_url,
        fresh_postgres_database(postgres_admin_url) as payment_url,
    ):
        processes: list[ManagedProcess] = [
            start_process("inventory_svc", f"inventory-{n}", DATABASE_URL=inventory_url) for n in (1, 2)
        ] + [start_process("payment_svc", f"payment-{n}", DATABASE_URL=payment_url) for n in (1, 2)]
        channels = [grpc.aio.insecure_channel(process.address) for process in processes]
        try:
            started = time.monotonic()
            outcomes = await _hammer(
                [inventory_grpc.InventoryServiceStub(channel) for channel in channels[:2]],
                [payment_grpc.PaymentServiceStub(channel) for channel in channels[2:]],
            )
            elapsed = time.monotonic() - started
        finally:
            for channel in channels:
                await channel.close(None)
        for process in processes:
            process.stop()
        deadlocks = {"inventory": _deadlocks(inventory_url), "payment": _deadlocks(payment_url)}
        print(
            f"\n{ORDERS} orders, {CONCURRENCY} clients, {elapsed:.1f}s: deadlocks {deadlocks}; "
            f"calls {dict(sorted(outcomes.codes.items()))}"
        )
        assert not outcomes.unexpected, f"{len(outcomes.unexpected)} calls failed, e.g. {outcomes.unexpected[:5]}"
        assert deadlocks == {"inventory": 0, "payment": 0}
        assert not _deadlock_lines(processes)
        assert outcomes.codes[("ReserveStock", OK.name)] > ORDERS // 3
        _check_inventory_books(inventory_url)
        _check_payment_books(payment_url, outcomes)


def test_instances_starting_together_on_an_empty_database_all_come_up(postgres_admin_url: str, tmp_path: Path) -> None:
    """Two instances of each service launched at once on one empty database: schema creation takes turns."""
    catalogue = json.loads(DEFAULT_CATALOGUE.read_text())
    for attempt in range(3):
        with fresh_postgres_database(postgres_admin_url) as url:
            env = {"PORT": "0", "HOST": "127.0.0.1", "DATABASE_URL": url, "DATA_DIR": str(tmp_path / "data")}
            processes = [
                ManagedProcess(f"{module}-{attempt}-{n}", module, env, tmp_path / "logs")
                for module in ("inventory_svc", "payment_svc", "shipping_svc")
                for n in (1, 2)
            ]
            try:
                for process in processes:
                    process.launch()
                for process in processes:
                    process.wait_ready(60)
            finally:
                for process in processes:
                    process.stop(timeout=10)
            engine = sqlalchemy.create_engine(url)
            try:
                with engine.connect() as connection:
                    skus = sorted(connection.execute(sqlalchemy.text("SELECT sku FROM stock")).scalars())
            finally:
                engine.dispose()
            assert skus == sorted(entry["sku"] for entry in catalogue)


@pytest.fixture(autouse=True)
def _bounded_load() -> None:
    if ORDERS < 1 or CONCURRENCY < 1:
        pytest.fail("TWO_INSTANCE_ORDERS and TWO_INSTANCE_CONCURRENCY must be positive")
