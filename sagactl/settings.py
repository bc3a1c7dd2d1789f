"""How `saga` reaches the orchestrator (and where unless told), the variables it reads, and its exit codes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_ADDRESS",
    "ENV_ADDRESS",
    "ENV_CA_FILE",
    "ENV_TOKEN",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "ClientConfig",
    "version_line",
]

# Only the standard library here: the entry point's fast paths and every command's options use this module.

DEFAULT_ADDRESS = "127.0.0.1:50050"
ENV_ADDRESS = "SAGA_ADDRESS"
ENV_TOKEN = "SAGA_TOKEN"
ENV_CA_FILE = "SAGA_CA_FILE"

EXIT_OK = 0
# A saga ended in anything but COMPLETED, or some calls of a batch were refused.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4


@dataclass(frozen=True)
class ClientConfig:
    """Where the orchestrator is and how to reach it."""

    address: str = DEFAULT_ADDRESS
    token: str = ""
    ca_file: str = ""
    timeout: float = 10.0


def version_line() -> str:
    """What `saga --version` prints: the installed sagasuite distribution's version, or that it is not installed."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("sagasuite")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed as a package)"
    return f"sagasuite {version}"
