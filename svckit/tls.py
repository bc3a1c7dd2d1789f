"""TLS for gRPC clients from certificate paths: channel credentials and the options that go with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["ClientTls"]


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{setting}={path!r} cannot be read: {error.strerror or error}") from None


@dataclass(frozen=True)
class ClientTls:
    """How a process calls TLS servers: which CA it trusts, which certificate it shows, which name it checks.

    TLS is on when a CA file or a client certificate is given; with neither the calls are plaintext.
    Without a CA file the system's trusted roots verify the server.
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials, or None for plaintext; ValueError names the setting that is wrong."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("TLS_CLIENT_CERT_FILE and TLS_CLIENT_KEY_FILE must be set together")
        if self.server_name and not self.enabled:
            raise ValueError("TLS_SERVER_NAME is set but TLS is off: set TLS_CA_FILE (or TLS_CLIENT_CERT_FILE)")
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "TLS_CA_FILE") if self.ca_file else None,
            private_key=_read(self.key_file, "TLS_CLIENT_KEY_FILE") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "TLS_CLIENT_CERT_FILE") if self.cert_file else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """With TLS_SERVER_NAME, certificates are checked for that name instead of the dialled address.

        That is what scaled replicas need, since each is dialled at its own address but they share
        one certificate name.
        """
        if self.enabled and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []
