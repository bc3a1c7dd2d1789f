"""The console's asynchronous calls to the orchestrator (grpc.aio), with the caller's token; failures as ClientError."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from sagactl.client import OPERATIONS, ClientError, check_address, classify
from sagactl.client import _credentials as tls_credentials
from sagactl.settings import EXIT_REFUSED, EXIT_USAGE, ClientConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = ["SAGA_ID", "Orchestrator", "not_found"]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

# A whole saga id, and what ListSagas takes as an id prefix (lowercase hex, 1-32 characters).
SAGA_ID = re.compile(r"[0-9a-f]{32}")
_ID_PREFIX = re.compile(r"[0-9a-f]{1,32}")
# How many sagas of one business key a lookup looks at: the order's saga, its children, and sagas of other types.
_KEY_SAGAS_LOOKED_AT = 20


# The console's words for refusals about the token: sagactl.client words them for a CLI user (SAGA_TOKEN).
_TOKEN_HINTS = {
    "TOKEN_REQUIRED": "this needs a token: log in with one",
    "INVALID_TOKEN": "the orchestrator does not accept this token: log out, then log in with a valid one",
}


def _classify(error: grpc.RpcError, address: str, timeout: float | None) -> ClientError:
    """sagactl.client.classify, with the token refusals told as a console user acts on them."""
    found = classify(error, address, timeout)
    hint = _TOKEN_HINTS.get(found.reason)
    if hint and found.code is not None:
        return ClientError(f"refused ({found.code.name} {found.reason}): {hint}", found.exit_code, found.code,
                           found.reason)  # fmt: skip
    return found


def not_found(message: str) -> ClientError:
    """A lookup that found nothing, worded as the orchestrator's own refusals are."""
    return ClientError(f"not found: {message}", EXIT_REFUSED, grpc.StatusCode.NOT_FOUND)


