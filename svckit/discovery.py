"""Service discovery by service name: static address lists or Consul health-checked instances."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import consul

__all__ = [
    "SERVICE_ADDRESSES_VARIABLE",
    "SUITE_SERVICES",
    "ConsulRegistration",
    "ConsulResolver",
    "ConsulSettings",
    "Resolver",
    "StaticResolver",
    "address_variable",
    "check_service_name",
    "format_host_port",
    "make_resolver",
    "parse_host_port",
    "parse_service_addresses",
    "unresolvable",
]

log = logging.getLogger(__name__)

# The four services of the suite itself (the local stack, compose, chaos, benchmarks). The orchestrator
# resolves whatever names its definitions call; nothing in discovery is limited to these.
SUITE_SERVICES: tuple[str, ...] = ("inventory", "payment", "shipping", "notify")
# One setting for many services: "name=host:port[,host:port...]; name=..." (see parse_service_addresses).
SERVICE_ADDRESSES_VARIABLE = "SERVICE_ADDRESSES"

# What a service may be called: a DNS-label-like name Consul accepts, and that fits in an URL path
# and an environment variable name (`-` and `.` become `_`) without quoting.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_ADDRESS_CHARS = 300
_MAX_SERVICE_ADDRESSES_CHARS = 65536
_PREVIEW_CHARS = 40

_T = TypeVar("_T")


class Resolver(Protocol):
    """Where the instances of a service are: a live list of healthy "host:port" addresses.

    Any service name may be asked for, at any time: names a definition loaded at run time calls too.
    """

    async def start(self) -> None: ...

    def addresses(self, service: str) -> list[str]:
        """The currently healthy addresses of `service`, possibly empty; never blocks."""
        ...

    # The timeout is part of the contract (callers pass their start-up budget), hence the noqa.
    async def wait_for(self, service: str, timeout: float) -> list[str]:  # noqa: ASYNC109
        """Wait until `service` has at least one healthy address and return them."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- addresses


def format_host_port(host: str, port: int) -> str:
    """Join host and port the way gRPC targets expect ("[::1]:50051" for IPv6)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def parse_host_port(text: str, *, source: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; `source` names the setting in the error message."""
    item = text.strip()
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{source}: {text!r} is not host:port (IPv6 hosts look like [::1]:50051)")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{source}: {text!r} has an invalid IPv6 address in brackets") from None
    else:
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{source}: {text!r} is not host:port (for example 127.0.0.1:50051)")
        if ":" in host:
            raise ValueError(f"{source}: {text!r} is ambiguous; write IPv6 hosts in brackets, as [::1]:50051")
    if not host or (not item.startswith("[") and not _HOST_NAME.fullmatch(host)):
        raise ValueError(f"{source}: {text!r} has an empty or invalid host (letters, digits, '.', '-', '_')")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{source}: {text!r} has an invalid port {port_text!r} (expected 1-65535)")
    return host, int(port_text)


def _preview(text: str) -> str:
    """A value as quoted in an error message: at most a short prefix of it."""
    return repr(text) if len(text) <= _PREVIEW_CHARS else repr(text[:_PREVIEW_CHARS]) + "..."


def check_service_name(name: str, *, source: str) -> str:
    """Return `name` if it can name a service (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)."""
    if not _SERVICE_NAME.fullmatch(name):
        raise ValueError(
            f"{source}: {_preview(name)} is not a service name "
            "(1-128 of A-Z a-z 0-9 . _ -, starting with a letter or a digit)"
        )
    return name


def address_variable(service: str) -> str:
    """The variable that gives a service's static addresses: "order-api" is read from ORDER_API_ADDR."""
    return service.upper().replace("-", "_").replace(".", "_") + "_ADDR"


def _parse_address_list(raw: str, *, source: str) -> list[str]:
    """Parse "host:port[,host:port...]" into normalized gRPC targets; `source` names the setting in errors."""
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{source} is empty: expected host:port[,host:port...]")
    addresses: list[str] = []
    for item in items:
        if len(item) > _MAX_ADDRESS_CHARS:
            raise ValueError(f"{source}: {_preview(item)} is {len(item)} characters long, too long for host:port")
        address = format_host_port(*parse_host_port(item, source=source))
        if address in addresses:
            raise ValueError(f"{source}: {address} is listed twice")
        addresses.append(address)
    return addresses


