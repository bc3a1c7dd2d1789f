"""Keeps a serving process registered in Consul: register in the background with retries, re-sync, deregister."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import re
import socket
from collections.abc import Iterable, Mapping

import consul

from svckit.config import ServiceSettings
from svckit.discovery import ConsulRegistration, ConsulSettings

__all__ = ["ConsulAnnouncer", "advertised_host", "announcer_from_settings", "instance_id"]

log = logging.getLogger("sagasuite.registration")

_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]", "*"}
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_CONTRACT_VERSION = re.compile(r"\.(v\d+(?:(?:alpha|beta)\d*)?)$")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\][^\"')]*")


def advertised_host(settings: ServiceSettings) -> str:
    """ADVERTISE_HOST, else HOST; a wildcard bind address is replaced by this host's resolved address."""
    host = settings.advertise_host.strip() or settings.host.strip()
    if host not in _WILDCARD_HOSTS:
        return host.strip("[]")
    hostname = socket.gethostname()
    try:
        resolved = socket.gethostbyname(hostname)
    except OSError:
        resolved = hostname
    log.warning(
        "HOST=%s is a wildcard and ADVERTISE_HOST is not set: advertising %s (from the hostname %s); "
        "set ADVERTISE_HOST to the address other processes and the Consul agent reach this one at",
        settings.host,
        resolved,
        hostname,
    )
    return resolved


def instance_id(name: str, host: str, port: int) -> str:
    """A Consul service id unique per instance: `<name>-<host>-<port>`, with only URL-safe characters."""
    return _UNSAFE_ID_CHARS.sub("-", f"{name}-{host}-{port}")


