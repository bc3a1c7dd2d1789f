"""Typed settings loaded once per process from the environment, failing fast with a clear message."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from svckit.db import SqliteSynchronous
from svckit.faults import parse_faults

__all__ = ["ServiceSettings", "load_settings"]

# A Go duration as Consul parses it: "10s", "500ms", "1m30s".
_GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"


class ServiceSettings(BaseSettings):
    """Settings every gRPC process shares; each service subclasses it with its own defaults."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    service_name: str = "service"
    host: str = Field("127.0.0.1", description="address the gRPC server binds to")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    advertise_host: str = Field("", description="address other processes reach this one at")
    data_dir: Path = Field(Path("var"), description="folder for SQLite files and logs")
    database_url: str = Field("", description="SQLAlchemy URL; a SQLite file in DATA_DIR when empty")
    sqlite_synchronous: SqliteSynchronous = Field(
        SqliteSynchronous.NORMAL,
        description="SQLite only: normal (survives kill -9; a power loss may take back the last commits) "
        "or full (an fsync per commit: answered commits survive a power loss)",
    )
    log_level: str = "INFO"
    faults: str = Field("", description="fault injection rules (see docs/configuration.md#fault-injection)")
    idempotency_retention_seconds: int = Field(7 * 24 * 3600, ge=60)
    idempotency_cleanup_interval_seconds: float = Field(300.0, gt=0)
    grace_seconds: float = Field(10.0, ge=0, description="how long SIGTERM waits for in-flight calls")
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus port; -1 turns it off")
    discovery: str = Field("static", pattern="^(static|consul)$")
    # With DISCOVERY=consul the process registers itself; the agent comes from CONSUL_HTTP_ADDR & co.
    consul_check_interval: str = Field(
        "5s", pattern=_GO_DURATION, description="how often Consul runs the gRPC health check (Go duration)"
    )
    consul_check_timeout: str = Field("2s", pattern=_GO_DURATION, description="timeout of one health check")
    consul_deregister_after: str = Field(
        "1m", pattern=_GO_DURATION, description="Consul drops an instance critical for this long (min 1m)"
    )
    consul_tags: str = Field("", description="extra Consul tags for this instance, comma-separated")
    consul_check_tls_server_name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._:-]*$",
        description="TLSServerName of the TLS gRPC check: the name the agent checks in this process's certificate "
        "(Consul 1.17+ uses no other); empty: the advertised host",
    )
    consul_resync_seconds: float = Field(30.0, gt=0, description="how often the registration is checked and restored")
    consul_request_timeout_seconds: float = Field(5.0, gt=0, description="timeout of one request to the agent")
    consul_retry_max_seconds: float = Field(30.0, gt=0, description="longest pause between registration retries")
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""

    @field_validator("sqlite_synchronous", mode="before")
    @classmethod
    def _synchronous_any_case(cls, value: object) -> object:
        # SQLite's own documentation spells the levels in capitals (synchronous=FULL).
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("faults")
    @classmethod
    def _faults_parse(cls, value: str) -> str:
        # Checked with the other settings, so a bad rule is one configuration line, not a traceback.
        parse_faults(value)
        return value

    def resolved_database_url(self) -> str:
        """DATABASE_URL, or the service's own SQLite file under DATA_DIR."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / (self.service_name + '.db')}"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Read settings from the environment, or exit with one line per bad variable."""
    try:
        return settings_class()
    except ValidationError as error:
        lines = [f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors()]
        print("configuration error:\n  " + "\n  ".join(lines), file=sys.stderr)
        raise SystemExit(2) from error
