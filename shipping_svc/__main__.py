"""Entry point: `python -m shipping_svc` or the `shipping-svc` console script."""

from __future__ import annotations

from shipping_svc.config import ShippingSettings
from shipping_svc.server import build_process
from svckit.config import load_settings


def main() -> None:
    build_process(load_settings(ShippingSettings)).run()


if __name__ == "__main__":
    main()
