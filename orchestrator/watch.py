"""WatchSaga's feed: a hub per process, fed by this replica's commits and by one shared reader for other replicas'.

A stream reads the store when it opens (the history after its after_seq) and again only when it
sees a gap in the sequence numbers; everything else reaches it as a push. This replica's
dispatcher pushes each commit of a watched saga (`publish`). Commits by other replicas sharing
the database are found by one background reader per process: every `read_interval` seconds it
asks, in one statement per `chunk_size` watched sagas, which of them numbered new events, loads
those events once and pushes them to every stream of the saga. With no stream open there is no
reader and no query. At most `max_watchers` streams are open at once; one more is refused with
RESOURCE_EXHAUSTED, reason WATCHERS_EXHAUSTED, and a slot frees as soon as a stream ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from sqlalchemy import Connection, select

from orchestrator import store
from orchestrator.engine import SagaState
from orchestrator.errors import SagaNotFound
from orchestrator.status import ENDED_STATUSES, SagaStatus
from orchestrator.store import EventRecord
from svckit.db import Database
from svckit.errors import ResourceExhausted

__all__ = ["DEFAULT_MAX_WATCHERS", "Subscription", "WatchHub", "WatchersExhausted"]

log = logging.getLogger("sagasuite.watch")

DEFAULT_MAX_WATCHERS = 1000
# Statuses after which a watched saga makes no progress without an operator: its stream ends.
_WATCH_STOP = ENDED_STATUSES | {SagaStatus.NEEDS_ATTENTION}

Update = tuple[SagaState, list[EventRecord]]


class WatchersExhausted(ResourceExhausted):
    """This process already serves MAX_WATCHERS WatchSaga streams."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            "WATCHERS_EXHAUSTED",
            f"this orchestrator already serves {limit} WatchSaga streams (MAX_WATCHERS); "
            "retry later, or watch through another replica",
            {"max_watchers": str(limit)},
        )
        self.limit = limit


class Subscription:
    """One open stream's slot and its queue of pushed updates; close() frees the slot."""

    def __init__(self, hub: WatchHub, saga_id: str) -> None:
        self.saga_id = saga_id
        self._hub = hub
        self._updates: list[Update] = []
        self._changed = asyncio.Event()
        self._closed = False

    def push(self, update: Update) -> None:
        self._updates.append(update)
        self._changed.set()

    def _take(self) -> list[Update]:
        self._changed.clear()
        updates, self._updates = self._updates, []
        return updates

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._release(self)

    async def events(self, after_seq: int) -> AsyncGenerator[tuple[SagaState, EventRecord], None]:
        """The saga's events after after_seq, each with the saga as it stood then, in order and each once;
        ends when the saga ended or needs attention. Raises SagaNotFound for an unknown saga."""
        after = after_seq
        read_store = True
        latest: SagaState | None = None
        while True:
            if read_store:
                self._take()  # what the read below returns supersedes anything queued before it
                saga, events = await self._hub._read(self.saga_id, after)
                if saga is None:
                    raise SagaNotFound(self.saga_id)
                self._hub._observed(self.saga_id, saga.event_seq)
                updates = [(saga, events)]
            else:
                updates = self._take()
            read_store = False
            for saga, events in updates:
                latest = saga
                for event in events:
                    if event.seq <= after:
                        continue
                    if event.seq != after + 1:
                        # A gap: events committed elsewhere came in between; read them in order.
                        read_store = True
                        break
                    yield saga, event
                    after = event.seq
                if read_store:
                    break
            if read_store:
                continue
            if latest is not None and latest.event_seq > after:
                # The saga numbered events this stream was not handed (a push without them): read them.
                read_store = True
                continue
            if latest is not None and latest.status in _WATCH_STOP and not latest.paused:
                return
            await self._changed.wait()


