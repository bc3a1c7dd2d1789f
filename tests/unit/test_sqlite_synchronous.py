"""SQLITE_SYNCHRONOUS: every process reads it, a bad value stops the start, and the SQLite file runs with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Connection, text

from inventory_svc.config import InventorySettings
from notify_svc.config import NotifySettings
from orchestrator.config import OrchestratorSettings
from payment_svc.config import PaymentSettings
from shipping_svc.config import ShippingSettings
from svckit.config import ServiceSettings, load_settings
from svckit.db import Database, SqliteSynchronous
from svckit.process import ServiceProcess

EVERY_PROCESS = [OrchestratorSettings, InventorySettings, PaymentSettings, ShippingSettings, NotifySettings]
# PRAGMA synchronous reads back as a number: 1 is NORMAL, 2 is FULL.
PRAGMA_LEVEL = {SqliteSynchronous.NORMAL: 1, SqliteSynchronous.FULL: 2}


def pragmas(database: Database) -> tuple[str, int]:
    def read(connection: Connection) -> tuple[str, int]:
        mode = connection.execute(text("PRAGMA journal_mode")).scalar_one()
        return str(mode), int(connection.execute(text("PRAGMA synchronous")).scalar_one())

    return database.transaction_sync(read)


@pytest.mark.parametrize("settings_class", EVERY_PROCESS, ids=lambda c: c.__name__)
def test_every_process_defaults_to_normal(
    settings_class: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SQLITE_SYNCHRONOUS", raising=False)
    assert load_settings(settings_class).sqlite_synchronous is SqliteSynchronous.NORMAL


@pytest.mark.parametrize("settings_class", EVERY_PROCESS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("written", ["full", "FULL", " Full "])
def test_every_process_reads_full_in_any_case(
    settings_class: type[ServiceSettings], written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SQLITE_SYNCHRONOUS", written)
    assert load_settings(settings_class).sqlite_synchronous is SqliteSynchronous.FULL


@pytest.mark.parametrize("written", ["off", "extra", "2", ""])
def test_another_value_stops_the_start_with_one_line_naming_the_variable(
    written: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # OFF and EXTRA are SQLite levels too, but OFF may corrupt the file on a power loss and EXTRA
    # adds nothing in WAL mode: only the two documented values are accepted.
    monkeypatch.setenv("SQLITE_SYNCHRONOUS", written)
    with pytest.raises(SystemExit) as stopped:
        load_settings(OrchestratorSettings)
    assert stopped.value.code == 2
    problem = capsys.readouterr().err
    assert "SQLITE_SYNCHRONOUS" in problem and "'normal' or 'full'" in problem, problem


@pytest.mark.parametrize("setting", list(SqliteSynchronous))
def test_the_database_runs_in_wal_mode_with_the_setting(setting: SqliteSynchronous, tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}", sqlite_synchronous=setting)
    try:
        assert pragmas(database) == ("wal", PRAGMA_LEVEL[setting])
    finally:
        database.close()


async def test_a_batch_commits_on_a_connection_with_the_setting(tmp_path: Path) -> None:
    # The group-commit runner keeps its own connection for life: it must carry the pragma as well.
    database = Database(f"sqlite:///{tmp_path / 'service.db'}", sqlite_synchronous=SqliteSynchronous.FULL)
    try:
        level = await database.transaction(lambda c: int(c.execute(text("PRAGMA synchronous")).scalar_one()))
        assert level == PRAGMA_LEVEL[SqliteSynchronous.FULL]
    finally:
        database.close()


def test_the_default_is_normal(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    try:
        assert pragmas(database) == ("wal", PRAGMA_LEVEL[SqliteSynchronous.NORMAL])
    finally:
        database.close()


def test_a_service_process_opens_its_database_with_its_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLITE_SYNCHRONOUS", "full")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    process = ServiceProcess(load_settings(PaymentSettings), contract="sagasuite.payment.v1")
    try:
        assert pragmas(process.database) == ("wal", PRAGMA_LEVEL[SqliteSynchronous.FULL])
    finally:
        process.database.close()
