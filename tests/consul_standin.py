"""A stand-in Consul agent speaking the documented HTTP API the suite uses, with real gRPC health checks."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["ConsulStandIn", "parse_go_duration"]

# Agent-side limits, as documented (agent/check.mdx) and as the agent applies them.
_MIN_CHECK_INTERVAL = 1.0
_MIN_DEREGISTER_AFTER = 60.0
_CHECK_REAP_INTERVAL = 30.0
_DEFAULT_CHECK_TIMEOUT = 10.0
# features/blocking.mdx: wait defaults to 5 minutes, is capped at 10, plus up to wait/16 of jitter.
_DEFAULT_WAIT = 300.0
_MAX_WAIT = 600.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_UNSUPPORTED_CHECK_KINDS = (
    "http",
    "tcp",
    "udp",
    "ttl",
    "args",
    "scriptargs",
    "script",
    "h2ping",
    "dockercontainerid",
    "aliasservice",
    "aliasnode",
    "osservice",
)


def parse_go_duration(value: Any) -> float:
    """Seconds in a Go duration ("200ms", "1.5s", "1m30s", "0"); a bare number counts nanoseconds."""
    if isinstance(value, bool):
        raise ValueError(f"time: invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    text = str(value).strip()
    if text in {"", "0"}:
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(body) or position == 0:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def _format_go_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{hours}h" if hours else ""
    text += f"{minutes}m" if hours or minutes else ""
    return text + f"{rest:g}s"


def _normalize_keys(definition: Any) -> dict[str, Any]:
    """The agent decodes definitions case-insensitively and accepts snake_case aliases."""
    if not isinstance(definition, dict):
        raise _HTTPError(400, "Request decode failed: expected a JSON object")
    return {str(key).replace("_", "").lower(): value for key, value in definition.items()}


def _parse_bool_param(params: dict[str, list[str]], name: str) -> bool:
    if name not in params:
        return False
    value = params[name][0].strip().lower()
    if value == "":
        return True
    if value in {"1", "t", "true"}:
        return True
    if value in {"0", "f", "false"}:
        return False
    raise _HTTPError(400, f"Invalid value for ?{name}")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Aborted(Exception):
    """The agent is stopping: drop the connection without an answer, as a dying agent would."""


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    grpc_target: str
    use_tls: bool
    tls_server_name: str
    interval: float
    timeout: float
    deregister_after: float
    success_before_passing: int
    failures_before_critical: int
    notes: str
    status: str
    output: str
    create_index: int
    modify_index: int
    critical_since: float | None
    definition_interval: str
    definition_timeout: str
    successes: int = 0
    failures: int = 0
    runner: _CheckRunner | None = None


@dataclass
class _Service:
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int
    check_ids: list[str] = field(default_factory=list)


class _CheckRunner(threading.Thread):
    def __init__(self, agent: ConsulStandIn, check: _Check) -> None:
        super().__init__(name=f"consul-standin-check-{check.check_id}", daemon=True)
        self._agent = agent
        self._check = check
        self.stopping = threading.Event()

    def run(self) -> None:
        check = self._check
        # Consul staggers a check's first run randomly within its interval.
        if self.stopping.wait(random.uniform(0, check.interval)):
            return
        while not self.stopping.is_set():
            try:
                credentials = self._agent._check_credentials() if check.use_tls else None
            except OSError as error:
                healthy, output = False, f"gRPC check {check.grpc_target}: failed: agent TLS files: {error}"
            else:
                healthy, output = _probe_grpc_health(
                    check.grpc_target, credentials, check.tls_server_name, check.timeout
                )
            if self.stopping.is_set():
                return
            self._agent._record_check_result(check, self, healthy, output)
            if self.stopping.wait(check.interval):
                return


def _probe_grpc_health(
    target: str, credentials: grpc.ChannelCredentials | None, tls_server_name: str, timeout: float
) -> tuple[bool, str]:
    address, _, service = target.partition("/")
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        # As Consul since 1.17: the certificate must name the check's TLSServerName (also sent as SNI),
        # and without one the host of the check's address; the agent's server_name plays no part.
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        name = code.name if code is not None else "Unknown"
        return False, f"gRPC check {target}: failed: rpc error: code = {name} desc = {details}"
    finally:
        channel.close()
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return True, f"gRPC check {target}: success"
    return False, f"gRPC check {target}: failed: serving status {status_name}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.agent._connections.add(self.connection)

    def finish(self) -> None:
        self.server.agent._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.agent.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        agent = self.server.agent
        parsed = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload, headers = agent._route(method, self.path, parsed.path, params, dict(self.headers), body)
        except _Aborted:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        except _HTTPError as error:
            self._send(error.status, error.message.encode(), "text/plain; charset=utf-8", agent._base_headers())
            return
        if isinstance(payload, bytes):
            data, content_type = payload, "text/plain; charset=utf-8"
        else:
            data = json.dumps(payload).encode()
            content_type = "application/json"
        self._send(status, data, content_type, headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], agent: ConsulStandIn) -> None:
        self.agent = agent
        super().__init__(address, _Handler)


class ConsulStandIn:
    """One Consul agent (and its single-node catalog) on a loopback HTTP port.

    Written from Consul's API documentation (website/content/api-docs: agent/service.mdx, agent/check.mdx,
    health.mdx, catalog.mdx, status.mdx, features/blocking.mdx, api-structure.mdx) because the Consul
    agent is not packaged for these machines; where the docs are silent or differ from the agent, the
    agent's code decides (acl/errors.go messages, check ids and initial status, the deregister 404).
    It implements:

    - PUT /v1/agent/service/register (Check / Checks with GRPC, GRPCUseTLS, TLSServerName, Interval, Timeout,
      DeregisterCriticalServiceAfter, Status, SuccessBeforePassing, FailuresBeforeCritical; keys in
      CamelCase or snake_case, case-insensitive, as the agent accepts them; ?replace-existing-checks)
    - PUT /v1/agent/service/deregister/:service_id (an unknown id: 404, as the agent's code does)
    - GET /v1/agent/services, GET /v1/agent/checks
    - GET /v1/health/service/:service (?passing, ?tag, blocking ?index=&wait=, X-Consul-Index)
    - GET /v1/catalog/service/:service (?tag, blocking ?index=&wait=)
    - GET /v1/status/leader

    Checks really run: every Interval the agent calls grpc.health.v1.Health/Check on the target with the
    check's Timeout over a fresh connection (as Consul's probe does), sets passing/critical, and bumps the
    index when the status changes so blocking queries return. A service whose check stayed critical
    longer than DeregisterCriticalServiceAfter is reaped. As in Consul, checks start critical, the first
    run is staggered randomly within the interval, intervals below 1s are raised to 1s, deregistration
    timeouts below 1m are raised to 1m and the reaper runs every 30s; tests may lower these three
    agent-side limits through the constructor (a real agent has them as internal settings).

    A TLS check (GRPCUseTLS) verifies the server's certificate against `check_tls_ca_file` (the system's
    roots without one) for the check's TLSServerName, or the host of its address, and presents
    `check_tls_cert_file`/`check_tls_key_file` when given: an agent with enable_agent_tls_for_checks and
    those files in tls.defaults.

    With `acl_token`, ACLs are on with default policy deny: that token is a management token, a request
    with another token gets 403 "ACL not found", and a request without one is anonymous: its writes get
    403 "Permission denied: anonymous token lacks permission ..." and its reads are filtered to nothing.

    Not implemented: HTTP/TCP/TTL/script checks (400), ?filter (400), namespaces, datacenters, the
    catalog write API, hash-based blocking, agent caching, TLSSkipVerify for gRPC-over-TLS checks.

    Run in-process (`ConsulStandIn(port=0).start()`) or as a process:
    `python tests/consul_standin.py --port 8500` (prints "consul stand-in listening on http://HOST:PORT").
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        acl_token: str | None = None,
        min_check_interval: float = _MIN_CHECK_INTERVAL,
        min_deregister_after: float = _MIN_DEREGISTER_AFTER,
        check_reap_interval: float = _CHECK_REAP_INTERVAL,
        node_name: str = "consul-standin",
        datacenter: str = "dc1",
        check_tls_ca_file: str = "",
        check_tls_cert_file: str = "",
        check_tls_key_file: str = "",
        verbose: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self.acl_token = acl_token
        self.min_check_interval = min_check_interval
        self.min_deregister_after = min_deregister_after
        self.check_reap_interval = check_reap_interval
        self.node_name = node_name
        self.datacenter = datacenter
        self.check_tls_files = (check_tls_ca_file, check_tls_cert_file, check_tls_key_file)
        self.verbose = verbose
        self.node_id = str(uuid.uuid4())
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._index = 1
        self._name_index: dict[str, int] = {}
        self._extinction_index = 1
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        # (method, path?query, token or None) of every request, so tests can see what clients sent.
        self.requests_seen: list[tuple[str, str, str | None]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> ConsulStandIn:
        """Listen (on the same port again after a stop, like a restarted agent with its state)."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._port = self._server.server_address[1]
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="consul-standin-http",
            daemon=True,
        )
        self._serve_thread.start()
        with self._lock:
            for check in self._checks.values():
                self._start_runner(check)
        self._reaper = threading.Thread(target=self._reap_loop, name="consul-standin-reaper", daemon=True)
        self._reaper.start()
        return self

    def stop(self) -> None:
        """Stop answering at once: open connections (and pending blocking queries) are cut."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
            runners = [c.runner for c in self._checks.values() if c.runner is not None]
            for check in self._checks.values():
                check.runner = None
        for runner in runners:
            runner.stopping.set()
        server.shutdown()
        server.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for runner in runners:
            runner.join(timeout=5)
        if self._reaper is not None:
            self._reaper.join(timeout=5)

    def __enter__(self) -> ConsulStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def rewind_index(self, to: int) -> None:
        """Test hook, not a Consul API: make every index drop to `to`, as after a Raft snapshot restore
        (the documented reason an X-Consul-Index can go backwards)."""
        with self._changed:
            self._index = max(1, to)
            self._name_index = {name: min(value, self._index) for name, value in self._name_index.items()}
            self._extinction_index = min(self._extinction_index, self._index)
            for service in self._services.values():
                service.create_index = min(service.create_index, self._index)
                service.modify_index = min(service.modify_index, self._index)
            for check in self._checks.values():
                check.create_index = min(check.create_index, self._index)
                check.modify_index = min(check.modify_index, self._index)
            self._changed.notify_all()

    # ------------------------------------------------------------------ state changes (lock held)

    def _bump(self, *names: str) -> int:
        self._index += 1
        for name in names:
            self._name_index[name] = self._index
        self._changed.notify_all()
        return self._index

    def _check_credentials(self) -> grpc.ChannelCredentials:
        """The TLS identity the agent's checks use (read afresh each run, as files may be rotated)."""
        ca_file, cert_file, key_file = self.check_tls_files
        return grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes() if ca_file else None,
            private_key=Path(key_file).read_bytes() if key_file else None,
            certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
        )

    def _start_runner(self, check: _Check) -> None:
        runner = _CheckRunner(self, check)
        check.runner = runner
        runner.start()

    def _stop_runner(self, check: _Check) -> None:
        if check.runner is not None:
            check.runner.stopping.set()
            check.runner = None

    def _remove_service(self, service_id: str) -> None:
        service = self._services.pop(service_id, None)
        if service is None:
            return
        for check_id in service.check_ids:
            check = self._checks.pop(check_id, None)
            if check is not None:
                self._stop_runner(check)
        index = self._bump(service.name)
        if not any(s.name == service.name for s in self._services.values()):
            self._extinction_index = index

    def _record_check_result(self, check: _Check, runner: _CheckRunner, healthy: bool, output: str) -> None:
        with self._changed:
            if check.runner is not runner or self._checks.get(check.check_id) is not check:
                return  # the check was replaced or removed while this probe ran
            check.output = output
            if healthy:
                check.successes += 1
                check.failures = 0
                new_status = "passing" if check.successes >= check.success_before_passing else check.status
            else:
                check.failures += 1
                check.successes = 0
                new_status = "critical" if check.failures >= check.failures_before_critical else check.status
            if new_status == check.status:
                # Output-only changes are not synced at once by a real agent either, so no index bump.
                return
            check.status = new_status
            check.critical_since = time.monotonic() if new_status == "critical" else None
            service = self._services.get(check.service_id)
            check.modify_index = self._bump(*([service.name] if service else []))

    def _reap_loop(self) -> None:
        while not self._stopping.wait(self.check_reap_interval):
            now = time.monotonic()
            with self._changed:
                doomed = set()
                for check in self._checks.values():
                    if check.deregister_after <= 0 or check.critical_since is None:
                        continue
                    limit = max(check.deregister_after, self.min_deregister_after)
                    if now - check.critical_since > limit:
                        doomed.add(check.service_id)
                for service_id in doomed:
                    self._remove_service(service_id)

    # ------------------------------------------------------------------ HTTP

    def _base_headers(self) -> dict[str, str]:
        return {"X-Consul-Default-Acl-Policy": "deny" if self.acl_token else "allow"}

    @staticmethod
    def _token_of(headers: dict[str, str], params: dict[str, list[str]]) -> str:
        """X-Consul-Token, else Authorization: Bearer, else the deprecated ?token= (api-structure.mdx)."""
        lowered = {key.lower(): value for key, value in headers.items()}
        token = lowered.get("x-consul-token", "")
        authorization = lowered.get("authorization", "")
        if not token and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        if not token and "token" in params:
            token = params["token"][0]
        return token

    def _caller(self, token: str) -> str:
        """'management', 'anonymous' or 'acl-disabled'; an unknown token is refused as Consul does."""
        if self.acl_token is None:
            return "acl-disabled"
        if not token:
            return "anonymous"
        if token == self.acl_token:
            return "management"
        raise _HTTPError(403, "ACL not found")

    @staticmethod
    def _require_write(caller: str, service_name: str) -> None:
        if caller == "anonymous":
            raise _HTTPError(
                403,
                f"Permission denied: anonymous token lacks permission 'service:write' on \"{service_name}\". "
                "The anonymous token is used implicitly when a request does not specify a token.",
            )

    def _route(
        self,
        method: str,
        target: str,
        path: str,
        params: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[int, Any, dict[str, str]]:
        if self._stopping.is_set():
            raise _Aborted
        token = self._token_of(headers, params)
        with self._lock:
            self.requests_seen.append((method, target, token or None))
            if len(self.requests_seen) > 20_000:  # a long-running stand-in must not grow without bound
                del self.requests_seen[:10_000]
        if path == "/v1/status/leader":
            self._allow(method, "GET")
            return 200, f"{self._host}:8300", self._base_headers()
        caller = self._caller(token)
        if path == "/v1/agent/service/register":
            self._allow(method, "PUT")
            return self._register(caller, params, body)
        if path.startswith("/v1/agent/service/deregister/"):
            self._allow(method, "PUT")
            return self._deregister(caller, urllib.parse.unquote(path.rsplit("/", 1)[1]))
        if path == "/v1/agent/services":
            self._allow(method, "GET")
            self._reject_filter(params)
            with self._lock:
                services = {} if caller == "anonymous" else self._agent_services()
            return 200, services, self._base_headers()
        if path == "/v1/agent/checks":
            self._allow(method, "GET")
            self._reject_filter(params)
            with self._lock:
                checks = {} if caller == "anonymous" else self._agent_checks()
            return 200, checks, self._base_headers()
        if path.startswith("/v1/health/service/"):
            self._allow(method, "GET")
            name = urllib.parse.unquote(path[len("/v1/health/service/") :])
            return self._blocking_read(caller, name, params, self._health_entries)
        if path.startswith("/v1/catalog/service/"):
            self._allow(method, "GET")
            name = urllib.parse.unquote(path[len("/v1/catalog/service/") :])
            return self._blocking_read(caller, name, params, self._catalog_entries)
        raise _HTTPError(404, f"Invalid URL path: not a recognized HTTP API endpoint: {path}")

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise _HTTPError(405, f"method {method} not allowed")

    @staticmethod
    def _reject_filter(params: dict[str, list[str]]) -> None:
        if "filter" in params:
            raise _HTTPError(400, "the Consul stand-in does not implement ?filter")

    def _register(self, caller: str, params: dict[str, list[str]], body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            raw = json.loads(body or b"null")
        except json.JSONDecodeError as error:
            raise _HTTPError(400, f"Request decode failed: {error}") from None
        definition = _normalize_keys(raw)
        name = str(definition.get("name") or "")
        if not name:
            raise _HTTPError(400, "Missing service name")
        self._require_write(caller, name)
        service_id = str(definition.get("id") or name)
        port = definition.get("port") or 0
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
            raise _HTTPError(400, f"Request decode failed: invalid port {port!r}")
        check_definitions = []
        if definition.get("check"):
            check_definitions.append(_normalize_keys(definition["check"]))
        for item in definition.get("checks") or []:
            check_definitions.append(_normalize_keys(item))
        parsed_checks = [self._parse_check(item) for item in check_definitions]
        replace_checks = _parse_bool_param(params, "replace-existing-checks")

        with self._changed:
            previous = self._services.get(service_id)
            index = self._bump(name, *([previous.name] if previous and previous.name != name else []))
            service = _Service(
                service_id=service_id,
                name=name,
                tags=[str(tag) for tag in definition.get("tags") or []],
                address=str(definition.get("address") or ""),
                port=port,
                meta={str(k): str(v) for k, v in (definition.get("meta") or {}).items()},
                weights=dict(definition.get("weights") or {"Passing": 1, "Warning": 1}),
                enable_tag_override=bool(definition.get("enabletagoverride", False)),
                create_index=previous.create_index if previous else index,
                modify_index=index,
            )
            kept_ids: list[str] = []
            if previous is not None and not replace_checks:
                kept_ids = list(previous.check_ids)
            new_ids = []
            for position, check_args in enumerate(parsed_checks, start=1):
                check_id = check_args.pop("check_id") or (
                    f"service:{service_id}" + (f":{position}" if len(parsed_checks) > 1 else "")
                )
                check_name = check_args.pop("name") or f"Service '{name}' check"
                existing = self._checks.get(check_id)
                if existing is not None:
                    self._stop_runner(existing)
                # As the agent does: new checks start critical unless Status says otherwise, and a
                # re-registered check keeps its current status and output.
                initial_status = existing.status if existing else (check_args.pop("status") or "critical")
                check_args.pop("status", None)
                check = _Check(
                    check_id=check_id,
                    name=check_name,
                    service_id=service_id,
                    status=initial_status,
                    output=existing.output if existing else "",
                    create_index=existing.create_index if existing else index,
                    modify_index=index,
                    critical_since=(
                        (existing.critical_since if existing and existing.critical_since else time.monotonic())
                        if initial_status == "critical"
                        else None
                    ),
                    **check_args,
                )
                self._checks[check_id] = check
                new_ids.append(check_id)
                if self._server is not None:
                    self._start_runner(check)
            for check_id in kept_ids:
                if check_id not in new_ids and check_id in self._checks:
                    new_ids.append(check_id)
            if previous is not None and replace_checks:
                for check_id in previous.check_ids:
                    if check_id not in new_ids:
                        dropped = self._checks.pop(check_id, None)
                        if dropped is not None:
                            self._stop_runner(dropped)
            service.check_ids = new_ids
            self._services[service_id] = service
        return 200, b"", self._base_headers()

    def _parse_check(self, check: dict[str, Any]) -> dict[str, Any]:
        unsupported = [kind for kind in _UNSUPPORTED_CHECK_KINDS if check.get(kind)]
        if unsupported:
            raise _HTTPError(400, f"the Consul stand-in runs GRPC checks only, not {unsupported[0]!r}")
        target = str(check.get("grpc") or "")
        if not target:
            raise _HTTPError(400, "Invalid check: the Consul stand-in needs a GRPC check target")
        try:
            interval = parse_go_duration(check.get("interval", ""))
            given_timeout = parse_go_duration(check.get("timeout", ""))
            deregister_after = parse_go_duration(check.get("deregistercriticalserviceafter", ""))
        except ValueError as error:
            raise _HTTPError(400, f"Request decode failed: {error}") from None
        if interval <= 0:
            raise _HTTPError(
                400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks"
            )
        status = str(check.get("status") or "")
        if status and status not in {"passing", "warning", "critical"}:
            raise _HTTPError(400, f"Invalid check status: {status!r}")
        return {
            "check_id": str(check.get("checkid") or check.get("id") or ""),
            "name": str(check.get("name") or ""),
            "status": status,
            "grpc_target": target,
            "use_tls": bool(check.get("grpcusetls", False)),
            "tls_server_name": str(check.get("tlsservername") or ""),
            "interval": max(interval, self.min_check_interval),
            "timeout": given_timeout if given_timeout > 0 else _DEFAULT_CHECK_TIMEOUT,
            "deregister_after": deregister_after,
            "success_before_passing": int(check.get("successbeforepassing") or 0),
            "failures_before_critical": int(check.get("failuresbeforecritical") or 0),
            "notes": str(check.get("notes") or ""),
            "definition_interval": _format_go_duration(interval),
            # The check's JSON shows the Timeout as registered: empty when the 10s default applies.
            "definition_timeout": _format_go_duration(given_timeout) if given_timeout > 0 else "",
        }

    def _deregister(self, caller: str, service_id: str) -> tuple[int, Any, dict[str, str]]:
        with self._changed:
            service = self._services.get(service_id)
            if service is None:
                # agent/service.mdx says an unknown id is a no-op, but the agent itself answers 404
                # (vetServiceUpdateWithAuthorizer); tests also run against a real agent, so do as it does.
                raise _HTTPError(
                    404,
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.',
                )
            self._require_write(caller, service.name)
            self._remove_service(service_id)
        return 200, b"", self._base_headers()

    # ------------------------------------------------------------------ reads

    def _service_index(self, name: str) -> int:
        # Consul's index for a service name is its own table index; a name never seen falls back to
        # the last index at which some service disappeared. Never below 1 (features/blocking.mdx).
        return max(1, self._name_index.get(name, self._extinction_index))

    def _blocking_read(
        self, caller: str, name: str, params: dict[str, list[str]], render: Any
    ) -> tuple[int, Any, dict[str, str]]:
        self._reject_filter(params)
        min_index = 0
        if params.get("index", [""])[0] != "":
            try:
                min_index = int(params["index"][0])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise _HTTPError(400, "Invalid index") from None
        wait = _DEFAULT_WAIT
        if params.get("wait", [""])[0] != "":
            try:
                wait = parse_go_duration(params["wait"][0])
            except ValueError:
                raise _HTTPError(400, "Invalid wait time") from None
        if wait <= 0:
            wait = _DEFAULT_WAIT
        wait = min(wait, _MAX_WAIT)
        passing = _parse_bool_param(params, "passing")
        tags = params.get("tag", [])
        with self._changed:
            if min_index > 0:
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
                while self._service_index(name) <= min_index:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping.is_set():
                        break
                    self._changed.wait(remaining)
                if self._stopping.is_set():
                    raise _Aborted
            index = self._service_index(name)
            entries = [] if caller == "anonymous" else render(name, passing, tags)
        headers = {
            **self._base_headers(),
            "X-Consul-Index": str(index),
            "X-Consul-Knownleader": "true",
            "X-Consul-Lastcontact": "0",
            "X-Consul-Effective-Consistency": "leader",
        }
        return 200, entries, headers

    def _node(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self._host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self._host,
                "lan_ipv4": self._host,
                "wan": self._host,
                "wan_ipv4": self._host,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _serf_check(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _check_json(self, check: _Check) -> dict[str, Any]:
        service = self._services.get(check.service_id)
        return {
            "Node": self.node_name,
            "CheckID": check.check_id,
            "Name": check.name,
            "Status": check.status,
            "Notes": check.notes,
            "Output": check.output,
            "ServiceID": check.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": "grpc",
            "Interval": check.definition_interval,
            "Timeout": check.definition_timeout,
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    @staticmethod
    def _tagged_addresses(service: _Service) -> dict[str, Any]:
        # The agent adds lan_ipv4/wan_ipv4 entries for a service registered with an IPv4 address.
        if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", service.address):
            entry = {"Address": service.address, "Port": service.port}
            return {"lan_ipv4": dict(entry), "wan_ipv4": dict(entry)}
        return {}

    def _service_json(self, service: _Service) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Address": service.address,
            "TaggedAddresses": self._tagged_addresses(service),
            "Meta": dict(service.meta),
            "Port": service.port,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def _matching(self, name: str, tags: list[str]) -> list[_Service]:
        found = [s for s in self._services.values() if s.name == name and all(t in s.tags for t in tags)]
        return sorted(found, key=lambda s: s.service_id)

    def _health_entries(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        entries = []
        for service in self._matching(name, tags):
            checks = [self._serf_check()]
            checks += [self._check_json(self._checks[c]) for c in service.check_ids if c in self._checks]
            if passing and any(check["Status"] != "passing" for check in checks):
                continue
            entries.append({"Node": self._node(), "Service": self._service_json(service), "Checks": checks})
        return entries

    def _catalog_entries(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        node = self._node()
        entries = []
        for service in self._matching(name, tags):
            entries.append(
                {
                    "ID": node["ID"],
                    "Node": node["Node"],
                    "Address": node["Address"],
                    "Datacenter": node["Datacenter"],
                    "TaggedAddresses": node["TaggedAddresses"],
                    "NodeMeta": node["Meta"],
                    "ServiceKind": "",
                    "ServiceID": service.service_id,
                    "ServiceName": service.name,
                    "ServiceTags": list(service.tags),
                    "ServiceAddress": service.address,
                    "ServiceTaggedAddresses": self._tagged_addresses(service),
                    "ServiceWeights": dict(service.weights),
                    "ServiceMeta": dict(service.meta),
                    "ServicePort": service.port,
                    "ServiceEnableTagOverride": service.enable_tag_override,
                    "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "ServiceConnect": {},
                    "CreateIndex": service.create_index,
                    "ModifyIndex": service.modify_index,
                }
            )
        return entries

    def _agent_services(self) -> dict[str, Any]:
        result = {}
        for service in sorted(self._services.values(), key=lambda s: s.service_id):
            entry = self._service_json(service)
            for internal in ("CreateIndex", "ModifyIndex", "PeerName"):
                entry.pop(internal)
            entry["Datacenter"] = self.datacenter
            result[service.service_id] = entry
        return result

    def _agent_checks(self) -> dict[str, Any]:
        return {check_id: self._check_json(check) for check_id, check in sorted(self._checks.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Consul stand-in agent until SIGTERM/SIGINT.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500, help="0 picks a free port (printed on start)")
    parser.add_argument("--acl-token", default=None, help="turn ACLs on with this management token")
    parser.add_argument("--min-check-interval", type=float, default=_MIN_CHECK_INTERVAL)
    parser.add_argument("--min-deregister-after", type=float, default=_MIN_DEREGISTER_AFTER)
    parser.add_argument("--check-reap-interval", type=float, default=_CHECK_REAP_INTERVAL)
    parser.add_argument("--check-tls-ca-file", default="", help="CA that TLS checks verify servers with")
    parser.add_argument("--check-tls-cert-file", default="", help="certificate TLS checks present")
    parser.add_argument("--check-tls-key-file", default="", help="its key")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    agent = ConsulStandIn(
        args.port,
        host=args.host,
        acl_token=args.acl_token,
        min_check_interval=args.min_check_interval,
        min_deregister_after=args.min_deregister_after,
        check_reap_interval=args.check_reap_interval,
        check_tls_ca_file=args.check_tls_ca_file,
        check_tls_cert_file=args.check_tls_cert_file,
        check_tls_key_file=args.check_tls_key_file,
        verbose=args.verbose,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent.start()
    print(f"consul stand-in listening on {agent.url}", flush=True)
    stop.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
