"""Consul discovery against real gRPC servers on loopback, through the Consul stand-in or a real agent."""

# With CONSUL_HTTP_ADDR set (and CONSUL_HTTP_TOKEN when the agent has ACLs) the same tests run against
# that agent, which must reach 127.0.0.1 on this host to run its gRPC checks; tests that stop or rewind
# the agent, or wait for its reaper, are skipped there.

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import consul
import grpc
import grpc.aio
import pytest
import requests
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from svckit.channels import ChannelPool, NoHealthyInstance
from svckit.discovery import ConsulRegistration, ConsulResolver, ConsulSettings, make_resolver, unresolvable
from tests.consul_standin import ConsulStandIn

STANDIN_SCRIPT = Path(__file__).resolve().parents[1] / "consul_standin.py"
REAL_AGENT = bool(os.environ.get("CONSUL_HTTP_ADDR"))
NEEDS_STANDIN = pytest.mark.skipif(REAL_AGENT, reason="needs to stop or rewind Consul: stand-in only")
# A real agent runs checks at least every 1s; the stand-in in these tests as registered (0.2s).
CHECK_INTERVAL = "200ms"
SETTLE = 15.0
WHOAMI = "/sagasuite.test.Whoami/Name"


@dataclass
class ConsulUnderTest:
    """The agent a test talks to, and the instances it registered (deregistered afterwards)."""

    settings: ConsulSettings
    standin: ConsulStandIn | None
    registered: list[str] = field(default_factory=list)

    def registration(self, token: str | None = "settings") -> ConsulRegistration:
        settings = self.settings if token == "settings" else _with_token(self.settings, token)
        return ConsulRegistration(settings)

    async def register(self, name: str, port: int, instance_id: str | None = None, **kwargs: Any) -> str:
        instance_id = instance_id or f"{name}-{port}"
        kwargs.setdefault("check_interval", CHECK_INTERVAL)
        kwargs.setdefault("check_timeout", "1s")
        await self.registration().register_async(
            name,
            instance_id,
            "127.0.0.1",
            port,
            kwargs.pop("tags", ["test"]),
            kwargs.pop("meta", None),
            **kwargs,
        )
        self.registered.append(instance_id)
        return instance_id

    def resolver(self, *services: str, token: str | None = "settings", blocking_wait: float = 2.0) -> ConsulResolver:
        settings = self.settings if token == "settings" else _with_token(self.settings, token)
        return ConsulResolver(
            settings,
            services,
            blocking_wait=blocking_wait,
            retry_initial=0.05,
            retry_max=0.5,
            burst=10,
            queries_per_second=20.0,
        )

    async def get(self, path: str, token: str | None = "settings") -> requests.Response:
        """A raw HTTP GET against the agent, independent of the code under test."""
        used = self.settings.token if token == "settings" else token
        headers = {"X-Consul-Token": used} if used else {}
        return await asyncio.to_thread(
            requests.get,
            self.settings.url + path,
            headers=headers,
            verify=self.settings.verify,
            cert=self.settings.client_cert,
            timeout=30,
        )

    async def put(self, path: str, body: str = "", token: str | None = "settings") -> requests.Response:
        used = self.settings.token if token == "settings" else token
        headers = {"X-Consul-Token": used} if used else {}
        return await asyncio.to_thread(
            requests.put,
            self.settings.url + path,
            data=body,
            headers=headers,
            verify=self.settings.verify,
            cert=self.settings.client_cert,
            timeout=30,
        )


def _with_token(settings: ConsulSettings, token: str | None) -> ConsulSettings:
    return ConsulSettings(
        host=settings.host,
        port=settings.port,
        scheme=settings.scheme,
        token=token,
        verify=settings.verify,
        client_cert=settings.client_cert,
    )


def _fast_standin(**kwargs: Any) -> ConsulStandIn:
    # The agent-side minimums (1s interval, 1m deregistration, 30s reaper) lowered so tests stay fast.
    return ConsulStandIn(min_check_interval=0.05, min_deregister_after=0.0, check_reap_interval=0.1, **kwargs)


