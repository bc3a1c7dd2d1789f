"""One domain service process: settings, database, idempotency and the gRPC server, wired once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from svckit.config import ServiceSettings
from svckit.db import Database
from svckit.idempotency import IdempotencyStore
from svckit.logs import configure_logging
from svckit.registration import announcer_from_settings
from svckit.server import GrpcServer, RpcServer

__all__ = ["ServiceProcess"]

ResponseT = TypeVar("ResponseT", bound=Message)


class ServiceProcess:
    """Everything a domain service needs at run time, built from its settings."""

    def __init__(self, settings: ServiceSettings, *, contract: str) -> None:
        configure_logging(settings.service_name, settings.log_level)
        self.settings = settings
        self.contract = contract
        self.log = logging.getLogger(f"sagasuite.{settings.service_name}")
        self.database = Database(settings.resolved_database_url(), sqlite_synchronous=settings.sqlite_synchronous)
        self.database.create_schema()
        self.idempotency = IdempotencyStore(self.database, settings.idempotency_retention_seconds)
        # The servicers (svckit.idempotency.KeyedServicer) hand it to the rpc wrapper: FAULTS, call observers, tracing.
        self.rpc_server = RpcServer.from_settings(settings)
        self._registrations: list[tuple[Callable[[grpc.aio.Server], Any], str]] = []

    def add_service(self, register: Callable[[grpc.aio.Server], Any], full_name: str) -> None:
        self._registrations.append((register, full_name))

    async def _clean_idempotency_records(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idempotency_cleanup_interval_seconds)
            try:
                deleted = await self.idempotency.delete_expired()
                if deleted:
                    self.log.info("deleted %d expired idempotency records", deleted)
            except Exception:
                self.log.exception("idempotency cleanup failed; will try again")

    def build_server(self) -> GrpcServer:
        """The gRPC server bound to HOST:PORT with this process's services, not yet started."""
        server = GrpcServer(self.settings, self.rpc_server)
        for register, full_name in self._registrations:
            server.add_service(register, full_name)
        return server

    async def serve(self) -> None:
        """Serve until SIGTERM or SIGINT, then leave discovery, drain in-flight calls and close the database."""
        try:
            # DISCOVERY=consul: registered once serving, deregistered on SIGTERM before draining.
            try:
                announcer = announcer_from_settings(self.settings, contract=self.contract)
            except ValueError as error:
                raise SystemExit(f"configuration error: {error}") from error
            server = self.build_server()
            await server.start()
            cleanup = asyncio.create_task(self._clean_idempotency_records())
            try:
                if announcer is not None:
                    await announcer.start(server.port)
                await server.wait_for_stop_signal()
            finally:
                await server.stop_taking_calls()
                if announcer is not None:
                    await announcer.stop()
                cleanup.cancel()
                await server.stop()
        finally:
            self.database.close()

    def run(self) -> None:
        asyncio.run(self.serve())