def parse_service_addresses(raw: str, *, variable: str = SERVICE_ADDRESSES_VARIABLE) -> dict[str, list[str]]:
    """Parse the map setting: "name=host:port[,host:port...]" entries separated by ";" or new lines.

    Blank entries (a trailing ";") are ignored. Names follow `check_service_name`; two names that read
    the same `<NAME>_ADDR` variable ("order-api" and "ORDER_API") are the same service, given twice.
    """
    if len(raw) > _MAX_SERVICE_ADDRESSES_CHARS:
        raise ValueError(f"{variable} is {len(raw)} characters long; at most {_MAX_SERVICE_ADDRESSES_CHARS}")
    control = next((ch for ch in raw if not ch.isprintable() and ch not in "\t\r\n"), None)
    if control is not None:
        raise ValueError(f"{variable} contains the unprintable character {control!r}")
    table: dict[str, list[str]] = {}
    names_by_variable: dict[str, str] = {}
    for entry in (part.strip() for part in re.split(r"[;\n]", raw)):
        if not entry:
            continue
        name, equals, addresses = entry.partition("=")
        name = name.strip()
        if not equals:
            raise ValueError(
                f"{variable}: entry {_preview(entry)} has no '=': write name=host:port[,host:port...], "
                "entries separated by ';'"
            )
        check_service_name(name, source=f"{variable}: entry {_preview(entry)}")
        key = address_variable(name)
        if key in names_by_variable:
            also = "" if names_by_variable[key] == name else f" (also as {names_by_variable[key]!r})"
            raise ValueError(f"{variable}: service {name!r} is given twice{also}")
        names_by_variable[key] = name
        table[name] = _parse_address_list(addresses, source=f"{variable} entry {name!r}")
    return table


# --------------------------------------------------------------------------- static discovery


class StaticResolver:
    """Fixed addresses per service, for running without Consul: a table, and the environment for any name.

    With an environment (`from_env`), a service that is not in the table is looked up the first time
    it is asked for, whatever its name: `<NAME>_ADDR` if it is set, otherwise its entry in
    SERVICE_ADDRESSES (parsed, and refused if malformed, at construction). The answer, addresses or
    the reason there are none, is kept: a process's environment does not change while it runs.
    """

    def __init__(self, table: Mapping[str, Iterable[str]], *, environ: Mapping[str, str] | None = None) -> None:
        self._table: dict[str, list[str]] = {}
        for service, addresses in table.items():
            normalized = []
            for address in addresses:
                host, port = parse_host_port(address, source=f"address of service {service!r}")
                normalized.append(format_host_port(host, port))
            self._table[service] = normalized
        self._environ = environ
        # SERVICE_ADDRESSES by the variable each name would be read from, so lookups match it the same way.
        self._mapped: dict[str, list[str]] = {}
        if environ is not None:
            raw_map = environ.get(SERVICE_ADDRESSES_VARIABLE, "")
            for name, addresses in parse_service_addresses(raw_map).items():
                self._mapped[address_variable(name)] = addresses
        self._problems: dict[str, str] = {}

    @classmethod
    def from_env(
        cls, services: Iterable[str], environ: Mapping[str, str] = os.environ, *, required: bool = True
    ) -> StaticResolver:
        """Read the addresses of `services` now, and of any other name when it is first asked for.

        A malformed value of one of `services` (or a malformed SERVICE_ADDRESSES) is a ValueError naming
        the variable. So is a missing one, unless `required` is false: then it is left for
        `unresolvable()` to report.
        """
        resolver = cls({}, environ=environ)
        for service in services:
            variable = address_variable(service)
            check_service_name(service, source=f"the service asked for ({variable})")
            found = resolver._read(service)
            if found:
                resolver._table[service] = found
            elif required:
                raise ValueError(
                    f"{variable} is not set: give the {service} service's address(es) as "
                    f"host:port[,host:port...] (or an entry in {SERVICE_ADDRESSES_VARIABLE}), "
                    f"or set DISCOVERY=consul"
                )
        return resolver

    async def start(self) -> None:
        return None

    def addresses(self, service: str) -> list[str]:
        found = self._table.get(service)
        if found is None:
            found = self._lookup(service)
        return list(found)

    async def wait_for(self, service: str, timeout: float) -> list[str]:  # noqa: ASYNC109
        # A static table never changes, so waiting could only end in a timeout: say so at once.
        found = self.addresses(service)
        if not found:
            raise LookupError(self._problems.get(service) or self._missing(service))
        return found

    async def close(self) -> None:
        return None

    def _read(self, service: str) -> list[str]:
        """The environment's addresses for `service`: [] if it has none, ValueError if they are malformed."""
        if self._environ is None:
            return []
        variable = address_variable(service)
        raw = self._environ.get(variable)
        if raw is not None:  # the more specific setting wins over SERVICE_ADDRESSES
            return _parse_address_list(raw, source=variable)
        return list(self._mapped.get(variable, ()))

    def _lookup(self, service: str) -> list[str]:
        found: list[str] = []
        try:
            check_service_name(service, source="service name")
            found = self._read(service)
        except ValueError as error:
            # First asked for at run time (a definition loaded later): nothing to stop, so say it loudly once.
            self._problems[service] = str(error)
            log.error("service %r has no static address: %s", service, error)
        self._table[service] = found
        return found

    @staticmethod
    def _missing(service: str) -> str:
        return (
            f"no static address for {service!r}: set {address_variable(service)}, add "
            f"{service}=host:port to {SERVICE_ADDRESSES_VARIABLE}, or use DISCOVERY=consul"
        )


