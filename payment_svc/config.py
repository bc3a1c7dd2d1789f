"""Settings of the payment service process."""

from __future__ import annotations

from pydantic import Field

from svckit.config import ServiceSettings

__all__ = ["PaymentSettings"]


class PaymentSettings(ServiceSettings):
    """The shared settings with the payment service's name and port."""

    service_name: str = "payment"
    port: int = Field(50052, ge=0, le=65535)
