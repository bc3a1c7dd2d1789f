"""Reused gRPC channels per service instance, chosen round-robin among the resolver's healthy addresses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from svckit.discovery import Resolver

__all__ = ["ChannelPool", "NoHealthyInstance"]

log = logging.getLogger(__name__)


class NoHealthyInstance(Exception):
    """The resolver currently knows no healthy instance of the service."""

    def __init__(self, service: str) -> None:
        super().__init__(f"no healthy instance of service {service!r}")
        self.service = service


@dataclass
class _PooledChannel:
    channel: grpc.aio.Channel
    services: set[str]
    last_seen: float


class ChannelPool:
    """One long-lived channel per instance address, shared by every call to that instance.

    Channels are made on first use and closed once their address has been missing from the
    resolver for `retire_after` seconds (not at once, so a briefly flapping instance keeps its
    connection and in-flight calls finish), or by `close()`.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        retire_after: float = 30.0,
        close_grace: float = 5.0,
    ) -> None:
        self._resolver = resolver
        self._options = list(channel_options or ())
        self._credentials = credentials
        self._interceptors = list(interceptors) if interceptors else None
        self._retire_after = retire_after
        self._close_grace = close_grace
        self._channels: dict[str, _PooledChannel] = {}
        self._next_pick: dict[str, int] = {}
        self._last_sweep = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to one healthy instance of `service`, rotating across instances call by call."""
        if self._closed:
            raise RuntimeError("ChannelPool is closed")
        addresses = self._resolver.addresses(service)
        now = time.monotonic()
        self._sweep(now)
        if not addresses:
            raise NoHealthyInstance(service)
        pick = self._next_pick.get(service, 0)
        self._next_pick[service] = pick + 1
        address = addresses[pick % len(addresses)]
        pooled = self._channels.get(address)
        if pooled is not None and pooled.channel.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            # Its last connection attempt failed (an instance that died and that discovery has not
            # dropped yet): skip it while another instance is not failing. gRPC keeps reconnecting
            # such a channel in the background, so a recovered instance is picked again by itself.
            for offset in range(1, len(addresses)):
                other = addresses[(pick + offset) % len(addresses)]
                candidate = self._channels.get(other)
                if candidate is None or candidate.channel.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    address, pooled = other, candidate
                    break
        if pooled is None:
            pooled = self._channels[address] = _PooledChannel(self._open(address), set(), now)
            log.debug("opened channel to %s for %r", address, service)
        pooled.services.add(service)
        pooled.last_seen = now
        return pooled.channel

    def addresses_with_channels(self) -> list[str]:
        """Addresses that currently hold an open channel (for tests and diagnostics)."""
        return sorted(self._channels)

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = self._channels, {}
        for pooled in channels.values():
            await pooled.channel.close(self._close_grace)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _open(self, address: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(
                address, self._credentials, options=self._options, interceptors=self._interceptors
            )
        return grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)

    def _sweep(self, now: float) -> None:
        # At most once a second: channel() is on the hot path of every call.
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for address, pooled in list(self._channels.items()):
            if any(address in self._resolver.addresses(service) for service in pooled.services):
                pooled.last_seen = now
            elif now - pooled.last_seen >= self._retire_after:
                del self._channels[address]
                log.debug("retiring channel to %s: gone from discovery", address)
                task = asyncio.get_running_loop().create_task(self._retire(pooled.channel))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(Exception):
            await channel.close(self._close_grace)
