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
from orchestrator.definition import (
    Approval,
    ChildSaga,
    DefinitionMissing,
    DefinitionRegistry,
    RequestNotBuilt,
    SagaDefinition,
    Step,
    StepKind,
    WaitForSignal,
    approval_signal,
)
from orchestrator.engine import (
    ChildStart,
    Command,
    Engine,
    Event,
    Others,
    Outcome,
    SagaState,
    Transition,
    child_past_pivot,
)
from orchestrator.errors import (
    ApprovalAlreadyDecided,
    ApprovalRoleRequired,
    BusinessKeyConflict,
    IllegalState,
    SagaEnded,
    SagaNotFound,
    SignalIdReused,
    SignalNotAwaited,
    SignalTargetNotFound,
    TooManySignals,
)
from orchestrator.status import Direction, EventType, OperatorCall, SagaStatus
from orchestrator.store import EventRecord, PendingCommand
from orchestrator.watch import WatchHub
from svckit.channels import ChannelPool, NoHealthyInstance
from svckit.db import Database, is_retryable_conflict, needs_new_transaction, savepoint
from svckit.errors import DomainError, FailedPrecondition, RetryableError
from svckit.idempotency_key import IDEMPOTENCY_HEADER

__all__ = ["MAX_KEPT_SIGNALS", "OPERATIONS", "DispatchObserver", "Dispatcher", "NotRecorded", "SignalReceipt"]

log = logging.getLogger("sagasuite.dispatcher")

OPERATIONS = tuple(OperatorCall)
# Signals a saga may keep unconsumed at once: a sender in a loop cannot grow one saga's row without end.
MAX_KEPT_SIGNALS = 100
_Pendings = dict[str, PendingCommand]
_Children = dict[str, SagaState]
# Operator calls that make a saga send calls again: they need its definition.
_RUNS_THE_SAGA = frozenset({OperatorCall.RESUME, OperatorCall.CANCEL, OperatorCall.RETRY})
# Tries of one unit alone (a start, an outcome, an operator call) against transient conflicts.
_UNIT_ATTEMPTS = 3
# The longest wait between two tries to record an outcome whose unit failed.
_MAX_RECORDING_DELAY = 2.0
# How many saga ids one ERROR line names per definition.
_NAMED_PER_DEFINITION = 20


class _SomeUnitFailed(Exception):
    """A unit of a batch recorded without savepoints failed: the batch is recorded again unit by unit."""


class NotRecorded(FailedPrecondition):
    """The store refused one unit (a start or an operator call) on its own; the rest of its batch was recorded."""

    def __init__(self, what: str, error: BaseException) -> None:
        original = getattr(error, "orig", None) or error
        detail = (str(original).splitlines() or [""])[0][:200]
        super().__init__(
            "SAGA_STORE_REFUSED",
            f"the saga store refused to record this {what}: {type(original).__name__}: {detail}",
            {"what": what},
        )


class DispatchObserver:
    """Hooks for metrics and tracing; the base class does nothing."""

    def saga_started(self, saga: SagaState) -> None: ...
    def saga_changed(self, saga: SagaState, transition: Transition) -> None: ...
    def call_finished(self, saga: SagaState, step: str, direction: str, outcome: Outcome) -> None: ...
    def definitions_missing(self, counts: dict[tuple[str, int], int]) -> None:
        """In-flight sagas on record per (type, version) whose definition this replica has not loaded."""

    def child_trace_context(self, parent: SagaState, step: str, child_type: str) -> str:
        """The traceparent a child saga starts under: by default its parent's."""
        return parent.trace_context


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
    # When the call was handed out (its lease runs from about then) and how often recording failed.
    launched_at: float = 0.0
    recording_attempts: int = 0


@dataclass
class _Park:
    """A claimed command of a saga whose definition is not loaded: stop the saga for an operator."""

    command: Command
    detail: str


@dataclass
class _Wake:
    """A claimed wait (timer, signal wait, approval, child): it looks at itself in the committer."""

    command: Command


@dataclass
class _Signal:
    """A signal (or an approval's decision) for a saga, addressed by id or by type and business key."""

    saga_id: str
    saga_type: str
    business_key: str
    name: str
    signal_id: str
    payload: bytes
    actor: str
    reply: asyncio.Future[SignalReceipt]
    decision: bytes = b""
    # What makes two deliveries under one id the same; empty: the name and the payload.
    dedup: bytes = b""
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SignalReceipt:
    """What SignalSaga answers, the same for every repeat of one signal id."""

    saga: SagaState
    received_at: float
    duplicate: bool


@dataclass
class _Operate:
    operation: OperatorCall
    saga_id: str
    actor: str
    reason: str
    reply: asyncio.Future[SagaState]


_Item = _Start | _Result | _Operate | _Park | _Wake | _Signal


def _insert_order(item: _Item) -> tuple[int, str, str]:
    """Starts first, by saga type and business key; everything else after them, as it came."""
    if isinstance(item, _Start):
        return (0, item.definition.name, item.business_key)
    return (1, "", "")


@dataclass
class _BatchOutcome:
    """What a committed batch hands back to the event loop."""

    to_dispatch: list[tuple[Command, SagaState]] = field(default_factory=list)
    replies: list[tuple[asyncio.Future[Any], Any]] = field(default_factory=list)
    changed: list[tuple[SagaState, Transition]] = field(default_factory=list)
    started: list[SagaState] = field(default_factory=list)
    finished_calls: list[tuple[str, str]] = field(default_factory=list)
    events_by_saga: dict[str, list[EventRecord]] = field(default_factory=dict)
    wake_in: float = float("inf")
    # Outcomes whose own unit failed: recorded again shortly, not left to their lease's expiry.
    unrecorded: list[_Result] = field(default_factory=list)

    def merge(self, other: _BatchOutcome) -> None:
        self.to_dispatch += other.to_dispatch
        self.replies += other.replies
        self.changed += other.changed
        self.started += other.started
        self.finished_calls += other.finished_calls
        for saga_id, events in other.events_by_saga.items():
            self.events_by_saga.setdefault(saga_id, []).extend(events)
        self.wake_in = min(self.wake_in, other.wake_in)
        self.unrecorded += other.unrecorded


