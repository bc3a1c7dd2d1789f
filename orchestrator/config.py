"""Settings of the orchestrator process."""

from __future__ import annotations

import socket

from pydantic import Field

from svckit.config import ServiceSettings

__all__ = ["OrchestratorSettings"]


class OrchestratorSettings(ServiceSettings):
    """Orchestrator settings; service addresses come from discovery (INVENTORY_ADDR etc. when static)."""

    service_name: str = "orchestrator"
    port: int = Field(50050, ge=0, le=65535)
    replica_id: str = Field("", description="stable name of this replica; leases are held under it")
    lease_seconds: float = Field(30.0, gt=1, description="how long a claimed command is held before others may take it")
    poll_interval_seconds: float = Field(0.2, gt=0, description="how often due commands are looked for")
    heartbeat_interval_seconds: float = Field(0.5, gt=0, description="how often this replica records it is alive")
    replica_silent_after_seconds: float = Field(
        2.5, gt=0, description="a replica silent this long is taken as dead: others take over its leased commands"
    )
    claim_batch: int = Field(256, ge=1, le=10_000)
    max_in_flight: int = Field(512, ge=1, description="calls on the wire at once")
    commit_batch: int = Field(512, ge=1, description="most transitions recorded in one transaction")
    default_saga_deadline_seconds: int = Field(300, ge=1, le=7 * 24 * 3600)
    saga_definitions: str = Field("", description="extra definitions to load, as module:attribute,...")
    saga_definitions_dir: str = Field("", description="folder of YAML definitions, one file per version")
    definitions_reload_interval_seconds: float = Field(
        2.0, gt=0, description="how often SAGA_DEFINITIONS_DIR is looked at for new or changed files"
    )
    order_saga_version: int = Field(0, ge=0, description="the OrderSaga version PlaceOrder starts; 0: the latest")
    review_threshold: int = Field(
        100_000, ge=0, description="OrderSaga v2: orders of this many minor units or more wait for a fraud review"
    )
    review_timeout_seconds: float = Field(
        24 * 3600.0, gt=0, le=6 * 24 * 3600, description="OrderSaga v2: how long a fraud review may wait"
    )
    review_role: str = Field(
        "reviewer", pattern="^[a-z][a-z0-9_]{0,39}$", description="token role that may decide reviews"
    )
    outbox_metrics_interval_seconds: float = Field(
        5.0, gt=0, description="how often the outbox depth gauges are refreshed (with METRICS_PORT set)"
    )
    # WatchSaga (orchestrator/watch.py): streams per process; how often other replicas' commits are looked for.
    max_watchers: int = Field(1000, ge=1, description="WatchSaga streams open at once; more: RESOURCE_EXHAUSTED")
    watch_read_interval_seconds: float = Field(
        0.5, gt=0, description="how often one shared query looks for other replicas' events of watched sagas"
    )
    # Access control (orchestrator/auth.py): bearer tokens as name:token[:role], comma-separated.
    operator_tokens: str = Field("", description="name:token[:role],... allowed to call the API (see auth.py)")
    operator_tokens_file: str = Field("", description="file of name:token[:role] lines, re-read when it changes")
    read_access: str = Field("open", pattern="^(open|token)$", description="GetSaga/ListSagas/...: open or token")
    place_order_access: str = Field("open", pattern="^(open|token)$", description="PlaceOrder/StartSaga: open or token")
    # TLS of the orchestrator's calls to the services; on when TLS_CA_FILE or TLS_CLIENT_CERT_FILE is set.
    tls_ca_file: str = Field("", description="CA bundle that verifies the services' certificates")
    tls_client_cert_file: str = Field("", description="client certificate presented to services that require one")
    tls_client_key_file: str = Field("", description="private key of TLS_CLIENT_CERT_FILE")
    tls_server_name: str = Field("", description="name checked in the services' certificates instead of their address")

    def resolved_replica_id(self, port: int) -> str:
        return self.replica_id or f"{socket.gethostname()}:{port}"