def _software_version() -> str:
    try:
        return importlib.metadata.version("sagasuite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ConsulAnnouncer:
    """Registers one service instance with the local Consul agent while the process serves.

    `start(port)` returns at once: registration runs in a background task that retries with
    exponential backoff (and jitter) while the agent is unreachable or refuses, logging every
    failure, so a process never fails to start because Consul is down. Once registered, the task
    checks every `resync_interval` seconds that the agent still has the instance (an agent restarted
    without its state forgets it) and registers again if not. `stop()` ends the task and deregisters,
    so the instance leaves discovery before the server drains; if the agent cannot be reached then,
    Consul removes it once its check has been critical for DeregisterCriticalServiceAfter.
    """

    def __init__(
        self,
        registration: ConsulRegistration,
        *,
        name: str,
        address: str,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        check_interval: str = "5s",
        check_timeout: str = "2s",
        deregister_after: str = "1m",
        grpc_use_tls: bool = False,
        check_tls_server_name: str = "",
        agent_url: str = "",
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        resync_interval: float = 30.0,
    ) -> None:
        self._registration = registration
        self.name = name
        self.address = address
        self.tags = list(tags)
        self.meta = dict(meta or {})
        self.check_interval = check_interval
        self.check_timeout = check_timeout
        self.deregister_after = deregister_after
        self.grpc_use_tls = grpc_use_tls
        # Since Consul 1.17 the check's own TLSServerName is the only name the agent verifies (or sends as
        # SNI); without it the agent verifies the check's address, which a shared certificate does not name.
        self.check_tls_server_name = check_tls_server_name if grpc_use_tls else ""
        self.agent_url = agent_url or "the Consul agent"
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._resync_interval = resync_interval
        self.port: int | None = None
        self.instance_id = ""
        self.registered = False
        self._attempted = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, port: int) -> None:
        """Begin registering `name` at address:port (once the server is serving)."""
        self.port = port
        self.instance_id = instance_id(self.name, self.address, port)
        self._task = asyncio.create_task(self._keep_registered(), name=f"consul-register-{self.instance_id}")

    async def stop(self) -> None:
        """Stop re-registering and deregister (on SIGTERM, before draining)."""
        self._stopping.set()
        if self._task is not None:
            # The loop ends after its current HTTP call, which the client's timeout bounds.
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self._attempted:
            return
        try:
            removed = await self._registration.deregister_async(self.instance_id)
        except Exception as exc:
            log.warning(
                "could not deregister %s from %s (%s); Consul drops it once its check has been critical for %s",
                self.instance_id,
                self.agent_url,
                _describe(exc),
                self.deregister_after,
            )
            return
        self.registered = False
        if removed:
            log.info("deregistered %s from consul", self.instance_id)
        else:
            log.info("deregistered %s from consul: the agent no longer had it", self.instance_id)

    async def _keep_registered(self) -> None:
        delay = self._retry_initial
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.registered and not await self._still_registered():
                    log.warning(
                        "%s no longer has %s (agent restarted?): registering again", self.agent_url, self.instance_id
                    )
                    self.registered = False
                if not self.registered:
                    await self._register()
            except Exception as exc:
                failures += 1
                pause = delay / 2 + random.uniform(0, delay / 2)
                delay = min(self._retry_max, delay * 2)
                # A refusal (bad definition, ACL) will not mend itself the way an unreachable agent does.
                refused = isinstance(exc, consul.ConsulException) and not isinstance(exc, consul.Timeout)
                level = logging.ERROR if refused else logging.WARNING
                log.log(
                    level,
                    "consul %s of %s at %s failed (attempt %d): %s; serving anyway, retrying in %.1fs",
                    "registration check" if self.registered else "registration",
                    self.instance_id,
                    self.agent_url,
                    failures,
                    _describe(exc),
                    pause,
                )
                await self._sleep(pause)
                continue
            if failures:
                log.info("consul registration of %s succeeded after %d failed attempt(s)", self.instance_id, failures)
            failures = 0
            delay = self._retry_initial
            await self._sleep(self._resync_interval)

    async def _register(self) -> None:
        assert self.port is not None
        self._attempted = True
        check: dict[str, str | bool] = {
            "check_interval": self.check_interval,
            "check_timeout": self.check_timeout,
            "deregister_critical_after": self.deregister_after,
            "grpc_use_tls": self.grpc_use_tls,
        }
        # A server name only for a TLS check (it is empty otherwise): a plaintext check has none.
        if self.check_tls_server_name:
            check["tls_server_name"] = self.check_tls_server_name
        await self._registration.register_async(
            self.name, self.instance_id, self.address, self.port, self.tags, self.meta, **check
        )
        self.registered = True
        log.info(
            "registered %s in consul at %s: %s %s:%d, gRPC check%s every %s (timeout %s, removed after %s critical)",
            self.instance_id,
            self.agent_url,
            self.name,
            self.address,
            self.port,
            f" over TLS (server name {self.check_tls_server_name})" if self.grpc_use_tls else "",
            self.check_interval,
            self.check_timeout,
            self.deregister_after,
        )

    async def _still_registered(self) -> bool:
        return await self._registration.is_registered_async(self.instance_id)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    # requests wraps a refused connection in three layers of text; the errno line is what matters.
    errno = _ERRNO_TEXT.search(text)
    if errno:
        text = errno.group(0).strip()
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def announcer_from_settings(
    settings: ServiceSettings,
    *,
    contract: str,
    name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConsulAnnouncer | None:
    """The announcer for this process when DISCOVERY=consul, else None.

    `contract` is the proto package the process serves (e.g. "sagasuite.payment.v1"); it goes into
    the instance's meta with its version, and the version is a tag too. A TLS server's check verifies
    CONSUL_CHECK_TLS_SERVER_NAME in its certificate, else the advertised host. Bad CONSUL_* variables raise
    ValueError at once; an unreachable agent does not (registration retries in the background).
    """
    if settings.discovery != "consul":
        return None
    consul_settings = ConsulSettings.from_env() if environ is None else ConsulSettings.from_env(environ)
    match = _CONTRACT_VERSION.search(contract)
    contract_version = match.group(1) if match else ""
    tls = bool(settings.tls_cert_file)
    tags = ["grpc", *([contract_version] if contract_version else []), *(["tls"] if tls else [])]
    tags += [tag for tag in (part.strip() for part in settings.consul_tags.split(",")) if tag and tag not in tags]
    meta = {"contract": contract, "version": _software_version()}
    if contract_version:
        meta["contract_version"] = contract_version
    address = advertised_host(settings)
    return ConsulAnnouncer(
        ConsulRegistration(consul_settings, timeout=settings.consul_request_timeout_seconds),
        name=name or settings.service_name,
        address=address,
        tags=tags,
        meta=meta,
        check_interval=settings.consul_check_interval,
        check_timeout=settings.consul_check_timeout,
        deregister_after=settings.consul_deregister_after,
        grpc_use_tls=tls,
        check_tls_server_name=settings.consul_check_tls_server_name or address,
        agent_url=consul_settings.url,
        resync_interval=settings.consul_resync_seconds,
        retry_max=settings.consul_retry_max_seconds,
    )