async def _agent(acl_token: str | None) -> AsyncIterator[ConsulUnderTest]:
    if REAL_AGENT:
        under_test = ConsulUnderTest(ConsulSettings.from_env(), None)
    else:
        standin = _fast_standin(acl_token=acl_token).start()
        host, port = standin.address.rsplit(":", 1)
        under_test = ConsulUnderTest(ConsulSettings(host=host, port=int(port), token=acl_token), standin)
    try:
        yield under_test
    finally:
        if under_test.standin is not None:
            under_test.standin.stop()
        else:
            for instance_id in under_test.registered:
                with contextlib.suppress(Exception):
                    await under_test.registration().deregister_async(instance_id)


@pytest.fixture
async def consul_agent() -> AsyncIterator[ConsulUnderTest]:
    async for under_test in _agent(acl_token=None):
        yield under_test


@pytest.fixture
async def acl_consul_agent() -> AsyncIterator[ConsulUnderTest]:
    if REAL_AGENT and not ConsulSettings.from_env().token:
        pytest.skip("real agent without CONSUL_HTTP_TOKEN: cannot exercise ACLs")
    async for under_test in _agent(acl_token=str(uuid.uuid4())):
        yield under_test


@pytest.fixture
def service_name() -> str:
    return f"disco-{uuid.uuid4().hex[:8]}"


class Instance:
    """A real grpc.aio server on loopback: grpc.health.v1 plus a Whoami method answering its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lacks health.aio
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Instance:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((_whoami_handler(self.name),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    async def stop(self) -> None:
        await self.server.stop(None)


def _whoami_handler(name: str) -> grpc.GenericRpcHandler[bytes, bytes]:
    # No (de)serializers: requests and responses are raw bytes, so no generated code is needed.
    answer = name.encode()
    return grpc.method_handlers_generic_handler(
        "sagasuite.test.Whoami",
        {"Name": grpc.unary_unary_rpc_method_handler(lambda request, context: answer)},
    )


_SUBPROCESS_INSTANCE = """
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
answer = sys.argv[1].encode()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
whoami = grpc.unary_unary_rpc_method_handler(lambda request, context: answer)
server.add_generic_rpc_handlers(
    (grpc.method_handlers_generic_handler("sagasuite.test.Whoami", {"Name": whoami}),)
)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


@pytest.fixture
async def instances() -> AsyncIterator[Callable[[str], Awaitable[Instance]]]:
    started: list[Instance] = []

    async def start(name: str) -> Instance:
        instance = await Instance(name).start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.stop()


async def whoami(pool: ChannelPool, service: str) -> str:
    call = pool.channel(service).unary_unary(WHOAMI, request_serializer=None, response_deserializer=None)
    reply = await call(b"", timeout=2.0)
    assert isinstance(reply, bytes)
    return reply.decode()


async def eventually(check: Callable[[], Any], what: str, within: float = SETTLE) -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def _service_check(entry: dict[str, Any]) -> dict[str, Any]:
    service_id = entry["Service"]["ID"]
    return next(c for c in entry["Checks"] if c["ServiceID"] == service_id)


# --------------------------------------------------------------------------- registration


