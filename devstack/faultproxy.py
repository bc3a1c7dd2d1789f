"""A TCP proxy in front of PostgreSQL for tests and chaos runs, which can lose a COMMIT's reply or cut at COMMIT.

It forwards the wire protocol untouched, message by message, and watches what clients send: psycopg
sends `commit()` as a simple Query message ('Q') whose text is COMMIT. When armed, the next COMMITs
meet the armed fault:

- `DROP_COMMIT_REPLY`: the COMMIT reaches the server and commits; the server's answer is thrown away
  and the client's connection is closed, so the client cannot know that it committed.
- `CUT_BEFORE_COMMIT`: the connection is cut with the COMMIT still in the proxy; the server sees its
  client vanish inside the transaction and rolls it back.
- `CUT_DURING_COMMIT`: the COMMIT is passed on and both sides are cut at once, without waiting for the
  answer: whether it committed is up to the server.

The proxy runs its own event loop on a thread of its own, so it keeps forwarding while a test blocks
(waiting for a process to start, say). It answers SSL and GSS encryption requests with "no" itself,
so clients fall back to plain text, which it can read.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["CommitFault", "PgProxy"]

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_READY_FOR_QUERY = b"Z"
_QUERY = b"Q"


class CommitFault(enum.Enum):
    """What happens to an armed COMMIT."""

    DROP_COMMIT_REPLY = "drop-commit-reply"
    CUT_BEFORE_COMMIT = "cut-before-commit"
    CUT_DURING_COMMIT = "cut-during-commit"


@dataclass(eq=False)
class _Session:
    """One client connection and its connection to the server."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    # Set once a COMMIT went to the server under DROP_COMMIT_REPLY: its answer must not reach the client.
    swallowing: bool = False
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def cut(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.server):
            transport = writer.transport
            if not transport.is_closing():
                # abort(): no orderly shutdown, as when a network path dies; buffered bytes are lost.
                transport.abort()


class PgProxy:
    """Forward 127.0.0.1:<port> to a PostgreSQL server; arm() makes the next COMMITs fail as asked."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.commits_seen = 0
        self.commits_tripped = 0
        self._lock = threading.Lock()
        self._armed: CommitFault | None = None
        self._armed_times = 0
        self._tripped = threading.Condition(self._lock)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[_Session] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)

    # -- control, from any thread --------------------------------------------------------------

    def start(self) -> PgProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(timeout=10)
        return self

    def url(self, database_url: str) -> str:
        """database_url (host:port of the real server) rewritten to go through this proxy, in plain text."""
        scheme, rest = database_url.split("://", 1)
        credentials, _, host_and_path = rest.rpartition("@")
        _, _, path = host_and_path.partition("/")
        prefix = f"{credentials}@" if credentials else ""
        separator = "&" if "?" in path else "?"
        return f"{scheme}://{prefix}127.0.0.1:{self.port}/{path}{separator}sslmode=disable&gssencmode=disable"

    def arm(self, fault: CommitFault, times: int = 1) -> None:
        """The next `times` COMMITs, from any client, meet `fault`."""
        with self._lock:
            self._armed, self._armed_times = fault, times

    def disarm(self) -> None:
        with self._lock:
            self._armed, self._armed_times = None, 0

    def wait_tripped(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until `count` COMMITs in all have met a fault; False if that did not happen in time."""
        with self._tripped:
            return self._tripped.wait_for(lambda: self.commits_tripped >= count, timeout)

    def cut_all(self) -> None:
        """Cut every open connection at once, as a network failure would."""

        def cut_every_session() -> None:
            for session in list(self._sessions):
                session.cut()

        self._loop.call_soon_threadsafe(cut_every_session)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for session in list(self._sessions):
                session.cut()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    # -- the proxy, on its own loop -------------------------------------------------------------

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _take_fault(self) -> CommitFault | None:
        with self._lock:
            self.commits_seen += 1
            if self._armed is None or self._armed_times <= 0:
                return None
            fault = self._armed
            self._armed_times -= 1
            if self._armed_times == 0:
                self._armed = None
            return fault

    def _count_tripped(self) -> None:
        with self._tripped:
            self.commits_tripped += 1
            self._tripped.notify_all()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        session = _Session(client_writer, server_writer)
        self._sessions.add(session)
        try:
            upstream = asyncio.create_task(self._client_to_server(session, client_reader))
            downstream = asyncio.create_task(self._server_to_client(session, server_reader))
            session.tasks = [upstream, downstream]
            await asyncio.wait(session.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy is closing; returning (not raising) keeps asyncio's stream callback quiet
        finally:
            session.cut()
            for task in session.tasks:
                task.cancel()
            self._sessions.discard(session)

    async def _client_to_server(self, session: _Session, reader: asyncio.StreamReader) -> None:
        try:
            await self._startup(session, reader)
            while True:
                header = await reader.readexactly(5)
                kind = header[:1]
                (length,) = struct.unpack("!i", header[1:])
                body = await reader.readexactly(length - 4)
                if kind == _QUERY and body.rstrip(b"\0").strip().upper() in (b"COMMIT", b"COMMIT;"):
                    fault = self._take_fault()
                    if fault is CommitFault.CUT_BEFORE_COMMIT:
                        session.cut()
                        self._count_tripped()
                        return
                    if fault is CommitFault.DROP_COMMIT_REPLY:
                        session.swallowing = True
                    session.server.write(header + body)
                    await session.server.drain()
                    if fault is CommitFault.CUT_DURING_COMMIT:
                        session.cut()
                        self._count_tripped()
                        return
                    continue
                session.server.write(header + body)
                await session.server.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def _startup(self, session: _Session, reader: asyncio.StreamReader) -> None:
        """Pass the untyped startup message on, answering encryption requests with "N" first."""
        while True:
            (length,) = struct.unpack("!i", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                session.client.write(b"N")
                await session.client.drain()
                continue
            session.server.write(struct.pack("!i", length) + body)
            await session.server.drain()
            return

    async def _server_to_client(self, session: _Session, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await reader.readexactly(5)
                (length,) = struct.unpack("!i", header[1:])
                body = await reader.readexactly(length - 4)
                if session.swallowing:
                    if header[:1] == _READY_FOR_QUERY:
                        # The server has answered the COMMIT: it is durable. The client never learns it.
                        session.cut()
                        self._count_tripped()
                        return
                    continue
                session.client.write(header + body)
                await session.client.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
