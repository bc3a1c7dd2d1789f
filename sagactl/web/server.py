"""Runs the console on uvicorn: binds its socket first (port 0 picks one), says where it serves, then serves."""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn

from sagactl.web.app import create_app
from sagactl.web.settings import WebSettings

__all__ = ["READY_PREFIX", "bind", "serve"]

# The line `saga web` prints once it answers: tests and scripts wait for it to learn the address.
READY_PREFIX = "saga web: serving "
# How long a stop waits for open pages' event streams to close before it cuts them.
_GRACE_SECONDS = 2


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; OSError when it cannot be had (the port is taken, say)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it serves once it has started."""

    def __init__(self, config: uvicorn.Config, announcement: str) -> None:
        super().__init__(config)
        self.announcement = announcement

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl-C and SIGTERM are how the console is meant to stop: after the graceful shutdown it exits 0, where
        # uvicorn would raise the signal again (and `saga` would call that an interruption).
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.announcement, flush=True)


def serve(settings: WebSettings, sock: socket.socket) -> None:
    """Serve the console on the bound socket until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        create_app(settings),
        log_level="info",
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=_GRACE_SECONDS,
    )
    announcement = f"{READY_PREFIX}{_url(sock)} (orchestrator {settings.client.address})"
    _Server(config, announcement).run(sockets=[sock])
