"""The `sagasuite-healthcheck` command: exit 0 when this container's gRPC server reports SERVING (for Docker)."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from svckit.tls import ClientTls

__all__ = ["HealthcheckSettings", "check", "main"]


class HealthcheckSettings(BaseSettings):
    """The same variables the server reads, so the probe follows its port and TLS settings without arguments."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    port: int = Field(default=0, ge=0, le=65535)
    tls_cert_file: str = ""
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    tls_server_name: str = ""


def _channel(address: str, settings: HealthcheckSettings) -> grpc.Channel:
    if not settings.tls_cert_file:
        return grpc.insecure_channel(address)
    client_tls = ClientTls(
        settings.tls_ca_file, settings.tls_client_cert_file, settings.tls_client_key_file, settings.tls_server_name
    )
    # The server speaks TLS: verify it with TLS_CA_FILE, or the system's roots without one.
    credentials = client_tls.credentials() or grpc.ssl_channel_credentials()
    return grpc.secure_channel(address, credentials, options=client_tls.channel_options())


def check(address: str, settings: HealthcheckSettings, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for grpc.health.v1 Check of `service` ("" is the whole server)."""
    try:
        with _channel(address, settings) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as error:
        return False, f"{error.code().name}: {error.details()}"
    except ValueError as error:
        return False, f"configuration error: {error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sagasuite-healthcheck",
        description="Ask a gRPC server for its grpc.health.v1 status; exit 0 when SERVING, 1 otherwise.",
    )
    parser.add_argument("address", nargs="?", help="host:port (default: 127.0.0.1:$PORT)")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    settings = HealthcheckSettings()
    if not args.address and not settings.port:
        parser.error("give host:port or set PORT")
    address = args.address or f"127.0.0.1:{settings.port}"
    serving, seen = check(address, settings, args.service, args.timeout)
    print(f"{address}: {seen}")
    sys.exit(0 if serving else 1)


if __name__ == "__main__":
    main()