# --------------------------------------------------------------------------- Consul settings


def _parse_bool(value: str, variable: str) -> bool:
    # The same spellings Go's strconv.ParseBool accepts, which is what the consul CLI uses.
    lowered = value.strip().lower()
    if lowered in {"1", "t", "true"}:
        return True
    if lowered in {"0", "f", "false"}:
        return False
    raise ValueError(f"{variable}={value!r} is not a boolean (use true or false)")


@dataclass(frozen=True)
class ConsulSettings:
    """How to reach the Consul agent's HTTP API, read from the standard CONSUL_* variables."""

    host: str = "127.0.0.1"
    port: int = 8500
    scheme: str = "http"
    token: str | None = field(default=None, repr=False)
    # True/False, or the path of a CA bundle (file or directory) to verify the agent's certificate with.
    verify: bool | str = True
    client_cert: tuple[str, str] | None = None

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ConsulSettings:
        """Read CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN(_FILE), CONSUL_HTTP_SSL(_VERIFY), CONSUL_CACERT/CAPATH,
        CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY, with the consul CLI's defaults."""
        raw_address = environ.get("CONSUL_HTTP_ADDR", "").strip() or "127.0.0.1:8500"
        scheme = "http"
        rest = raw_address
        if "://" in raw_address:
            scheme, _, rest = raw_address.partition("://")
            scheme = scheme.lower()
            if scheme not in {"http", "https"}:
                raise ValueError(f"CONSUL_HTTP_ADDR={raw_address!r}: only http:// and https:// agents are supported")
        rest = rest.rstrip("/")
        ssl_flag = environ.get("CONSUL_HTTP_SSL", "").strip()
        if ssl_flag:
            # Like the consul CLI, CONSUL_HTTP_SSL decides the scheme when it is set.
            scheme = "https" if _parse_bool(ssl_flag, "CONSUL_HTTP_SSL") else "http"
        default_port = 8501 if scheme == "https" else 8500
        has_port = "]:" in rest if rest.startswith("[") else rest.count(":") == 1
        if has_port:
            host, port = parse_host_port(rest, source="CONSUL_HTTP_ADDR")
        else:
            host, port = rest.strip("[]"), default_port
            if not host:
                raise ValueError(f"CONSUL_HTTP_ADDR={raw_address!r} has no host")

        token = environ.get("CONSUL_HTTP_TOKEN", "").strip() or None
        token_file = environ.get("CONSUL_HTTP_TOKEN_FILE", "").strip()
        if token is None and token_file:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    token = handle.read().strip() or None
            except OSError as exc:
                raise ValueError(f"CONSUL_HTTP_TOKEN_FILE={token_file!r} cannot be read: {exc}") from exc

        verify: bool | str = True
        verify_flag = environ.get("CONSUL_HTTP_SSL_VERIFY", "").strip()
        if verify_flag and not _parse_bool(verify_flag, "CONSUL_HTTP_SSL_VERIFY"):
            verify = False
        else:
            ca = environ.get("CONSUL_CACERT", "").strip() or environ.get("CONSUL_CAPATH", "").strip()
            if ca:
                verify = ca

        cert = environ.get("CONSUL_CLIENT_CERT", "").strip()
        key = environ.get("CONSUL_CLIENT_KEY", "").strip()
        if bool(cert) != bool(key):
            raise ValueError("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be set together")
        return cls(
            host=host,
            port=port,
            scheme=scheme,
            token=token,
            verify=verify,
            client_cert=(cert, key) if cert else None,
        )

    def client(self) -> consul.Consul:
        """A py-consul client (blocking, requests-based) for these settings."""
        client = consul.Consul(
            # py-consul pastes the host into its base URL as is, so IPv6 needs its brackets.
            host=f"[{self.host}]" if ":" in self.host else self.host,
            port=self.port,
            token=self.token,
            scheme=self.scheme,
            verify=self.verify,
            cert=self.client_cert,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; these settings are the truth.
        client.token = self.token
        return client


# --------------------------------------------------------------------------- Consul discovery


async def _run_in_daemon_thread(func: Callable[[], _T], name: str) -> _T:
    """Run a blocking call in its own daemon thread and await its result.

    Blocking queries hold a thread for up to `wait`. asyncio.to_thread would put them on the loop's
    default executor, which asyncio.run joins at shutdown, so a stopping process would hang for the
    rest of the wait. A daemon thread is simply abandoned when the awaiting task is cancelled.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = func()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


class _TokenBucket:
    """Rate limit for a blocking-query loop: quick while calm, polling when results churn."""

    def __init__(self, burst: int, per_second: float) -> None:
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._rate = per_second
        self._stamp = time.monotonic()

    def delay(self) -> float:
        """Take a token; return how long to sleep first (0 while tokens remain)."""
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


@dataclass
class _Watch:
    addresses: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    last_error: str | None = None
    # Set for a name that is not a service name: it is never queried (it would change the URL's path).
    refused: str | None = None


def _instance_address(entry: Mapping[str, Any]) -> str | None:
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    # Per the Consul docs an empty Service.Address means "use the node's address".
    host = service.get("Address") or node.get("Address")
    port = service.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        return None
    return format_host_port(str(host), port)


class ConsulResolver:
    """Watches Consul's healthy instances of each service with blocking queries.

    One background task per watched service long-polls `GET /v1/health/service/<name>?passing=true`
    with `index`/`wait`, so a check going critical reaches `addresses()` as soon as Consul knows.
    While the agent is unreachable or failing, the last known list is kept and the query is retried
    with exponential backoff. Services are watched from `start()` on if given to the constructor, or
    from the first `addresses()`/`wait_for()` that names them, whatever the name and however long
    after the start: a definition loaded later may call a service nobody asked for before. That first
    `addresses()` answers [] (the query has only just been sent); `wait_for` (and `unresolvable`)
    waits for its answer.
    """

    def __init__(
        self,
        settings: ConsulSettings,
        services: Iterable[str] = (),
        *,
        blocking_wait: float = 30.0,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
        burst: int = 5,
        queries_per_second: float = 1.0,
    ) -> None:
        self._settings = settings
        self._initial_services = [check_service_name(name, source="ConsulResolver service") for name in services]
        self._blocking_wait = blocking_wait
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._burst = burst
        self._queries_per_second = queries_per_second
        self._watches: dict[str, _Watch] = {}
        self._started = False
        self._closed = False

    @property
    def settings(self) -> ConsulSettings:
        return self._settings

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("ConsulResolver is closed")
        self._started = True
        for service in self._initial_services:
            self._ensure_watch(service)
        for service in list(self._watches):
            self._ensure_watch(service)

    def addresses(self, service: str) -> list[str]:
        return list(self._ensure_watch(service).addresses)

    def last_error(self, service: str) -> str | None:
        """The most recent failure talking to Consul about `service`, or None once it answered."""
        watch = self._watches.get(service)
        return watch.last_error if watch else None

    async def wait_for(self, service: str, timeout: float) -> list[str]:  # noqa: ASYNC109
        if not self._started or self._closed:
            raise RuntimeError("ConsulResolver.wait_for needs start() first (and no close())")
        watch = self._ensure_watch(service)
        if watch.refused is not None:
            raise LookupError(watch.refused)
        deadline = time.monotonic() + timeout
        while not watch.addresses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = f"; last Consul error: {watch.last_error}" if watch.last_error else ""
                raise TimeoutError(
                    f"no healthy instance of {service!r} in Consul at {self._settings.url} within {timeout:g}s{reason}"
                )
            event = watch.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
        return list(watch.addresses)

    async def close(self) -> None:
        self._closed = True
        tasks = [watch.task for watch in self._watches.values() if watch.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _ensure_watch(self, service: str) -> _Watch:
        watch = self._watches.get(service)
        if watch is None:
            watch = _Watch()
            try:
                check_service_name(service, source="Consul service")
            except ValueError as error:
                watch.refused = watch.last_error = str(error)
                log.error("not watching %r in Consul: %s", service, error)
            self._watches[service] = watch
        if self._started and not self._closed and watch.task is None and watch.refused is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called from outside the event loop: the next call inside starts it
                return watch
            watch.task = loop.create_task(self._watch_loop(service, watch), name=f"consul-watch-{service}")
        return watch

    def _publish(self, watch: _Watch, addresses: list[str]) -> None:
        watch.addresses = addresses
        # Wake every waiter, then hand later waiters a fresh event.
        watch.changed.set()
        watch.changed = asyncio.Event()

    async def _watch_loop(self, service: str, watch: _Watch) -> None:
        # One client per watch: requests sessions are not meant to be shared across threads.
        client = self._settings.client()
        wait = f"{max(1, round(self._blocking_wait * 1000))}ms"
        index = 0
        retry_delay = self._retry_initial
        limiter = _TokenBucket(self._burst, self._queries_per_second)

        def query(at_index: int) -> tuple[str, list[dict[str, Any]]]:
            # index=None makes py-consul send no index at all: a plain, non-blocking read.
            result: tuple[str, list[dict[str, Any]]] = client.health.service(
                service, index=str(at_index) if at_index > 0 else None, wait=wait, passing=True
            )
            return result

        while True:
            pause = limiter.delay()
            if pause > 0:
                await asyncio.sleep(pause)
            try:
                raw_index, entries = await _run_in_daemon_thread(
                    functools.partial(query, index), name=f"consul-query-{service}"
                )
                new_index = int(raw_index)
                addresses = sorted({a for a in map(_instance_address, entries) if a is not None})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}"
                if watch.last_error is None:
                    log.warning(
                        "consul query for %r failed, keeping %d known address(es): %s",
                        service,
                        len(watch.addresses),
                        message,
                    )
                else:
                    log.debug("consul query for %r still failing: %s", service, message)
                watch.last_error = message
                # Changes may have been missed while failing (or the agent restarted with other
                # indexes): read afresh without blocking once it answers again.
                index = 0
                await asyncio.sleep(retry_delay / 2 + random.uniform(0, retry_delay / 2))
                retry_delay = min(self._retry_max, retry_delay * 2)
                continue

            if watch.last_error is not None:
                log.info("consul query for %r succeeded again", service)
                watch.last_error = None
            retry_delay = self._retry_initial
            if addresses != watch.addresses:
                log.info("healthy instances of %r: %s", service, ", ".join(addresses) or "none")
            self._publish(watch, addresses)

            if new_index < index:
                # Documented edge case: indexes can go backwards (snapshot restore, ...). Blocking on
                # the old, higher index could miss updates for a long time, so restart the loop.
                index = 0
            else:
                # Documented sanity check: an index below 1 would not block and would busy-loop.
                index = max(new_index, 1)


# --------------------------------------------------------------------------- Consul registration


class ConsulRegistration:
    """Registers this process's service instance with the local Consul agent, with a gRPC health check."""

    def __init__(self, settings: ConsulSettings, *, timeout: float | None = 30.0) -> None:
        self._settings = settings
        self._client = settings.client()
        # py-consul's per-request timeout (connect and read); it has no public setter after construction.
        self._client.http.connections_timeout = timeout

    def register(
        self,
        name: str,
        instance_id: str,
        address: str,
        port: int,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        *,
        check_interval: str = "5s",
        check_timeout: str = "2s",
        deregister_critical_after: str = "1m",
        grpc_use_tls: bool = False,
        tls_server_name: str = "",
    ) -> None:
        """PUT /v1/agent/service/register with a native gRPC check on address:port.

        With `tls_server_name`, a TLS check verifies that name in the certificate (and sends it as SNI)
        instead of the address: since Consul 1.17 the check's TLSServerName is the only name it uses.

        Raises consul.ACLPermissionDenied (403) or another consul.ConsulException on refusal and
        requests' exceptions when the agent cannot be reached.
        """
        check = {
            "GRPC": format_host_port(address, port),
            "GRPCUseTLS": grpc_use_tls,
            "Interval": check_interval,
            "Timeout": check_timeout,
            "DeregisterCriticalServiceAfter": deregister_critical_after,
        }
        if tls_server_name:
            check["TLSServerName"] = tls_server_name
        self._client.agent.service.register(
            name,
            service_id=instance_id,
            address=address,
            port=port,
            tags=list(tags),
            meta=dict(meta or {}),
            check=check,
            # Re-registering the same instance id (a restart) must not leave stale checks behind.
            replace_existing_checks=True,
        )

    def deregister(self, instance_id: str) -> bool:
        """PUT /v1/agent/service/deregister/<id>; False if the agent did not know that id (its 404)."""
        removed: bool = self._client.agent.service.deregister(instance_id)
        return removed

    def is_registered(self, instance_id: str) -> bool:
        """Whether the agent has `instance_id` (GET /v1/agent/services): false after an agent lost its state."""
        services: dict[str, Any] = self._client.agent.services()
        return instance_id in services

    async def is_registered_async(self, instance_id: str) -> bool:
        return await asyncio.to_thread(self.is_registered, instance_id)

    async def register_async(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(self.register, *args, **kwargs)

    async def deregister_async(self, instance_id: str) -> bool:
        return await asyncio.to_thread(self.deregister, instance_id)


# --------------------------------------------------------------------------- choice


def make_resolver(
    environ: Mapping[str, str] = os.environ, services: Iterable[str] = SUITE_SERVICES, *, required: bool = True
) -> Resolver:
    """DISCOVERY=consul gives a ConsulResolver; DISCOVERY=static or unset, a StaticResolver.

    Either resolves any service name asked for later; `services` are the ones known now: Consul watches
    them from the start, static discovery reads and checks their addresses at once, and with `required`
    a missing one is a ValueError (without it, `unresolvable()` reports it). A malformed setting, or
    a name in `services` that cannot name a service, is a ValueError naming it.
    """
    mode = environ.get("DISCOVERY", "").strip().lower() or "static"
    if mode == "consul":
        return ConsulResolver(ConsulSettings.from_env(environ), services)
    if mode == "static":
        return StaticResolver.from_env(services, environ, required=required)
    raise ValueError(f"DISCOVERY={environ.get('DISCOVERY')!r}: expected 'static' (the default) or 'consul'")


async def unresolvable(resolver: Resolver, services: Iterable[str], timeout: float) -> dict[str, str]:  # noqa: ASYNC109
    """The services among `services` that `resolver` cannot resolve, by name, each with the reason.

    Static discovery answers at once (an address missing now will not appear later). Consul gets at most
    `timeout` seconds in all, for every service at once, to report a healthy instance; this also
    starts the watch of a name seen for the first time, so its first saga step finds it ready.
    Call it after `resolver.start()`; an empty result means every service can be called.
    """
    names = sorted(set(services))

    async def reason(service: str) -> str | None:
        try:
            await resolver.wait_for(service, max(0.0, timeout))
        except (LookupError, TimeoutError) as error:
            return str(error)
        return None

    reasons = await asyncio.gather(*(reason(name) for name in names))
    return {name: why for name, why in zip(names, reasons, strict=True) if why is not None}
