"""Entry point: `python -m inventory_svc` or the `inventory-svc` console script."""

from __future__ import annotations

from inventory_svc.config import InventorySettings
from inventory_svc.server import build_process
from svckit.config import load_settings


def main() -> None:
    build_process(load_settings(InventorySettings)).run()


if __name__ == "__main__":
    main()