class Orchestrator:
    """One channel to the orchestrator, opened in the console's event loop; every call sends the token it is given."""

    def __init__(self, config: ClientConfig) -> None:
        check_address(config.address)
        self.config = config
        if config.ca_file:
            self.channel = grpc.aio.secure_channel(config.address, tls_credentials(config.ca_file))
        else:
            self.channel = grpc.aio.insecure_channel(config.address)
        self.stub: pb_grpc.OrchestratorServiceAsyncStub = pb_grpc.OrchestratorServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    def _metadata(self, token: str) -> tuple[tuple[str, str], ...]:
        # The console's own --token (SAGA_TOKEN) stands in for reads when nobody is logged in.
        chosen = token or self.config.token
        return (("authorization", f"Bearer {chosen}"),) if chosen else ()

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT], request: RequestT, token: str
    ) -> ResponseT:
        try:
            return await method(request, timeout=self.config.timeout, metadata=self._metadata(token))
        except grpc.aio.AioRpcError as error:
            raise _classify(error, self.config.address, self.config.timeout) from None

    async def _operator_call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT], request: RequestT, token: str
    ) -> ResponseT:
        """A call that changes a saga: only ever with the logged-in operator's token, never the console's own."""
        try:
            return await method(request, timeout=self.config.timeout, metadata=(("authorization", f"Bearer {token}"),))
        except grpc.aio.AioRpcError as error:
            raise _classify(error, self.config.address, self.config.timeout) from None

    # -- reading -------------------------------------------------------------------------------

    async def saga(self, saga_id: str, token: str) -> pb.Saga:
        return (await self._call(self.stub.GetSaga, pb.GetSagaRequest(saga_id=saga_id), token)).saga

    async def list_sagas(self, request: pb.ListSagasRequest, token: str) -> pb.ListSagasResponse:
        return await self._call(self.stub.ListSagas, request, token)

    async def list_up_to(self, request: pb.ListSagasRequest, limit: int, token: str) -> tuple[list[pb.Saga], bool]:
        """Up to limit sagas the filter matches, newest first, and whether there were more."""
        page = pb.ListSagasRequest()
        page.CopyFrom(request)
        page.page_size = min(500, limit)
        found: list[pb.Saga] = []
        while True:
            response = await self.list_sagas(page, token)
            found.extend(response.sagas)
            if len(found) >= limit:
                return found[:limit], len(found) > limit or bool(response.next_page_token)
            if not response.next_page_token:
                return found, False
            page.page_token = response.next_page_token

    async def stats(self, token: str) -> pb.GetSagaStatsResponse:
        return await self._call(self.stub.GetSagaStats, pb.GetSagaStatsRequest(), token)

    async def definition(self, name: str, version: int, token: str) -> pb.SagaDefinitionInfo | None:
        """The loaded definition a saga runs on, or None when the orchestrator has not loaded it."""
        answer = await self._call(self.stub.ListDefinitions, pb.ListDefinitionsRequest(name=name), token)
        return next((found for found in answer.definitions if found.version == version), None)

    async def definitions(self, token: str) -> list[pb.SagaDefinitionInfo]:
        return list((await self._call(self.stub.ListDefinitions, pb.ListDefinitionsRequest(), token)).definitions)

    async def resolve(self, reference: str, token: str) -> str:
        """The id of the saga a reference names: a whole id, a unique id prefix, or a business key (the saga of that
        key that no other saga started); ClientError NOT_FOUND, or a usage error naming the candidates."""
        reference = reference.strip()
        if not reference:
            raise ClientError("give a saga id, an id prefix or a business key", EXIT_USAGE)
        if SAGA_ID.fullmatch(reference):
            return (await self.saga(reference, token)).saga_id
        if _ID_PREFIX.fullmatch(reference):
            request = pb.ListSagasRequest(saga_id_prefix=reference, page_size=11)
            by_id = list((await self.list_sagas(request, token)).sagas)
            if len(by_id) == 1:
                return by_id[0].saga_id
            if by_id:
                shown = ", ".join(saga.saga_id[:12] for saga in by_id[:10])
                more = " and more" if len(by_id) > 10 else ""
                raise ClientError(
                    f"{len(by_id) if len(by_id) <= 10 else 'several'} sagas have ids starting with "
                    f"{reference!r} ({shown}{more}): give more of the id",
                    EXIT_USAGE,
                )
        request = pb.ListSagasRequest(business_key=reference, page_size=_KEY_SAGAS_LOOKED_AT)
        by_key = list((await self.list_sagas(request, token)).sagas)
        # A child whose parent has another key is the only saga of its own key: it is meant then.
        candidates = [saga for saga in by_key if not saga.parent_saga_id] or by_key
        if len(candidates) == 1:
            return candidates[0].saga_id
        if candidates:
            named = ", ".join(f"{saga.saga_type} {saga.saga_id[:12]}" for saga in candidates)
            raise ClientError(f"{reference!r} is the business key of {len(candidates)} sagas ({named})", EXIT_USAGE)
        raise not_found(f"no saga has the id, id prefix or business key {reference!r}")

    async def watch(
        self, saga_id: str, after_seq: int, token: str, idle_seconds: float
    ) -> AsyncIterator[pb.WatchSagaResponse | None]:
        """The saga's history events after after_seq as they happen, until it ends; None after each idle_seconds
        without one (so the caller can keep its own connection alive)."""
        call = self.stub.WatchSaga(
            pb.WatchSagaRequest(saga_id=saga_id, after_seq=after_seq), metadata=self._metadata(token)
        )
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({pending}, timeout=idle_seconds)
                if not done:
                    yield None
                    continue
                response, pending = pending.result(), None
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs leaves EOF out
                    return
                yield response
        except grpc.aio.AioRpcError as error:
            raise _classify(error, self.config.address, None) from None
        finally:
            if pending is not None:
                pending.cancel()
            call.cancel()

    # -- operating -----------------------------------------------------------------------------

    async def operate(self, operation: str, saga_id: str, reason: str, token: str) -> pb.Saga:
        """An operator call (retry, pause, resume, cancel, terminate); the saga after it."""
        method, request_type, takes_reason = OPERATIONS[operation]
        request = request_type(saga_id=saga_id, reason=reason) if takes_reason else request_type(saga_id=saga_id)
        # Looked up by name, so the response type is not known here; every operator call's carries the saga.
        answer = await self._operator_call(getattr(self.stub, method), request, token)
        saga: pb.Saga = answer.saga
        return saga

    async def decide(
        self, saga_id: str, step: str, *, approve: bool, reason: str, token: str
    ) -> pb.DecideApprovalResponse:
        request = pb.DecideApprovalRequest(saga_id=saga_id, step=step, approve=approve, reason=reason)
        return await self._operator_call(self.stub.DecideApproval, request, token)

    async def signal(
        self, saga_id: str, name: str, signal_id: str, payload: dict[str, Any], token: str
    ) -> pb.SignalSagaResponse:
        body = Struct()
        json_format.ParseDict(payload, body)
        request = pb.SignalSagaRequest(saga_id=saga_id, name=name, signal_id=signal_id, payload=body)
        return await self._operator_call(self.stub.SignalSaga, request, token)