async def test_registration_appears_with_passing_grpc_check(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    instance = await instances("a")
    instance_id = await consul_agent.register(
        service_name, instance.port, tags=["grpc", "v1"], meta={"version": "1.2.3"}
    )

    async def passing_entries() -> list[dict[str, Any]]:
        response = await consul_agent.get(f"/v1/health/service/{service_name}?passing=true")
        assert response.status_code == 200, response.text
        assert int(response.headers["X-Consul-Index"]) >= 1
        return list(response.json())

    [entry] = await eventually(passing_entries, "the instance to pass its gRPC check")
    service = entry["Service"]
    assert (service["ID"], service["Service"], service["Address"], service["Port"]) == (
        instance_id,
        service_name,
        "127.0.0.1",
        instance.port,
    )
    assert service["Tags"] == ["grpc", "v1"]
    assert service["Meta"] == {"version": "1.2.3"}
    assert entry["Node"]["Node"] and entry["Node"]["Address"]
    check = _service_check(entry)
    assert check["Status"] == "passing"
    assert check["CheckID"] == f"service:{instance_id}"
    assert check["ServiceName"] == service_name

    agent_services = (await consul_agent.get("/v1/agent/services")).json()
    assert agent_services[instance_id]["Service"] == service_name
    assert agent_services[instance_id]["Port"] == instance.port
    [catalog_entry] = (await consul_agent.get(f"/v1/catalog/service/{service_name}")).json()
    assert (catalog_entry["ServiceID"], catalog_entry["ServicePort"]) == (instance_id, instance.port)
    leader = await consul_agent.get("/v1/status/leader")
    assert leader.status_code == 200 and isinstance(leader.json(), str) and leader.json()


async def test_register_without_a_name_is_rejected(consul_agent: ConsulUnderTest) -> None:
    response = await consul_agent.put("/v1/agent/service/register", "{}")
    assert response.status_code == 400


# --------------------------------------------------------------------------- failover


async def test_stopped_instance_goes_critical_and_pool_routes_to_the_survivor(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    survivor, doomed = await instances("survivor"), await instances("doomed")
    await consul_agent.register(service_name, survivor.port)
    doomed_id = await consul_agent.register(service_name, doomed.port)
    resolver = consul_agent.resolver(service_name)
    await resolver.start()
    pool = ChannelPool(resolver, retire_after=0.5)
    try:
        both = sorted([survivor.address, doomed.address])
        await eventually(lambda: resolver.addresses(service_name) == both, "both instances to be healthy")
        answers = {await whoami(pool, service_name) for _ in range(6)}
        assert answers == {"survivor", "doomed"}, "round-robin should reach both instances"

        await doomed.stop()
        await eventually(
            lambda: resolver.addresses(service_name) == [survivor.address],
            "the stopped instance to be dropped",
        )
        entries = (await consul_agent.get(f"/v1/health/service/{service_name}")).json()
        doomed_entry = next(e for e in entries if e["Service"]["ID"] == doomed_id)
        assert _service_check(doomed_entry)["Status"] == "critical"
        assert [await whoami(pool, service_name) for _ in range(6)] == ["survivor"] * 6

        # Its channel is retired once the address has been gone for retire_after (channel() sweeps).
        def retired() -> bool:
            pool.channel(service_name)
            return pool.addresses_with_channels() == [survivor.address]

        await eventually(retired, "the channel to the stopped instance to be retired")
    finally:
        await pool.close()
        await resolver.close()


async def test_sigkilled_subprocess_instance_is_dropped(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    survivor = await instances("survivor")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SUBPROCESS_INSTANCE, "victim", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        victim_port = int((await asyncio.wait_for(process.stdout.readline(), 20)).decode())
        await consul_agent.register(service_name, survivor.port)
        await consul_agent.register(service_name, victim_port)
        resolver = consul_agent.resolver(service_name)
        await resolver.start()
        pool = ChannelPool(resolver)
        try:
            victim = f"127.0.0.1:{victim_port}"
            await eventually(lambda: len(resolver.addresses(service_name)) == 2, "both instances to be healthy")
            assert {await whoami(pool, service_name) for _ in range(4)} == {"survivor", "victim"}

            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            await eventually(lambda: victim not in resolver.addresses(service_name), "the killed instance to go")
            assert resolver.addresses(service_name) == [survivor.address]
            assert [await whoami(pool, service_name) for _ in range(4)] == ["survivor"] * 4
        finally:
            await pool.close()
            await resolver.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_deregister_removes_the_instance(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    instance = await instances("a")
    instance_id = await consul_agent.register(service_name, instance.port)
    resolver = consul_agent.resolver(service_name)
    await resolver.start()
    pool = ChannelPool(resolver)
    try:
        assert await resolver.wait_for(service_name, SETTLE) == [instance.address]
        assert await consul_agent.registration().deregister_async(instance_id) is True
        await eventually(lambda: resolver.addresses(service_name) == [], "the deregistered instance to go")
        with pytest.raises(NoHealthyInstance, match=service_name):
            pool.channel(service_name)
        assert instance_id not in (await consul_agent.get("/v1/agent/services")).json()
        assert (await consul_agent.get(f"/v1/health/service/{service_name}")).json() == []
        # An unknown id: the agent answers 404 (whatever agent/service.mdx says), reported as False.
        assert await consul_agent.registration().deregister_async(instance_id) is False
        unknown = await consul_agent.put(f"/v1/agent/service/deregister/{instance_id}")
        assert unknown.status_code == 404 and "Unknown service ID" in unknown.text
    finally:
        await pool.close()
        await resolver.close()


async def test_wait_for_times_out_with_a_clear_message(consul_agent: ConsulUnderTest, service_name: str) -> None:
    resolver = consul_agent.resolver(service_name)
    await resolver.start()
    try:
        with pytest.raises(TimeoutError, match=f"no healthy instance of '{service_name}'"):
            await resolver.wait_for(service_name, 0.3)
    finally:
        await resolver.close()


# --------------------------------------------------------------------------- any service, by name


def _consul_environ(agent: ConsulUnderTest) -> dict[str, str]:
    """The variables the orchestrator would have: DISCOVERY=consul and the agent under test."""
    if REAL_AGENT:
        return {**os.environ, "DISCOVERY": "consul"}
    return {"DISCOVERY": "consul", "CONSUL_HTTP_ADDR": agent.settings.url}


async def test_a_service_outside_the_suite_registered_at_run_time_is_resolved(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]]
) -> None:
    """As the orchestrator does it: make_resolver with the suite's names, then a definition naming `loyalty-*`."""
    loyalty = f"loyalty-{uuid.uuid4().hex[:8]}"
    resolver = make_resolver(_consul_environ(consul_agent))
    await resolver.start()
    pool = ChannelPool(resolver)
    try:
        # Not registered yet: the check reports it, within its short timeout, and starts its watch.
        missing = await unresolvable(resolver, [loyalty], timeout=0.5)
        assert list(missing) == [loyalty]
        assert f"no healthy instance of {loyalty!r} in Consul" in missing[loyalty]
        with pytest.raises(NoHealthyInstance, match=loyalty):
            pool.channel(loyalty)

        instance = await instances("loyalty")
        await consul_agent.register(loyalty, instance.port)
        # The watch the check started picks up the registration (its gRPC check passing) by itself.
        await eventually(lambda: resolver.addresses(loyalty) == [instance.address], "the loyalty instance")
        assert await unresolvable(resolver, [loyalty], timeout=SETTLE) == {}
        assert await whoami(pool, loyalty) == "loyalty"
    finally:
        await pool.close()
        await resolver.close()


async def test_a_name_first_asked_for_by_a_call_is_watched_from_then_on(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]]
) -> None:
    """Without the check, the first call to a new name fails UNAVAILABLE (retried); later ones reach it."""
    points = f"points-{uuid.uuid4().hex[:8]}"
    instance = await instances("points")
    await consul_agent.register(points, instance.port)
    resolver = consul_agent.resolver()
    await resolver.start()
    pool = ChannelPool(resolver)
    try:
        with pytest.raises(NoHealthyInstance, match=points):
            pool.channel(points)
        await eventually(lambda: resolver.addresses(points) == [instance.address], "the watch of the new name")
        assert await whoami(pool, points) == "points"
    finally:
        await pool.close()
        await resolver.close()


