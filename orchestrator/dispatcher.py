"""The outbox dispatcher: claims due commands, calls services concurrently and group-commits outcomes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from sqlalchemy import Connection

from orchestrator import store
from orchestrator.definition import DefinitionRegistry, SagaDefinition, StepKind
from orchestrator.engine import ACTION, Command, Engine, Outcome, SagaState, Status, Transition
from orchestrator.store import EventRecord
from svckit.channels import ChannelPool, NoHealthyInstance
from svckit.db import Database
from svckit.errors import DomainError, FailedPrecondition, NotFound, RetryableError
from svckit.server import IDEMPOTENCY_HEADER

__all__ = ["OPERATIONS", "DispatchObserver", "Dispatcher"]

log = logging.getLogger("sagasuite.dispatcher")

OPERATIONS = ("pause", "resume", "cancel", "terminate", "retry")


class DispatchObserver:
    """Hooks for metrics and tracing; the base class does nothing."""

    def saga_started(self, saga: SagaState) -> None: ...
    def saga_changed(self, saga: SagaState, transition: Transition) -> None: ...
    def call_finished(self, saga: SagaState, step: str, direction: str, outcome: Outcome) -> None: ...


class SagaWatch:
    """What WatchSaga listens to: a saga's new events as they commit in this replica."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._updates: list[tuple[SagaState, list[EventRecord]]] = []

    def push(self, saga: SagaState, events: list[EventRecord]) -> None:
        self._updates.append((saga, events))
        self.changed.set()

    def take(self) -> list[tuple[SagaState, list[EventRecord]]]:
        self.changed.clear()
        updates, self._updates = self._updates, []
        return updates


@dataclass
class _Start:
    definition: SagaDefinition
    business_key: str
    input_payload: bytes
    deadline_seconds: float
    trace_context: str
    reply: asyncio.Future[tuple[SagaState, bool]]


@dataclass
class _Result:
    command: Command
    outcome: Outcome


@dataclass
class _Operate:
    operation: str
    saga_id: str
    actor: str
    reason: str
    reply: asyncio.Future[SagaState]


@dataclass
class _BatchOutcome:
    """What a committed batch hands back to the event loop."""

    to_dispatch: list[tuple[Command, SagaState]] = field(default_factory=list)
    replies: list[tuple[asyncio.Future[Any], Any]] = field(default_factory=list)
    changed: list[tuple[SagaState, Transition]] = field(default_factory=list)
    started: list[SagaState] = field(default_factory=list)
    finished_calls: list[str] = field(default_factory=list)
    events_by_saga: dict[str, list[EventRecord]] = field(default_factory=dict)
    wake_in: float = float("inf")


