"""Entry point: `python -m orchestrator` or the `sagasuite-orchestrator` console script."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import store
from orchestrator.auth import AccessControl
from orchestrator.config import OrchestratorSettings
from orchestrator.definition import DefinitionRegistry, SagaDefinition, Step
from orchestrator.dispatcher import Dispatcher
from orchestrator.observability import Observability
from orchestrator.sagas.order import ORDER_SAGA, order_saga_v2
from orchestrator.server import OrchestratorServicer
from orchestrator.watch import WatchHub
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from svckit.channels import ChannelPool
from svckit.config import load_settings
from svckit.db import Database
from svckit.discovery import Resolver, make_resolver, unresolvable
from svckit.logs import configure_logging
from svckit.registration import announcer_from_settings
from svckit.server import GrpcServer, RpcServer
from svckit.telemetry import client_interceptors, configure_tracing
from svckit.tls import ClientTls

if TYPE_CHECKING:
    from orchestrator.declarative.folder import DefinitionFolder

log = logging.getLogger("sagasuite.orchestrator")


def load_definitions(spec: str) -> list[SagaDefinition]:
    """Definitions named by SAGA_DEFINITIONS as "module:attribute,..." (an attribute may be a list)."""
    definitions: list[SagaDefinition] = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = entry.partition(":")
        if not attribute:
            raise SystemExit(f"configuration error: SAGA_DEFINITIONS entry {entry!r} must be module:attribute")
        value = getattr(importlib.import_module(module_name), attribute)
        definitions.extend(value if isinstance(value, list | tuple) else [value])
    return definitions


def _definition_folder(
    settings: OrchestratorSettings, registry: DefinitionRegistry, database: Database, resolver: Resolver
) -> DefinitionFolder | None:
    """The YAML folder, loaded once (a problem stops the start, listed file:line:column); None without one."""
    if not settings.saga_definitions_dir:
        return None
    # Imported only when a folder is set: the YAML compiler brings jq, ruamel.yaml and jsonschema.
    from orchestrator.declarative.compiler import DefinitionFileError
    from orchestrator.declarative.folder import DefinitionFolder

    def address_of(service: str) -> str | None:
        addresses = resolver.addresses(service)
        return addresses[0] if addresses else None

    folder = DefinitionFolder(Path(settings.saga_definitions_dir), registry, database, resolve_address=address_of)
    try:
        loaded = folder.load()
    except DefinitionFileError as error:
        raise SystemExit(f"configuration error: the definitions in {folder.folder} do not load:\n{error}") from None
    for item in loaded:
        log.info("loaded %s v%s from %s", item.definition.name, item.definition.version, item.path)
    return folder


def _callers(registry: DefinitionRegistry) -> dict[str, list[str]]:
    """Every service the registered definitions call, with the definitions that call it."""
    callers: dict[str, set[str]] = {}
    for definition in registry.all():
        for flat in definition.nodes:
            node = flat.node
            if isinstance(node, Step):
                for call in (node.action, node.compensation):
                    if call is not None:
                        callers.setdefault(call.service, set()).add(f"{definition.name} v{definition.version}")
    return {service: sorted(names) for service, names in callers.items()}


async def _check_services(registry: DefinitionRegistry, resolver: Resolver, observability: Observability) -> None:
    """A WARNING line and a gauge for each service a definition calls that cannot be resolved."""
    callers = _callers(registry)
    observability.report_unresolvable(await unresolvable(resolver, callers, 2.0), callers, resolver)


async def serve(settings: OrchestratorSettings) -> None:
    """Serve until SIGTERM or SIGINT, then leave discovery, stop dispatching, drain and close."""
    database = Database(settings.resolved_database_url(), sqlite_synchronous=settings.sqlite_synchronous)
    store.ensure_schema(database)
    try:
        # DISCOVERY=consul: this replica registers itself as "orchestrator" once it dispatches.
        announcer = announcer_from_settings(settings, contract=pb.DESCRIPTOR.package)
        # Any service name resolves; the ones the definitions call are checked once they are loaded.
        resolver = make_resolver(required=False)
        # Who may call what (OPERATOR_TOKENS, READ_ACCESS, ...) and TLS to the services (TLS_CA_FILE, ...).
        access = AccessControl.from_settings(settings)
        client_tls = ClientTls(
            settings.tls_ca_file, settings.tls_client_cert_file, settings.tls_client_key_file, settings.tls_server_name
        )
        client_credentials = client_tls.credentials()
    except ValueError as error:
        raise SystemExit(f"configuration error: {error}") from error
    await resolver.start()
    try:
        order_v2 = order_saga_v2(settings.review_threshold, settings.review_timeout_seconds, settings.review_role)
        registry = DefinitionRegistry([ORDER_SAGA, order_v2, *load_definitions(settings.saga_definitions)])
        # YAML definitions (SAGA_DEFINITIONS_DIR) take the place of built-in ones of the same name and version.
        folder = _definition_folder(settings, registry, database, resolver)
        if settings.order_saga_version:
            registry.pin("OrderSaga", settings.order_saga_version)
    except (ValueError, LookupError) as error:
        raise SystemExit(f"configuration error: {error}") from error
    # Tracing (off unless OTEL_* variables ask for it) comes first: the channels carry its interceptors.
    rpc_server = RpcServer.from_settings(settings)
    metrics_on = settings.metrics_port >= 0
    observability = Observability(configure_tracing(settings.service_name), metrics=metrics_on)
    if metrics_on:
        rpc_server.observers.append(observability.rpc_observer)
    # A restarted instance gets traffic again within seconds, not gRPC's default two minutes.
    channels = ChannelPool(
        resolver,
        interceptors=client_interceptors() or None,
        channel_options=[("grpc.max_reconnect_backoff_ms", 5000), *client_tls.channel_options()],
        credentials=client_credentials,
    )
    # Bound before the dispatcher is built: the default replica id names the bound port (PORT=0
    # binds a free one), so a restart on the same port takes back the leases of its previous run at once.
    server = GrpcServer(settings, rpc_server)
    try:
        dispatcher = Dispatcher(
            database,
            registry,
            channels,
            replica_id=settings.resolved_replica_id(server.port),
            lease_seconds=settings.lease_seconds,
            poll_interval=settings.poll_interval_seconds,
            heartbeat_interval=settings.heartbeat_interval_seconds,
            silent_after=settings.replica_silent_after_seconds,
            claim_batch=settings.claim_batch,
            max_in_flight=settings.max_in_flight,
            commit_batch=settings.commit_batch,
            observer=observability.observer(),
            wrap_call=observability.wrap_call(),
        )
    except ValueError as error:  # a step's timeout that does not fit in LEASE_SECONDS
        raise SystemExit(f"configuration error: {error}") from error
    observability.bind(dispatcher)
    # WatchSaga's streams: fed by this dispatcher's commits, and by one reader for other replicas'.
    watches = WatchHub(database, max_watchers=settings.max_watchers, read_interval=settings.watch_read_interval_seconds)
    dispatcher.feed_watches(watches)
    servicer = OrchestratorServicer(
        database,
        registry,
        dispatcher,
        settings.default_saga_deadline_seconds,
        observability=observability,
        access=access,
        watches=watches,
        rpc_server=rpc_server,
    )
    server.add_service(
        lambda grpc_server: pb_grpc.add_OrchestratorServiceServicer_to_server(servicer, grpc_server),
        pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
    )
    outbox_metrics: asyncio.Task[None] | None = None
    folder_watch: asyncio.Task[None] | None = None
    try:
        await server.start()
        await dispatcher.start()
        await _check_services(registry, resolver, observability)
        if folder is not None:
            loop = asyncio.get_running_loop()
            checks: set[asyncio.Task[None]] = set()

            def check_after_reload(_: object) -> None:
                task = asyncio.create_task(_check_services(registry, resolver, observability))
                checks.add(task)
                task.add_done_callback(checks.discard)

            def after_reload(changed: object) -> None:
                # Called from the reload's thread: the check runs on the loop.
                loop.call_soon_threadsafe(check_after_reload, changed)

            folder.on_loaded = after_reload
        log.info(
            "replica %s dispatching; definitions: %s",
            dispatcher.replica_id,
            ", ".join(f"{d.name} v{d.version}" for d in registry.all()),
        )
        if metrics_on:
            outbox_metrics = asyncio.create_task(
                observability.watch_outbox(database, settings.outbox_metrics_interval_seconds)
            )
        if folder is not None:
            folder_watch = asyncio.create_task(folder.watch(settings.definitions_reload_interval_seconds))
            # SIGHUP reloads the folder at once, beside the watch of its files.
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, folder.request_reload)
        if announcer is not None:
            await announcer.start(server.port)
        await server.wait_for_stop_signal()
    finally:
        await server.stop_taking_calls()
        if announcer is not None:
            await announcer.stop()  # leave discovery before draining
        await dispatcher.stop(settings.grace_seconds)
        if outbox_metrics is not None:
            outbox_metrics.cancel()
        if folder_watch is not None:
            folder_watch.cancel()
        await server.stop()
        await channels.close()
        await resolver.close()
        database.close()


def main() -> None:
    settings = load_settings(OrchestratorSettings)
    configure_logging("orchestrator", settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