@dataclass
class _Writes:
    """One batch's transaction as its units write into it: the connection, its clock, and what changed."""

    connection: Connection
    now: float
    batch: _BatchOutcome
    event_rows: list[dict[str, Any]] = field(default_factory=list)
    # Sagas changed in this batch, by id: written once at its end.
    dirty: dict[str, SagaState] = field(default_factory=dict)


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
        heartbeat_interval: float = 0.5,
        silent_after: float = 2.5,
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
        if silent_after < 2 * heartbeat_interval:
            raise ValueError(
                f"REPLICA_SILENT_AFTER_SECONDS ({silent_after}) must be at least twice "
                f"HEARTBEAT_INTERVAL_SECONDS ({heartbeat_interval}): one late heartbeat must not look like a death"
            )
        self._heartbeat_interval = heartbeat_interval
        self._silent_after = silent_after
        self._claim_batch = claim_batch
        self._commit_batch = commit_batch
        self._engine = Engine(random.Random())
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        # (saga id, track) of every command this replica has handed out and not yet recorded.
        self._in_flight: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._wake_poller = asyncio.Event()
        self._stopping = False
        self._watches: WatchHub | None = None
        self._callables: dict[tuple[grpc.aio.Channel, str], grpc.aio.UnaryUnaryMultiCallable[Message, bytes]] = {}
        self.observer = observer or DispatchObserver()
        self._wrap_call = wrap_call
        # Each operator call's transition, given the saga, its pending command (if any) and the call.
        self._operations: dict[
            OperatorCall, Callable[[SagaState, _Pendings, _Operate, float, _Children], Transition]
        ] = {
            OperatorCall.PAUSE: self._pause,
            OperatorCall.RESUME: self._resume,
            OperatorCall.CANCEL: self._cancel,
            OperatorCall.TERMINATE: self._terminate,
            OperatorCall.RETRY: self._retry,
        }
        # Operator calls that reach a saga's children too (cancel reaches them through compensation).
        self._reach_children = frozenset({OperatorCall.PAUSE, OperatorCall.RESUME, OperatorCall.TERMINATE})
        self._validate_leases()

    def _validate_leases(self) -> None:
        for definition in self._registry.all():
            for flat in definition.nodes:
                step = flat.node
                if isinstance(step, Step) and step.timeout >= self._lease_seconds:
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
        # Alive before the first claim: other replicas only take over from silent ones.
        await self._database.transaction(lambda c: store.heartbeat(c, self.replica_id, time.time()))
        missing = await self._database.transaction(self._park_missing_definitions)
        self._report_missing(missing)
        self._loops = [
            self._spawn(self._commit_loop(), "saga committer", track=False),
            self._spawn(self._poll_loop(), "outbox poller", track=False),
            self._spawn(self._heartbeat_loop(), "replica heartbeat", track=False),
        ]

    async def _heartbeat_loop(self) -> None:
        """Say this replica is alive every heartbeat interval; once a minute, forget long-dead replicas."""
        beats_per_minute = max(1, round(60 / self._heartbeat_interval))
        beat = 0
        while not self._stopping:
            await asyncio.sleep(self._heartbeat_interval)
            beat += 1
            now = time.time()
            forget = now - 24 * 3600 if beat % beats_per_minute == 0 else None
            try:
                await self._database.transaction(
                    lambda c, now=now, forget=forget: store.heartbeat(  # type: ignore[misc]
                        c, self.replica_id, now, forget_before=forget
                    )
                )
            except Exception:
                log.exception("recording this replica's heartbeat failed; will try again")

    def _park_missing_definitions(self, connection: Connection) -> list[SagaState]:
        """Stop for an operator every in-flight saga whose definition is not loaded here; returns all of them.

        A saga whose command another replica holds on a live lease is left to it: that replica
        loaded the definition and is running it.
        """
        now = time.time()
        found = store.in_flight_without_definition(
            connection, self._registry.keys(), for_update=self._database.is_postgres
        )
        parked: list[SagaState] = []
        event_rows: list[dict[str, Any]] = []
        for saga in found:
            if saga.status == SagaStatus.NEEDS_ATTENTION:
                continue
            pendings = store.load_pendings(connection, saga.saga_id).values()
            if any(p.in_flight(now) and p.lease_owner != self.replica_id for p in pendings):
                continue
            store.delete_command(connection, saga.saga_id)
            transition = self._engine.definition_missing(
                saga, str(DefinitionMissing(saga.saga_type, saga.version)), now
            )
            store.append_events(saga, transition.events, event_rows)
            parked.append(saga)
        store.update_sagas(connection, parked)
        store.insert_events(connection, event_rows)
        return found

    def _report_missing(self, sagas: list[SagaState]) -> None:
        """One ERROR line naming the in-flight sagas this replica cannot run, and the metric."""
        by_definition: dict[tuple[str, int], list[str]] = {}
        for saga in sagas:
            by_definition.setdefault((saga.saga_type, saga.version), []).append(saga.saga_id)
        self.observer.definitions_missing({key: len(ids) for key, ids in by_definition.items()})
        if not sagas:
            return
        named = "; ".join(
            f"{name} v{version}: {', '.join(ids[:_NAMED_PER_DEFINITION])}"
            + (f" (and {len(ids) - _NAMED_PER_DEFINITION} more)" if len(ids) > _NAMED_PER_DEFINITION else "")
            for (name, version), ids in sorted(by_definition.items())
        )
        log.error(
            "%d in-flight sagas have no loaded definition and wait in NEEDS_ATTENTION (DEFINITION_MISSING): %s; "
            "load their definitions (SAGA_DEFINITIONS) and retry them",
            len(sagas),
            named,
        )

    def _spawn(self, coroutine: Any, name: str, *, track: bool = True) -> asyncio.Task[None]:
        """A task whose failure is always logged; tracked ones are waited for at stop."""
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)
        if track:
            self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("dispatcher task %r failed", task.get_name(), exc_info=error)

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

        def leave(connection: Connection) -> None:
            store.release_leases(connection, self.replica_id)
            store.leave(connection, self.replica_id)

        await self._database.transaction(leave)

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
        # One input entity, one saga: its compensations act on what the input names.
        definition.check_business_key(business_key, input_message)
        reply: asyncio.Future[tuple[SagaState, bool]] = asyncio.get_running_loop().create_future()
        payload = input_message.SerializeToString(deterministic=True)
        await self._queue.put(_Start(definition, business_key, payload, deadline_seconds, trace_context, reply))
        return await reply

    async def operate(self, operation: str, saga_id: str, actor: str, reason: str = "") -> SagaState:
        """Apply an operator call (an OperatorCall or its value; anything else is a ValueError)."""
        call = OperatorCall(operation)
        reply: asyncio.Future[SagaState] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Operate(call, saga_id, actor, reason, reply))
        return await reply

    async def signal(
        self,
        *,
        saga_id: str = "",
        saga_type: str = "",
        business_key: str = "",
        name: str,
        signal_id: str,
        payload: bytes,
        actor: str,
        decision: bytes = b"",
        dedup: bytes = b"",
        roles: frozenset[str] = frozenset(),
    ) -> SignalReceipt:
        """Deliver a signal (or an approval decision, with the caller's roles) exactly once; see _apply_signal."""
        if self._stopping:
            raise RetryableError("this orchestrator replica is shutting down; try another")
        reply: asyncio.Future[SignalReceipt] = asyncio.get_running_loop().create_future()
        await self._queue.put(
            _Signal(saga_id, saga_type, business_key, name, signal_id, payload, actor, reply, decision, dedup, roles)
        )
        return await reply

    def feed_watches(self, hub: WatchHub) -> None:
        """Push every committed change of a watched saga to hub: WatchSaga's feed from this replica."""
        self._watches = hub

    @property
    def registry(self) -> DefinitionRegistry:
        return self._registry

    def definition_of(self, saga: SagaState) -> SagaDefinition:
        return self._registry.get(saga.saga_type, saga.version)

    def _step_name(self, saga: SagaState) -> str:
        """The name of the node a saga stands at, or its index when its definition is not loaded here."""
        definition = self._registry.find(saga.saga_type, saga.version)
        if definition is None or not 0 <= saga.step_index < len(definition.nodes):
            return f"#{saga.step_index}"
        return definition.node(saga.step_index).name

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
                await self._commit(items)
            except Exception as error:
                # _commit handles the store's failures; this is a bug. The loop must outlive it,
                # or nothing would be recorded again.
                log.exception("the committer failed on a batch of %d units", len(items))
                self._batch_failed(items, error)
            finally:
                self._mark_done(len(items))

    async def _commit(self, items: list[_Item]) -> None:
        try:
            try:
                outcome = await self._database.transaction(lambda c, batch=items: self._apply_units(c, batch))  # type: ignore[misc]
            except _SomeUnitFailed as failed:
                # Nothing of the batch was applied: record it again, each unit in a savepoint of its own.
                cause = failed.__cause__
                log.warning("a unit of a batch of %d failed (%s: %s); recording each alone", len(items),
                            type(cause).__name__, cause)  # fmt: skip
                outcome = await self._database.transaction(lambda c, batch=items: self._apply_each(c, batch))  # type: ignore[misc]
        except Exception as error:
            log.exception("recording a batch of %d units failed", len(items))
            self._batch_failed(items, error)
            return
        for call in outcome.finished_calls:
            self._in_flight.discard(call)
        if outcome.wake_in < self._poll_interval:
            asyncio.get_running_loop().call_later(max(0.0, outcome.wake_in), self._wake_poller.set)
        for future, value in outcome.replies:
            if future.done():
                continue
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)
        for command, saga in outcome.to_dispatch:
            self._launch(command, saga)
        for result in outcome.unrecorded:
            self._record_again(result)
        for saga, transition in outcome.changed:
            for event in transition.events:
                if event.type is EventType.APPROVAL_REMINDER:
                    log.warning("saga %s (%s %s): approval %s still waits: %s", saga.saga_id, saga.saga_type,
                                saga.business_key, event.step, event.message)  # fmt: skip
                elif event.type is EventType.SAGA_NEEDS_ATTENTION:
                    # Here, not in the observer: the line is written with metrics and tracing off too.
                    log.warning("saga %s (%s %s) needs attention at step %s: %s", saga.saga_id, saga.saga_type,
                                saga.business_key, self._step_name(saga), saga.last_error or event.message)  # fmt: skip
        try:
            for saga in outcome.started:
                self.observer.saga_started(saga)
            for saga, transition in outcome.changed:
                self.observer.saga_changed(saga, transition)
                if self._watches is not None:
                    self._watches.publish(saga, outcome.events_by_saga.get(saga.saga_id, []))
        except Exception:
            # What is recorded stands and its calls are out: only a metric, span or watch missed it.
            log.exception("notifying the observers of a committed batch failed")

    def _batch_failed(self, items: list[_Item], error: BaseException) -> None:
        """The batch's transaction did not commit (or its commit was not confirmed): nothing of it is known durable."""
        for item in items:
            if isinstance(item, _Result):
                # Its fence makes a second recording a no-op if the first one did commit after all.
                self._record_again(item)
            elif isinstance(item, _Park | _Wake):
                # A wait not recorded is claimed again when its lease expires: nothing was sent.
                self._in_flight.discard(_call_of(item.command))
            elif not item.reply.done():
                # Safe to repeat: a start is deduplicated by its business key, and an operator
                # call that did commit is then refused for the state it left. The store's own
                # errors (unavailable, commit outcome unknown) say so themselves.
                failure = error if isinstance(error, RetryableError) else None
                item.reply.set_exception(failure or RetryableError(f"the saga store failed: {error}"))

    def _record_again(self, result: _Result) -> None:
        """Record an outcome again after a short backoff, for as long as this replica holds its command's lease."""
        result.recording_attempts += 1
        delay = min(_MAX_RECORDING_DELAY, 0.05 * 2 ** (result.recording_attempts - 1))
        if self._stopping or time.time() + delay > result.launched_at + self._lease_seconds:
            log.error(
                "the outcome of saga %s step %d %s could not be recorded in %d tries; its command is sent again "
                "when its lease expires",
                result.command.saga_id,
                result.command.step_index,
                result.command.direction,
                result.recording_attempts,
            )
            self._in_flight.discard(_call_of(result.command))
            return
        self._spawn(self._enqueue_later(result, delay), "record outcome again")

    async def _enqueue_later(self, item: _Item, delay: float) -> None:
        await asyncio.sleep(delay)
        self._queue.put_nowait(item)

    def _mark_done(self, count: int) -> None:
        for _ in range(count):
            self._queue.task_done()

    def _apply_units(self, connection: Connection, items: list[_Item]) -> _BatchOutcome:
        """Record every unit of the batch at once, with no savepoint: the common case, where none fails.

        When one fails this raises _SomeUnitFailed: svckit.db then rolls the whole unit of work back
        (nothing of the batch is applied or answered) and _commit records the batch again with
        _apply_each, where a unit that fails is rolled back alone and only its caller hears of it.
        A savepoint around the batch would cost two round trips per batch on PostgreSQL to save a
        transaction only when something fails.
        """
        # Starts insert their business keys in one order on every replica: two replicas starting
        # the same keys at once then queue behind each other instead of deadlocking in the
        # unique index (the later one finds the winner's saga). Other units keep their order.
        items = sorted(items, key=_insert_order)
        batch = _BatchOutcome()
        try:
            self._apply(connection, items, batch)
        except Exception as error:
            if _connection_lost(connection):
                raise  # nothing of the transaction stands: the database runs the whole unit again
            if needs_new_transaction(connection, error):
                raise  # this snapshot can never see the winner: svckit.db runs the batch again in a new one
            raise _SomeUnitFailed() from error
        return batch

    def _apply_each(self, connection: Connection, items: list[_Item]) -> _BatchOutcome:
        """Record every unit of the batch, each in a savepoint of its own: one that fails fails alone."""
        items = sorted(items, key=_insert_order)
        batch = _BatchOutcome()
        for item in items:
            self._apply_alone(connection, item, batch)
        return batch

    def _apply_alone(self, connection: Connection, item: _Item, batch: _BatchOutcome) -> None:
        for attempt in range(1, _UNIT_ATTEMPTS + 1):
            alone = _BatchOutcome()
            try:
                with savepoint(connection):
                    self._apply(connection, [item], alone)
            except Exception as error:
                if _connection_lost(connection):
                    raise
                if needs_new_transaction(connection, error):
                    # A serialization failure or deadlock, or a key race on one snapshot (REPEATABLE
                    # READ, SERIALIZABLE): a try in this transaction would fail the same way, so the
                    # whole batch is handed back to svckit.db, which runs it again in a new transaction
                    # (where a losing start finds the winner's saga). Nothing of it was answered yet.
                    raise
                if attempt < _UNIT_ATTEMPTS and is_retryable_conflict(error):
                    continue  # a unique-key race at READ COMMITTED: the next statement sees the winner
                self._unit_failed(item, error, batch)
                return
            batch.merge(alone)
            return

    def _unit_failed(self, item: _Item, error: BaseException, batch: _BatchOutcome) -> None:
        # A conflict that outlasted its tries is transient all the same: the caller may try again.
        conflict = is_retryable_conflict(error)
        if isinstance(item, _Result):
            log.error(
                "recording the outcome of saga %s step %d %s failed; trying again",
                item.command.saga_id,
                item.command.step_index,
                item.command.direction,
                exc_info=error,
            )
            batch.unrecorded.append(item)
        elif isinstance(item, _Park):
            log.error("stopping saga %s for its missing definition failed", item.command.saga_id, exc_info=error)
            batch.finished_calls.append(_call_of(item.command))
        elif isinstance(item, _Wake):
            log.error(
                "a wait of saga %s failed to record; it is looked at again when its lease expires",
                item.command.saga_id,
                exc_info=error,
            )
            batch.finished_calls.append(_call_of(item.command))
        elif conflict:
            log.warning("a unit met a lock conflict %d times: %s", _UNIT_ATTEMPTS, error)
            batch.replies.append((item.reply, RetryableError(f"the saga store met a conflict; retry: {error}")))
        elif isinstance(item, _Start):
            log.error("recording a start of %s %r failed", item.definition.name, item.business_key, exc_info=error)
            batch.replies.append((item.reply, NotRecorded("start", error)))
        elif isinstance(item, _Signal):
            log.error("recording signal %r of saga %s failed", item.name, item.saga_id, exc_info=error)
            batch.replies.append((item.reply, NotRecorded("signal", error)))
        else:
            log.error("recording %s of saga %s failed", item.operation, item.saga_id, exc_info=error)
            batch.replies.append((item.reply, NotRecorded(f"{item.operation} call", error)))

    def _apply(self, connection: Connection, items: list[_Item], batch: _BatchOutcome) -> None:
        w = _Writes(connection, time.time(), batch)
        for item in items:
            if isinstance(item, _Signal) and not item.saga_id:
                # Addressed by type and business key: find its id first, so it is locked in order below.
                found = store.find_by_business_key(connection, item.saga_type, item.business_key)
                item.saga_id = found[0].saga_id if found is not None else ""
        saga_ids = sorted(
            {
                item.command.saga_id if isinstance(item, _Result | _Park | _Wake) else item.saga_id
                for item in items
                if not isinstance(item, _Start)
            }
            - {""}
        )
        # In sorted order: two replicas locking some of the same sagas never deadlock.
        sagas = store.load_sagas(connection, saga_ids, for_update=self._database.is_postgres)
        for item in items:
            if isinstance(item, _Start):
                self._apply_start(w, item)
            elif isinstance(item, _Result):
                w.batch.finished_calls.append(_call_of(item.command))
                saga = sagas.get(item.command.saga_id)
                if saga is None or not store.fence(connection, item.command, self.replica_id):
                    # Another replica took the command over, or an operator removed it: its
                    # holder records the outcome; the call's effect is keyed, so nothing doubles.
                    continue
                definition = self.definition_of(saga)
                others = self._others(connection, saga, w.now)
                transition = self._engine.on_outcome(definition, saga, item.command, item.outcome, w.now, others)
                self._record(w, saga, transition)
            elif isinstance(item, _Wake):
                w.batch.finished_calls.append(_call_of(item.command))
                saga = sagas.get(item.command.saga_id)
                if saga is None or not store.fence(connection, item.command, self.replica_id):
                    continue
                self._apply_wake(w, saga, item.command)
            elif isinstance(item, _Signal):
                saga = sagas.get(item.saga_id)
                try:
                    if saga is None:
                        raise SignalTargetNotFound(item.saga_id, item.saga_type, item.business_key)
                    receipt = self._apply_signal(w, saga, item)
                except DomainError as refusal:
                    w.batch.replies.append((item.reply, refusal))
                    continue
                w.batch.replies.append((item.reply, receipt))
            elif isinstance(item, _Park):
                w.batch.finished_calls.append(_call_of(item.command))
                saga = sagas.get(item.command.saga_id)
                if saga is None or not store.fence(connection, item.command, self.replica_id):
                    continue
                self._record(w, saga, self._park(saga, item, w.now))
            else:
                saga = sagas.get(item.saga_id)
                if saga is None:
                    w.batch.replies.append((item.reply, SagaNotFound(item.saga_id)))
                    continue
                try:
                    transition = self._apply_operation(connection, saga, item, w.now)
                except DomainError as refusal:
                    w.batch.replies.append((item.reply, refusal))
                    continue
                self._record(w, saga, transition)
                if item.operation in self._reach_children:
                    self._operate_children(w, saga, item)
                w.batch.replies.append((item.reply, saga))
        store.update_sagas(connection, w.dirty.values())
        store.insert_events(connection, w.event_rows)
        if self._watches is not None and self._watches.watching:
            for row in w.event_rows:
                w.batch.events_by_saga.setdefault(row["saga_id"], []).append(EventRecord(**row))

    def _park(self, saga: SagaState, item: _Park, now: float) -> Transition:
        if saga.ended:
            # A call on the wire at terminate whose dispatcher was lost, of a definition not
            # loaded here: record that its outcome is unknown; nothing is sent after the end.
            saga.updated_at = now
            message = (
                f"outcome unknown after terminate (step index {item.command.step_index} {item.command.direction}: "
                f"{item.detail}); the effect may stand; not compensated"
            )
            return Transition([Event(EventType.EFFECT_AFTER_TERMINATE, now, code="UNKNOWN", message=message)])
        return self._engine.definition_missing(saga, item.detail, now)

    def _apply_start(self, w: _Writes, item: _Start) -> None:
        input_hash = hashlib.sha256(item.input_payload).hexdigest()
        found = store.find_by_business_key(w.connection, item.definition.name, item.business_key)
        if found is not None:
            existing, existing_hash = found
            if existing_hash != input_hash:
                conflict = BusinessKeyConflict(item.definition.name, item.business_key, existing.saga_id)
                w.batch.replies.append((item.reply, conflict))
            else:
                w.batch.replies.append((item.reply, (existing, False)))
            return
        saga = self._insert_saga(
            w,
            item.definition,
            item.business_key,
            item.input_payload,
            input_hash,
            w.now + item.deadline_seconds,
            item.trace_context,
            "",
        )
        w.batch.replies.append((item.reply, (saga, True)))

    def _insert_saga(
        self,
        w: _Writes,
        definition: SagaDefinition,
        business_key: str,
        input_payload: bytes,
        input_hash: str,
        deadline_at: float,
        trace_context: str,
        parent_id: str,
    ) -> SagaState:
        saga = SagaState(
            saga_id=uuid.uuid4().hex,
            saga_type=definition.name,
            version=definition.version,
            business_key=business_key,
            input=input_payload,
            status=SagaStatus.RUNNING,
            deadline_at=deadline_at,
            created_at=w.now,
            updated_at=w.now,
            trace_context=trace_context,
            parent_id=parent_id,
            # The saga keeps the contract and definition it started with until it ends.
            contract_hash=definition.contract_hash,
            definition_hash=definition.fingerprint,
        )
        transition = self._engine.start(definition, saga, w.now)
        store.append_events(saga, transition.events, w.event_rows)
        store.insert_saga(w.connection, saga, input_hash)
        for command in transition.commands():
            self._put_next(w, saga, command)
        if transition.start_child is not None:
            self._start_child(w, saga, transition.start_child)
            store.update_sagas(w.connection, [saga])
        w.batch.started.append(saga)
        w.batch.changed.append((saga, transition))
        return saga

    def _start_child(self, w: _Writes, parent: SagaState, start: ChildStart) -> None:
        """Start (or find, after a crash or a retry) the child a parent's step asks for, in the parent's transaction."""
        node_name = start.node_name
        found = store.find_by_business_key(w.connection, start.definition.name, start.business_key)
        if found is not None:
            child, created = found[0], False
        else:
            child = self._insert_saga(
                w,
                start.definition,
                start.business_key,
                start.input_payload,
                hashlib.sha256(start.input_payload).hexdigest(),
                start.deadline_at,
                self._child_trace_context(parent, node_name, start.definition.name),
                parent.saga_id,
            )
            created = True
        store.append_events(
            parent, [self._engine.child_started(parent, node_name, child, w.now, created)], w.event_rows
        )
        if not created and (child.ended or child.parent_id != parent.saga_id):
            # Ended already (a retried parent), or the key belongs to another saga: look at it now.
            store.wake(w.connection, parent.saga_id, w.now)
            w.batch.wake_in = 0.0

    def _apply_operation(self, connection: Connection, saga: SagaState, item: _Operate, now: float) -> Transition:
        if item.operation in _RUNS_THE_SAGA and not saga.ended:
            # Refused before anything changes (DefinitionMissing): this replica could not run it.
            self.definition_of(saga)
        pendings = store.load_pendings(connection, saga.saga_id)
        children: _Children = {}
        if item.operation is OperatorCall.CANCEL and saga.progress.children:
            children = store.load_sagas(connection, sorted(saga.progress.children.values()))
        transition = self._operations[item.operation](saga, pendings, item, now, children)
        commands = transition.commands()
        for track, pending in pendings.items():
            call = pending.command
            keep = False
            if item.operation is OperatorCall.TERMINATE:
                # Handed to a dispatcher, so a call may be on the wire (or was, when its holder
                # died). Its row stays: the outcome is recorded when it returns, as an effect after
                # terminate, or found unknown once the lease expires. Nothing new is sent. A wait
                # has nothing on the wire: it goes.
                keep = pending.handed_out and isinstance(self.definition_of(saga).node(call.step_index), Step)
            elif pending.in_flight(now) and (call in commands or track not in transition.drop):
                # On the wire, it stays as it is: its holder records the outcome, which then sees
                # the saga's new flags (paused, cancel requested, unwinding).
                keep = True
            if keep:
                commands = [c for c in commands if c is not call]
            else:
                store.delete_command(connection, saga.saga_id, track)
        transition.next_command, transition.more, transition.drop = None, commands, []
        return transition

    def _operate_children(self, w: _Writes, saga: SagaState, item: _Operate) -> None:
        """Pause, resume and terminate reach a saga's children that have not ended, and theirs."""
        for child_id in sorted(saga.progress.children.values()):
            child = w.dirty.get(child_id) or store.load_sagas(
                w.connection, [child_id], for_update=self._database.is_postgres
            ).get(child_id)
            if child is None or child.ended:
                continue
            reason = f"its parent {saga.saga_id}: {item.reason}" if item.reason else f"its parent {saga.saga_id}"
            child_item = _Operate(item.operation, child_id, item.actor, reason, item.reply)
            try:
                transition = self._apply_operation(w.connection, child, child_item, w.now)
            except DomainError:
                continue  # already where the call would put it (paused, say): nothing to do
            self._record(w, child, transition)
            self._operate_children(w, child, child_item)

    # -- the operator calls, one transition each (looked up in self._operations) --------------

    def _pause(
        self, saga: SagaState, pendings: _Pendings, item: _Operate, now: float, children: _Children
    ) -> Transition:
        return self._engine.pause(saga, _as_others(pendings, now), item.actor, item.reason, now)

    def _resume(
        self, saga: SagaState, pendings: _Pendings, item: _Operate, now: float, children: _Children
    ) -> Transition:
        return self._engine.resume(saga, _as_others(pendings, now), item.actor, now)

    def _cancel(
        self, saga: SagaState, pendings: _Pendings, item: _Operate, now: float, children: _Children
    ) -> Transition:
        definition = self.definition_of(saga)
        for pending in pendings.values():
            node = definition.node(pending.command.step_index)
            if isinstance(node, ChildSaga) and pending.command.direction == Direction.ACTION:
                child_id = saga.progress.children.get(node.name, "")
                child = children.get(child_id)
                if child is not None and child_past_pivot(node, child):
                    raise IllegalState(
                        OperatorCall.CANCEL,
                        saga.saga_id,
                        saga.effective_status,
                        f"a saga whose child {child_id} has not passed its own pivot ({node.name} has)",
                    )
        for pending in pendings.values():
            if pending.handed_out:
                # It was handed to a dispatcher once: treat its outcome as unknown.
                pending.command.uncertain = True
        others = _as_others(pendings, now)
        return self._engine.cancel(self.definition_of(saga), saga, others, False, item.actor, item.reason, now)

    def _terminate(
        self, saga: SagaState, pendings: _Pendings, item: _Operate, now: float, children: _Children
    ) -> Transition:
        return self._engine.terminate(saga, item.actor, item.reason, now)

    def _retry(
        self, saga: SagaState, pendings: _Pendings, item: _Operate, now: float, children: _Children
    ) -> Transition:
        return self._engine.retry(saga, item.actor, now, self.definition_of(saga))

    def _record(self, w: _Writes, saga: SagaState, transition: Transition) -> None:
        store.append_events(saga, transition.events, w.event_rows)
        for track in transition.drop:
            store.delete_command(w.connection, saga.saga_id, track)
        for command in transition.commands():
            self._put_next(w, saga, command)
        w.dirty[saga.saga_id] = saga
        if transition.start_child is not None:
            self._start_child(w, saga, transition.start_child)
        if saga.parent_id and (saga.ended or saga.status == SagaStatus.NEEDS_ATTENTION):
            # The parent's wait on this child looks at it now, in its own transaction.
            if store.wake(w.connection, saga.parent_id, w.now):
                w.batch.wake_in = 0.0
        w.batch.changed.append((saga, transition))

    def _others(self, connection: Connection, saga: SagaState, now: float) -> Others:
        """The saga's pending commands on other tracks: only a saga in a parallel group (or unwinding one) has any."""
        if saga.progress.group < 0 and not saga.progress.draining:
            return Others()
        return _as_others(store.load_pendings(connection, saga.saga_id), now)

    def _apply_wake(self, w: _Writes, saga: SagaState, command: Command) -> None:
        definition = self.definition_of(saga)
        node = definition.node(command.step_index)
        child: SagaState | None = None
        if isinstance(node, ChildSaga):
            child = self._child_of(w, saga, node)
            if command.direction == Direction.COMPENSATION and child is not None and child.parent_id == saga.saga_id:
                if child.status in (SagaStatus.COMPLETED, SagaStatus.RUNNING):
                    child_transition = self._engine.unwind_child(
                        node.definition,
                        child,
                        _as_others(store.load_pendings(w.connection, child.saga_id), w.now),
                        "orchestrator",
                        w.now,
                    )
                    for track in list(child_transition.drop):
                        store.delete_command(w.connection, child.saga_id, track)
                    child_transition.drop = []
                    self._record(w, child, child_transition)
        others = self._others(w.connection, saga, w.now)
        transition = self._engine.on_wake(definition, saga, command, w.now, others, child)
        self._record(w, saga, transition)

    def _child_of(self, w: _Writes, saga: SagaState, node: ChildSaga) -> SagaState | None:
        child_id = saga.progress.children.get(node.name)
        if child_id is None:
            return None
        if child_id in w.dirty:
            return w.dirty[child_id]
        return store.load_sagas(w.connection, [child_id], for_update=self._database.is_postgres).get(child_id)

    def _apply_signal(self, w: _Writes, saga: SagaState, item: _Signal) -> SignalReceipt:
        """Record a signal once: a repeat of its id is answered as before, another payload under it refused."""
        payload_hash = hashlib.sha256(item.name.encode() + b"\0" + (item.dedup or item.payload)).hexdigest()
        definition = self.definition_of(saga)
        if item.decision:
            # Who may decide comes first: a caller without the role learns nothing of earlier decisions.
            step = item.name.removeprefix(approval_signal(""))
            node = definition.step_by_name.get(step)
            if isinstance(node, Approval) and "operator" not in item.roles and node.role not in item.roles:
                raise ApprovalRoleRequired(saga.saga_id, step, node.role)
        found = store.find_signal(w.connection, saga.saga_id, item.signal_id)
        if found is not None:
            _, stored_hash, received_at = found
            if stored_hash != payload_hash:
                if item.decision:
                    raise ApprovalAlreadyDecided(saga.saga_id, item.name.removeprefix(approval_signal("")))
                raise SignalIdReused(saga.saga_id, item.signal_id)
            return SignalReceipt(saga, received_at, True)
        if saga.ended:
            raise SagaEnded(saga.saga_id, saga.status)
        if item.name not in definition.signal_names():
            awaited = sorted(definition.signal_names())
            raise SignalNotAwaited(saga.saga_id, definition.name, item.name.removeprefix(approval_signal("")), awaited)
        if len(saga.progress.signals) >= MAX_KEPT_SIGNALS:
            raise TooManySignals(saga.saga_id, len(saga.progress.signals))
        store.insert_signal(w.connection, saga.saga_id, item.signal_id, item.name, payload_hash, w.now, item.actor)
        transition = self._engine.receive_signal(
            saga, item.name, item.signal_id, item.payload, item.actor, w.now, item.decision
        )
        self._record(w, saga, transition)
        if not self._consume_now(w, saga, item.name) and store.wake(w.connection, saga.saga_id, w.now):
            w.batch.wake_in = 0.0
        return SignalReceipt(saga, w.now, False)

    def _consume_now(self, w: _Writes, saga: SagaState, name: str) -> bool:
        """Consume a signal in the transaction that records it, when a wait for it sits unclaimed and not held.

        Otherwise (no such wait yet, a paused saga, a wait being looked at) the signal stays kept and
        the wait consumes it when it is next looked at.
        """
        pendings = store.load_pendings(w.connection, saga.saga_id)
        definition = self.definition_of(saga)
        for track, pending in pendings.items():
            command = pending.command
            node = definition.node(command.step_index)
            if (
                isinstance(node, WaitForSignal | Approval)
                and node.signal_name == name
                and command.direction == Direction.ACTION
                and command.due_at is not None
                and not pending.handed_out
            ):
                store.delete_command(w.connection, saga.saga_id, track)
                others = _as_others({t: p for t, p in pendings.items() if t != track}, w.now)
                self._record(w, saga, self._engine.on_wake(definition, saga, command, w.now, others))
                return True
        return False

    def _put_next(self, w: _Writes, saga: SagaState, command: Command | None) -> None:
        if command is None:
            return
        if command.due_at is not None and command.due_at <= w.now and not self._stopping:
            # Leased to ourselves in the same transaction: it goes out right after the commit,
            # with no poll in between.
            store.put_command(w.connection, command, self.replica_id, w.now + self._lease_seconds)
            w.batch.to_dispatch.append((command, saga))
        else:
            store.put_command(w.connection, command, None, 0.0)
            if command.due_at is not None:
                w.batch.wake_in = min(w.batch.wake_in, command.due_at - w.now)

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
                        silent_since=time.time() - self._silent_after,
                    )
                )
            except Exception:
                log.exception("claiming due commands failed; will try again")
                continue
            for command, saga in claimed:
                if _call_of(command) not in self._in_flight:
                    self._launch(command, saga)
            if len(claimed) >= free:
                # A full claim: more are likely due (a burst of timers, say); look again at once.
                self._wake_poller.set()

    def _launch(self, command: Command, saga: SagaState) -> None:
        self._in_flight.add(_call_of(command))
        now = time.time()
        definition = self._registry.find(saga.saga_type, saga.version)
        if definition is None:
            # Never sent: stop the saga for an operator instead.
            self._queue.put_nowait(_Park(command, str(DefinitionMissing(saga.saga_type, saga.version))))
            return
        if saga.ended:
            # Only a terminated saga keeps a command past its end: the call that was on the wire
            # at terminate, whose dispatcher died before recording it. Sending it again could make
            # its effect happen now, after the end: record its outcome as unknown instead.
            lost = Outcome(grpc.StatusCode.UNKNOWN, "its dispatcher stopped before the call returned", None, now, now)
            self._queue.put_nowait(_Result(command, lost, now))
            return
        if not isinstance(definition.node(command.step_index), Step):
            # A wait sends nothing: it looks at itself (fires, times out, consumes) in the committer.
            self._queue.put_nowait(_Wake(command))
            return
        self._spawn(self._call(definition, command, saga, now), f"call {saga.saga_id}")

    async def _call(self, definition: SagaDefinition, command: Command, saga: SagaState, launched_at: float) -> None:
        step = definition.step(command.step_index)
        outcome: Outcome | None = None
        try:
            async with self._slots:
                if self._wrap_call is not None:
                    # The observer runs inside the wrapper too, so it can annotate the step's span.
                    with self._wrap_call(saga, step.name, command.direction, command.attempt):
                        outcome = await self._make_call(definition, command, saga)
                        self._call_finished(saga, step.name, command.direction, outcome)
                else:
                    outcome = await self._make_call(definition, command, saga)
                    self._call_finished(saga, step.name, command.direction, outcome)
        except Exception as error:
            log.exception("saga %s step %s %s: the dispatcher failed around the call", saga.saga_id, step.name,
                          command.direction)  # fmt: skip
            if outcome is None:
                # Whether the call went out is not known: an unknown outcome, compensated if it unwinds.
                now = time.time()
                outcome = Outcome(
                    grpc.StatusCode.UNKNOWN, f"dispatcher: {type(error).__name__}: {error}", None, now, now
                )
        self._queue.put_nowait(_Result(command, outcome, launched_at))

    def _child_trace_context(self, parent: SagaState, step: str, child_type: str) -> str:
        try:
            return self.observer.child_trace_context(parent, step, child_type)
        except Exception:
            log.exception("the dispatch observer failed; the child starts under its parent's trace")
            return parent.trace_context

    def _call_finished(self, saga: SagaState, step: str, direction: str, outcome: Outcome) -> None:
        try:
            self.observer.call_finished(saga, step, direction, outcome)
        except Exception:
            log.exception("the dispatch observer failed; the outcome is recorded all the same")

    async def _make_call(self, definition: SagaDefinition, command: Command, saga: SagaState) -> Outcome:
        step = definition.step(command.step_index)
        call = step.action if command.direction == Direction.ACTION else step.compensation
        assert call is not None
        started = time.time()
        timeout = step.timeout
        if command.direction == Direction.ACTION and step.kind is StepKind.COMPENSATABLE:
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
            request = call.build_request(definition.context(saga.saga_id, saga.input, saga.results, saga.business_key))
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
        except RequestNotBuilt as error:
            # Nothing went out, and a rebuild from the same stored data fails the same way.
            message = f"the request could not be built: {error}"
            return Outcome(grpc.StatusCode.FAILED_PRECONDITION, message, None, started, time.time())
        except Exception as error:
            log.exception("saga %s step %s %s failed before the call", saga.saga_id, step.name, command.direction)
            return Outcome(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}", None, started, time.time())


def _call_of(command: Command) -> tuple[str, str]:
    return (command.saga_id, command.track)


def _as_others(pendings: dict[str, PendingCommand], now: float) -> Others:
    for pending in pendings.values():
        if pending.handed_out and not pending.in_flight(now):
            # Taken by a dispatcher whose lease ran out (it died, or is slow): its call may have gone out.
            pending.command.uncertain = True
    return Others(
        {track: pending.command for track, pending in pendings.items()},
        frozenset(track for track, pending in pendings.items() if pending.in_flight(now)),
    )


def _connection_lost(connection: Connection) -> bool:
    """True when the driver's connection is gone: a failure then is not the unit's own."""
    if connection.invalidated or connection.closed:
        return True
    raw = connection.connection.dbapi_connection
    return bool(getattr(raw, "closed", False) or getattr(raw, "broken", False))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)
