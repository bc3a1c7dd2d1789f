"""What the console process is given: where it listens, the orchestrator it calls, its Jaeger link and its session."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from sagactl.settings import ClientConfig

__all__ = [
    "DEFAULT_LISTEN",
    "ENV_JAEGER_UI_URL",
    "ENV_SECURE_COOKIE",
    "ENV_SESSION_SECRET",
    "BadListenAddress",
    "WebSettings",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:8080"
ENV_JAEGER_UI_URL = "JAEGER_UI_URL"
ENV_SESSION_SECRET = "SAGA_WEB_SESSION_SECRET"
ENV_SECURE_COOKIE = "SAGA_WEB_SECURE_COOKIE"
# A session secret shorter than this is refused: it signs the cookie that holds the operator's token.
MIN_SECRET_LENGTH = 16


class BadListenAddress(ValueError):
    """A --listen value that is not host:port."""


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of "host:port", "[::1]:port" or ":port" (all addresses); BadListenAddress otherwise."""
    host, colon, port_text = text.strip().rpartition(":")
    if not colon or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BadListenAddress(f"{text!r} is not host:port, e.g. {DEFAULT_LISTEN} (port 0 picks a free one)")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port_text)


@dataclass(frozen=True)
class WebSettings:
    """One console process's settings, read once at start."""

    client: ClientConfig = field(default_factory=ClientConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    # The Jaeger UI's base address: the saga page links to <jaeger_url>/trace/<trace id>. Empty: no link.
    jaeger_url: str = ""
    # Signs the session cookie; a random one (sessions end when the process does) when not given.
    session_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # Mark the session cookie Secure: browsers then send it over HTTPS only.
    secure_cookie: bool = False
    # How long a login lasts.
    session_seconds: int = 8 * 3600

    def __post_init__(self) -> None:
        if len(self.session_secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"{ENV_SESSION_SECRET} must be at least {MIN_SECRET_LENGTH} characters")
