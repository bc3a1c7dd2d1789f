"""Settings of the shipping service process."""

from __future__ import annotations

from pydantic import Field

from svckit.config import ServiceSettings

__all__ = ["ShippingSettings"]


class ShippingSettings(ServiceSettings):
    """The shared settings with the shipping service's name and default port."""

    service_name: str = "shipping"
    port: int = Field(50053, ge=0, le=65535)
