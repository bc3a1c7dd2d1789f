"""Entry point: `python -m payment_svc` or the `payment-svc` console script."""

from __future__ import annotations

from payment_svc.config import PaymentSettings
from payment_svc.server import build_process
from svckit.config import load_settings


def main() -> None:
    build_process(load_settings(PaymentSettings)).run()


if __name__ == "__main__":
    main()