class Dispatcher:
    """Owns every write to the orchestrator database; calls go out only for committed commands."""

    def __init__(
        self,
        database: Database,
        registry: DefinitionRegistry,
        channels: ChannelPool,
        *,
        replica_id: str,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.2,
        claim_batch: int = 256,
        max_in_flight: int = 512,
        commit_batch: int = 512,
        observer: DispatchObserver | None = None,
        wrap_call: Callable[[SagaState, str, str, int], Any] | None = None,
    ) -> None:
        self._database = database
        self._registry = registry
        self._channels = channels
        self.replica_id = replica_id
        self._lease_seconds = lease_seconds
        self._poll_interval = poll_interval
        self._claim_batch = claim_batch
        self._commit_batch = commit_batch
        self._engine = Engine(random.Random())
        self._queue: asyncio.Queue[_Start | _Result | _Operate] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._wake_poller = asyncio.Event()
        self._stopping = False
        self._watchers: dict[str, set[SagaWatch]] = {}
        self._callables: dict[tuple[grpc.aio.Channel, str], grpc.aio.UnaryUnaryMultiCallable] = {}
        self.observer = observer or DispatchObserver()
        self._wrap_call = wrap_call
        self._validate_leases()

    def _validate_leases(self) -> None:
        for definition in self._registry.all():
            for step in definition.steps:
                if step.timeout >= self._lease_seconds:
                    raise ValueError(
                        f"{definition.name} v{definition.version} step {step.name}: timeout {step.timeout}s must be "
                        f"shorter than LEASE_SECONDS ({self._lease_seconds}s)"
                    )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # Leases held under this replica's name belong to a previous run of it that died:
        # nothing of ours is on the wire yet, so take them back now rather than at expiry.
        released = await self._database.transaction(lambda c: store.release_leases(c, self.replica_id))
        if released:
            log.info("recovered %d commands leased by a previous run of replica %s", released, self.replica_id)
        self._loops = [asyncio.create_task(self._commit_loop()), asyncio.create_task(self._poll_loop())]

    async def stop(self, grace: float) -> None:
        """Stop claiming, let calls on the wire finish and record them, then give up our leases."""
        self._stopping = True
        self._wake_poller.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        await self._queue.join()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._database.transaction(lambda c: store.release_leases(c, self.replica_id))

    # -- requests from the API -------------------------------------------------------------

    async def start_saga(
        self,
        definition: SagaDefinition,
        business_key: str,
        input_message: Message,
        deadline_seconds: float,
        trace_context: str = "",
    ) -> tuple[SagaState, bool]:
        if self._stopping:
            raise RetryableError("this orchestrator replica is shutting down; try another")
        reply: asyncio.Future[tuple[SagaState, bool]] = asyncio.get_running_loop().create_future()
        payload = input_message.SerializeToString(deterministic=True)
        await self._queue.put(_Start(definition, business_key, payload, deadline_seconds, trace_context, reply))
        return await reply

    async def operate(self, operation: str, saga_id: str, actor: str, reason: str = "") -> SagaState:
        if operation not in OPERATIONS:
            raise ValueError(operation)
        reply: asyncio.Future[SagaState] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Operate(operation, saga_id, actor, reason, reply))
        return await reply

    def watch(self, saga_id: str) -> SagaWatch:
        watch = SagaWatch()
        self._watchers.setdefault(saga_id, set()).add(watch)
        return watch

    def unwatch(self, saga_id: str, watch: SagaWatch) -> None:
        watchers = self._watchers.get(saga_id)
        if watchers is not None:
            watchers.discard(watch)
            if not watchers:
                del self._watchers[saga_id]

    def definition_of(self, saga: SagaState) -> SagaDefinition:
        return self._registry.get(saga.saga_type, saga.version)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- the single writer -----------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self._commit_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                outcome = await self._database.transaction(lambda c, batch=items: self._apply(c, batch))  # type: ignore[misc]
            except Exception as error:
                self._mark_done(len(items))
                log.exception(
                    "recording %d transitions failed; their commands are resent after lease expiry", len(items)
                )
                for item in items:
                    if isinstance(item, _Result):
                        self._in_flight.discard(item.command.saga_id)
                    elif not item.reply.done():
                        item.reply.set_exception(RetryableError(f"the saga store failed: {error}"))
                continue
            self._mark_done(len(items))
            for saga_id in outcome.finished_calls:
                self._in_flight.discard(saga_id)
            if outcome.wake_in < self._poll_interval:
                asyncio.get_running_loop().call_later(max(0.0, outcome.wake_in), self._wake_poller.set)
            for future, value in outcome.replies:
                if future.done():
                    continue
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)
            for saga in outcome.started:
                self.observer.saga_started(saga)
            for saga, transition in outcome.changed:
                self.observer.saga_changed(saga, transition)
                for watcher in self._watchers.get(saga.saga_id, ()):
                    watcher.push(saga, outcome.events_by_saga.get(saga.saga_id, []))
            for command, saga in outcome.to_dispatch:
                self._launch(command, saga)

    def _mark_done(self, count: int) -> None:
        for _ in range(count):
            self._queue.task_done()

    def _apply(self, connection: Connection, items: list[_Start | _Result | _Operate]) -> _BatchOutcome:
        now = time.time()
        batch = _BatchOutcome()
        saga_ids = {
            item.command.saga_id if isinstance(item, _Result) else item.saga_id
            for item in items
            if not isinstance(item, _Start)
        }
        sagas = store.load_sagas(connection, saga_ids, for_update=self._database.is_postgres)
        dirty: dict[str, SagaState] = {}
        event_rows: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, _Start):
                self._apply_start(connection, item, now, batch, event_rows)
            elif isinstance(item, _Result):
                batch.finished_calls.append(item.command.saga_id)
                saga = sagas.get(item.command.saga_id)
                if saga is None or not store.fence(connection, item.command, self.replica_id):
                    # Another replica took the command over, or an operator removed it: its
                    # holder records the outcome; the call's effect is keyed, so nothing doubles.
                    continue
                definition = self.definition_of(saga)
                transition = self._engine.on_outcome(definition, saga, item.command, item.outcome, now)
                self._record(connection, saga, transition, now, batch, event_rows, dirty)
            else:
                saga = sagas.get(item.saga_id)
                if saga is None:
                    batch.replies.append(
                        (item.reply, NotFound("SAGA_NOT_FOUND", f"no saga {item.saga_id}", {"saga_id": item.saga_id}))
                    )
                    continue
                try:
                    transition = self._apply_operation(connection, saga, item, now)
                except DomainError as refusal:
                    batch.replies.append((item.reply, refusal))
                    continue
                self._record(connection, saga, transition, now, batch, event_rows, dirty)
                batch.replies.append((item.reply, saga))
        store.update_sagas(connection, dirty.values())
        store.insert_events(connection, event_rows)
        if self._watchers:
            for row in event_rows:
                batch.events_by_saga.setdefault(row["saga_id"], []).append(EventRecord(**row))
        return batch

    def _apply_start(
        self, connection: Connection, item: _Start, now: float, batch: _BatchOutcome, event_rows: list[dict[str, Any]]
    ) -> None:
        input_hash = hashlib.sha256(item.input_payload).hexdigest()
        found = store.find_by_business_key(connection, item.definition.name, item.business_key)
        if found is not None:
            existing, existing_hash = found
            if existing_hash != input_hash:
                batch.replies.append(
                    (
                        item.reply,
                        FailedPrecondition(
                            "BUSINESS_KEY_CONFLICT",
                            f"{item.definition.name} {item.business_key!r} already exists with a different payload "
                            f"(saga {existing.saga_id})",
                            {"saga_id": existing.saga_id, "business_key": item.business_key},
                        ),
                    )
                )
            else:
                batch.replies.append((item.reply, (existing, False)))
            return
        saga = SagaState(
            saga_id=uuid.uuid4().hex,
            saga_type=item.definition.name,
            version=item.definition.version,
            business_key=item.business_key,
            input=item.input_payload,
            status=Status.RUNNING,
            deadline_at=now + item.deadline_seconds,
            created_at=now,
            updated_at=now,
            trace_context=item.trace_context,
        )
        transition = self._engine.start(item.definition, saga, now)
        store.append_events(saga, transition.events, event_rows)
        store.insert_saga(connection, saga, input_hash)
        self._put_next(connection, saga, transition.next_command, now, batch)
        batch.started.append(saga)
        batch.changed.append((saga, transition))
        batch.replies.append((item.reply, (saga, True)))

    def _apply_operation(self, connection: Connection, saga: SagaState, item: _Operate, now: float) -> Transition:
        pending = store.load_pending(connection, saga.saga_id)
        command = pending.command if pending else None
        if item.operation == "pause":
            transition = self._engine.pause(saga, command, item.actor, item.reason, now)
        elif item.operation == "resume":
            transition = self._engine.resume(saga, command, item.actor, now)
        elif item.operation == "cancel":
            in_flight = pending is not None and pending.in_flight(now)
            if command is not None and pending is not None and pending.lease_owner is not None:
                # It was handed to a dispatcher once: treat its outcome as unknown.
                command.uncertain = True
            transition = self._engine.cancel(
                self.definition_of(saga), saga, command, in_flight, item.actor, item.reason, now
            )
        elif item.operation == "terminate":
            transition = self._engine.terminate(saga, item.actor, item.reason, now)
        else:
            transition = self._engine.retry(saga, item.actor, now)
        if pending is not None and pending.in_flight(now) and transition.next_command is command:
            # The command is on the wire and stays as it is: its holder records the outcome,
            # which then sees the saga's new flags (paused, cancel requested).
            transition.next_command = None
        elif pending is not None:
            store.delete_command(connection, saga.saga_id)
        return transition

    def _record(
        self,
        connection: Connection,
        saga: SagaState,
        transition: Transition,
        now: float,
        batch: _BatchOutcome,
        event_rows: list[dict[str, Any]],
        dirty: dict[str, SagaState],
    ) -> None:
        store.append_events(saga, transition.events, event_rows)
        self._put_next(connection, saga, transition.next_command, now, batch)
        dirty[saga.saga_id] = saga
        batch.changed.append((saga, transition))

    def _put_next(
        self, connection: Connection, saga: SagaState, command: Command | None, now: float, batch: _BatchOutcome
    ) -> None:
        if command is None:
            return
        if command.due_at is not None and command.due_at <= now and not self._stopping:
            # Leased to ourselves in the same transaction: it goes out right after the commit,
            # with no poll in between.
            store.put_command(connection, command, self.replica_id, now + self._lease_seconds)
            batch.to_dispatch.append((command, saga))
        else:
            store.put_command(connection, command, None, 0.0)
            if command.due_at is not None:
                batch.wake_in = min(batch.wake_in, command.due_at - now)

    # -- claiming and calling --------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake_poller.wait(), self._poll_interval)
            except TimeoutError:
                pass
            self._wake_poller.clear()
            if self._stopping:
                return
            free = min(self._claim_batch, self._slots._value)
            if free <= 0:
                continue
            try:
                claimed = await self._database.transaction(
                    lambda c, limit=free: store.claim_due(  # type: ignore[misc]
                        c,
                        self.replica_id,
                        time.time(),
                        self._lease_seconds,
                        limit,
                        skip_locked=self._database.is_postgres,
                    )
                )
            except Exception:
                log.exception("claiming due commands failed; will try again")
                continue
            for command, saga in claimed:
                if saga.saga_id not in self._in_flight:
                    self._launch(command, saga)

    def _launch(self, command: Command, saga: SagaState) -> None:
        self._in_flight.add(command.saga_id)
        task = asyncio.create_task(self._call(command, saga))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, command: Command, saga: SagaState) -> None:
        async with self._slots:
            definition = self.definition_of(saga)
            step = definition.steps[command.step_index]
            if self._wrap_call is not None:
                # The observer runs inside the wrapper too, so it can annotate the step's span.
                with self._wrap_call(saga, step.name, command.direction, command.attempt):
                    outcome = await self._make_call(definition, command, saga)
                    self.observer.call_finished(saga, step.name, command.direction, outcome)
            else:
                outcome = await self._make_call(definition, command, saga)
                self.observer.call_finished(saga, step.name, command.direction, outcome)
        await self._queue.put(_Result(command, outcome))

    async def _make_call(self, definition: SagaDefinition, command: Command, saga: SagaState) -> Outcome:
        step = definition.steps[command.step_index]
        call = step.action if command.direction == ACTION else step.compensation
        assert call is not None
        started = time.time()
        timeout = step.timeout
        if command.direction == ACTION and step.kind is StepKind.COMPENSATABLE:
            time_left = saga.deadline_at - started
            if time_left <= 0:
                return Outcome(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the saga's deadline passed before the call",
                    None,
                    started,
                    started,
                )
            timeout = min(timeout, time_left)
        try:
            request = call.build_request(definition.context(saga.saga_id, saga.input, saga.results))
            channel = self._channels.channel(call.service)
            key = (channel, call.method_path)
            method = self._callables.get(key)
            if method is None:
                # No response deserializer: the response bytes are stored as they came.
                method = channel.unary_unary(
                    call.method_path, request_serializer=_serialize, response_deserializer=None
                )
                self._callables[key] = method
            response = await method(
                request, timeout=timeout, metadata=((IDEMPOTENCY_HEADER, command.idempotency_key(step.name)),)
            )
            return Outcome(grpc.StatusCode.OK, "", response, started, time.time())
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "", None, started, time.time())
        except NoHealthyInstance as error:
            return Outcome(grpc.StatusCode.UNAVAILABLE, str(error), None, started, time.time())
        except Exception as error:
            log.exception("saga %s step %s %s failed before the call", saga.saga_id, step.name, command.direction)
            return Outcome(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}", None, started, time.time())


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)