async def test_a_name_that_is_no_service_name_is_never_sent_to_consul(consul_agent: ConsulUnderTest) -> None:
    resolver = consul_agent.resolver()
    await resolver.start()
    try:
        assert resolver.addresses("../agent/self") == []
        with pytest.raises(LookupError, match="is not a service name"):
            await resolver.wait_for("../agent/self", SETTLE)
        assert "is not a service name" in (resolver.last_error("../agent/self") or "")
        if consul_agent.standin is not None:
            assert not [target for _, target, _ in consul_agent.standin.requests_seen if "agent/self" in target]
    finally:
        await resolver.close()


# --------------------------------------------------------------------------- Consul trouble


@NEEDS_STANDIN
async def test_resolver_keeps_last_known_list_while_consul_is_down(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    standin = consul_agent.standin
    assert standin is not None
    first, second = await instances("first"), await instances("second")
    await consul_agent.register(service_name, first.port)
    resolver = consul_agent.resolver(service_name)
    await resolver.start()
    pool = ChannelPool(resolver)
    try:
        assert await resolver.wait_for(service_name, SETTLE) == [first.address]

        standin.stop()
        await eventually(lambda: resolver.last_error(service_name), "the resolver to notice Consul is gone")
        await asyncio.sleep(1.0)  # several failed retries
        assert resolver.addresses(service_name) == [first.address]
        assert await whoami(pool, service_name) == "first"

        standin.start()  # same port, state kept, like a restarted agent
        await consul_agent.register(service_name, second.port)
        both = sorted([first.address, second.address])
        await eventually(lambda: resolver.addresses(service_name) == both, "the resolver to recover")
        assert resolver.last_error(service_name) is None
    finally:
        await pool.close()
        await resolver.close()


@NEEDS_STANDIN
async def test_resolver_restarts_its_blocking_loop_when_the_index_goes_backwards(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    standin = consul_agent.standin
    assert standin is not None
    first, second = await instances("first"), await instances("second")
    await consul_agent.register(service_name, first.port)
    resolver = consul_agent.resolver(service_name, blocking_wait=3.0)
    await resolver.start()
    try:
        assert await resolver.wait_for(service_name, SETTLE) == [first.address]

        def health_reads() -> list[str]:
            path = f"/v1/health/service/{service_name}"
            return [target for _, target, _ in standin.requests_seen if target.startswith(path)]

        def index_of(target: str) -> int | None:
            found = re.search(r"[?&]index=(\d+)", target)
            return int(found.group(1)) if found else None

        # The resolver has settled into a blocking query on the current index.
        await eventually(lambda: any(index_of(t) for t in health_reads()), "a blocking query on the current index")
        seen_before = len(health_reads())
        standin.rewind_index(1)  # as after a snapshot restore

        def after_reset_read() -> list[str]:
            """The reads after the first one without an index since the rewind (empty until then)."""
            since = health_reads()[seen_before:]
            reset = next((i for i, target in enumerate(since) if index_of(target) is None), None)
            return [] if reset is None else since[reset + 1 :]

        # After the blocked query times out with a lower index, the resolver reads without an index,
        # then blocks again on the index that read returned.
        await eventually(after_reset_read, "a non-blocking re-read after the index went backwards, then a query")
        # Every index it blocked on before the rewind is higher than the store's now: a client still
        # blocking on one of those would hold each query for its full wait and miss the new instance.
        index_before = max(index_of(target) or 0 for target in health_reads()[:seen_before])
        next_index = index_of(after_reset_read()[0])
        assert next_index is not None and next_index < index_before, (index_before, health_reads()[seen_before:])
        await consul_agent.register(service_name, second.port)
        both = sorted([first.address, second.address])
        await eventually(lambda: resolver.addresses(service_name) == both, "the new instance")
    finally:
        await resolver.close()


@NEEDS_STANDIN
async def test_critical_instance_is_reaped_after_deregister_critical_service_after(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    instance = await instances("a")
    instance_id = await consul_agent.register(service_name, instance.port, deregister_critical_after="3s")

    async def registered() -> bool:
        return instance_id in (await consul_agent.get("/v1/agent/services")).json()

    async def passing() -> bool:
        entries = (await consul_agent.get(f"/v1/health/service/{service_name}?passing")).json()
        return len(entries) == 1

    async def critical() -> bool:
        entries = (await consul_agent.get(f"/v1/health/service/{service_name}")).json()
        return [_service_check(entry)["Status"] for entry in entries] == ["critical"]

    await eventually(passing, "the instance to pass")
    await instance.stop()
    await eventually(critical, "the stopped instance's check to go critical")
    assert await registered(), "a critical service stays registered until DeregisterCriticalServiceAfter"
    await eventually(lambda: _not(registered()), "the critical instance to be reaped")


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


# --------------------------------------------------------------------------- ACL and blocking queries


async def test_acl_token_is_sent_and_enforced(
    acl_consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    instance = await instances("a")
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        await acl_consul_agent.registration(token=str(uuid.uuid4())).register_async(
            service_name, f"{service_name}-x", "127.0.0.1", instance.port
        )
    if acl_consul_agent.standin is not None:
        # The stand-in's anonymous token has no rights (a real agent's depends on its policies).
        with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
            await acl_consul_agent.registration(token=None).register_async(
                service_name, f"{service_name}-x", "127.0.0.1", instance.port
            )
    await acl_consul_agent.register(service_name, instance.port)

    resolver = acl_consul_agent.resolver(service_name)
    wrong = acl_consul_agent.resolver(service_name, token=str(uuid.uuid4()))
    await resolver.start()
    await wrong.start()
    try:
        assert await resolver.wait_for(service_name, SETTLE) == [instance.address]
        await eventually(lambda: wrong.last_error(service_name), "the wrong token to be refused")
        assert "ACL not found" in (wrong.last_error(service_name) or "")
        assert wrong.addresses(service_name) == []
        if acl_consul_agent.standin is not None:
            health_requests = [
                token
                for method, target, token in acl_consul_agent.standin.requests_seen
                if target.startswith(f"/v1/health/service/{service_name}")
            ]
            assert acl_consul_agent.settings.token in health_requests
    finally:
        await resolver.close()
        await wrong.close()


async def test_blocking_query_waits_for_a_change_or_the_wait_time(
    consul_agent: ConsulUnderTest, instances: Callable[[str], Awaitable[Instance]], service_name: str
) -> None:
    first, second = await instances("first"), await instances("second")
    await consul_agent.register(service_name, first.port)

    async def passing_index() -> int:
        response = await consul_agent.get(f"/v1/health/service/{service_name}?passing=1")
        return int(response.headers["X-Consul-Index"]) if response.json() else 0

    index = await eventually(passing_index, "the first instance to pass")
    await asyncio.sleep(0.2)
    index = await passing_index()

    started = time.monotonic()
    response = await consul_agent.get(f"/v1/health/service/{service_name}?passing=1&index={index}&wait=1s")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    # Nothing changed: it holds for the wait (and then answers, well before the 30 s default would).
    assert 0.9 <= elapsed < 20, elapsed
    index = int(response.headers["X-Consul-Index"])

    blocked = asyncio.create_task(
        consul_agent.get(f"/v1/health/service/{service_name}?passing=1&index={index}&wait=30s")
    )
    await asyncio.sleep(0.5)
    assert not blocked.done(), "a blocking query must hold until something changes"
    started = time.monotonic()
    await consul_agent.register(service_name, second.port)
    response = await asyncio.wait_for(blocked, 20)
    # Answered because of the change, not at the end of its 30 s wait.
    assert time.monotonic() - started < 20
    assert int(response.headers["X-Consul-Index"]) > index


# --------------------------------------------------------------------------- the stand-in as a process


async def test_standin_runs_as_a_separate_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(STANDIN_SCRIPT), "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        url = line.rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:"), line
        leader = await asyncio.to_thread(requests.get, url + "/v1/status/leader", timeout=5)
        assert leader.status_code == 200 and leader.json()
        services = await asyncio.to_thread(requests.get, url + "/v1/agent/services", timeout=5)
        assert services.json() == {}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