class WatchHub:
    """Every open WatchSaga stream of this process, the pushes that feed them and the one shared reader."""

    def __init__(
        self,
        database: Database,
        *,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        read_interval: float = 0.5,
        chunk_size: int = 500,
    ) -> None:
        self._database = database
        self.max_watchers = max_watchers
        self._read_interval = read_interval
        self._chunk_size = chunk_size
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._open = 0
        # The highest event number every stream of a saga has been handed (by a push or its own read).
        self._known: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._wake_reader = asyncio.Event()

    # -- what the server and the dispatcher call ----------------------------------------------

    @property
    def open_streams(self) -> int:
        return self._open

    @property
    def watching(self) -> bool:
        """True while any stream is open (the dispatcher collects events for pushes only then)."""
        return self._open > 0

    @property
    def reader_running(self) -> bool:
        return self._reader is not None and not self._reader.done()

    def subscribe(self, saga_id: str) -> Subscription:
        """A slot for one stream of saga_id; raises WatchersExhausted past max_watchers."""
        if self._open >= self.max_watchers:
            raise WatchersExhausted(self.max_watchers)
        subscription = Subscription(self, saga_id)
        self._subscriptions.setdefault(saga_id, set()).add(subscription)
        self._open += 1
        if not self.reader_running:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return subscription

    def publish(self, saga: SagaState, events: list[EventRecord]) -> None:
        """Hand a committed change of a saga to each of its streams; a saga nobody watches costs a lookup."""
        subscriptions = self._subscriptions.get(saga.saga_id)
        if not subscriptions:
            return
        if saga.event_seq > self._known.get(saga.saga_id, 0):
            self._known[saga.saga_id] = saga.event_seq
        for subscription in subscriptions:
            subscription.push((saga, events))

    # -- internals -----------------------------------------------------------------------------

    def _release(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.saga_id)
        if subscriptions is None or subscription not in subscriptions:
            return
        subscriptions.discard(subscription)
        self._open -= 1
        if not subscriptions:
            del self._subscriptions[subscription.saga_id]
            self._known.pop(subscription.saga_id, None)
        if not self._subscriptions:
            self._wake_reader.set()  # the reader stops at once rather than after its interval

    def _observed(self, saga_id: str, event_seq: int) -> None:
        # A stream read the store up to event_seq: from here on, the reader looks for newer events.
        if saga_id in self._subscriptions and event_seq > self._known.get(saga_id, -1):
            self._known[saga_id] = event_seq

    async def _read(self, saga_id: str, after_seq: int) -> tuple[SagaState | None, list[EventRecord]]:
        def work(connection: Connection) -> tuple[SagaState | None, list[EventRecord]]:
            saga = store.load_sagas(connection, [saga_id]).get(saga_id)
            # The saga row numbers its last event: read the history only when it grew.
            if saga is None or saga.event_seq <= after_seq:
                return saga, []
            return saga, store.load_events(connection, saga_id, after_seq)

        return await self._database.transaction(work)

    async def _read_loop(self) -> None:
        """The shared reader: a round every read_interval seconds while any stream is open."""
        while self._subscriptions:
            self._wake_reader.clear()
            try:
                await asyncio.wait_for(self._wake_reader.wait(), self._read_interval)
            except TimeoutError:
                pass
            if not self._subscriptions:
                return
            try:
                await self.read_changes()
            except Exception:
                log.warning("reading watched sagas failed; trying again in %.1fs", self._read_interval, exc_info=True)

    async def read_changes(self) -> None:
        """One round of the shared reader: one transaction with one statement per chunk_size watched sagas,
        and the new events of each saga loaded once and pushed to every stream of it."""
        # Only sagas some stream has read already: a stream still opening reads for itself.
        known = {saga_id: seq for saga_id, seq in self._known.items() if saga_id in self._subscriptions}
        if not known:
            return
        updates = await self._database.transaction(lambda c: self._changes(c, known))
        for saga, events in updates:
            self.publish(saga, events)

    def _changes(self, connection: Connection, known: dict[str, int]) -> list[Update]:
        saga_ids = list(known)
        changed: list[str] = []
        for start in range(0, len(saga_ids), self._chunk_size):
            chunk = saga_ids[start : start + self._chunk_size]
            query = select(store.SAGA.c.saga_id, store.SAGA.c.event_seq).where(store.SAGA.c.saga_id.in_(chunk))
            changed += [saga_id for saga_id, event_seq in connection.execute(query) if event_seq > known[saga_id]]
        if not changed:
            return []
        sagas = store.load_sagas(connection, changed)
        return [
            (sagas[saga_id], store.load_events(connection, saga_id, known[saga_id]))
            for saga_id in changed
            if saga_id in sagas
        ]
