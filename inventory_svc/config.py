"""Settings of the inventory service process."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from svckit.config import ServiceSettings

__all__ = ["InventorySettings"]

DEFAULT_CATALOGUE = Path(__file__).with_name("catalogue.json")


class InventorySettings(ServiceSettings):
    """INVENTORY_SEED_FILE names the catalogue loaded into an empty database."""

    service_name: str = "inventory"
    port: int = Field(50051, ge=0, le=65535)
    inventory_seed_file: Path = DEFAULT_CATALOGUE
