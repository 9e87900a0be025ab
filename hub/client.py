"""Asking the swarm from Python: what ``swarm-hub ask`` and the HTTP gateway use.

    async with SwarmClient(url) as client:
        answer = await client.ask(PromptRequest(prompt="What is 2+2?"), timeout=60)

        async with client.streaming(PromptRequest(prompt="Tell a story", stream=True), timeout=60) as stream:
            async for chunk in stream:          # StreamChunk, in order, duplicates dropped
                print(chunk.text, end="")
            answer = await stream.answer()      # the full Answer, as ask() gives it

Each client listens on its own reply topic (and the stream topics below it) and matches replies
to requests by id, so many requests can be in flight at once. Requests go out in the scope of
the client's login (``prompt/{login}``), and replies come on ``reply/{login}/{name}``, which only
that login may read (with the shared ``client`` login, every holder of that login can). Leaving a
``streaming`` block before the answer came cancels the request: the hub stops the node working on it.

With ``watch=True`` the client also follows the hub's retained status and node table
(``client.hub``, ``client.fleet``), for views that show the swarm live; with ``metrics``, a callback
gets every message on the hub's metrics topics (``(topic, payload)``; the gateway's ``/metrics``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import structlog

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, ProtocolError, RequestFailed
from nova_swarm.broker.contract.messages import (
    Answer,
    CancelRequest,
    ErrorReply,
    HubStatus,
    NodeTable,
    PromptRequest,
    StreamChunk,
    StreamEnd,
    decode,
    decode_reply,
    decode_stream,
)
from nova_swarm.broker.contract.topics import SHARED_SCOPE, Topics, check_id
from nova_swarm.broker.link.base import Links
from nova_swarm.broker.link.connection import ConnectionLost, links_for
from nova_swarm.broker.link.url import BrokerURL

log = structlog.get_logger("nova_swarm.client")


class Stream:
    """One streamed request, as its reader sees it: chunks in ``seq`` order, then the answer.

    Duplicates (a ``seq`` already seen, as QoS 1 may deliver twice) are dropped. A chunk that
    arrives early (a gap before it) waits for the missing ones; the stream's end fills any gap
    that never closes, because the answer on the reply topic is complete either way."""

    def __init__(self, request_id: str, reply: asyncio.Future[Answer | ErrorReply]) -> None:
        self.request_id = request_id
        self._reply = reply
        self._next = 0
        self._early: dict[int, StreamChunk | StreamEnd] = {}
        self._ready: asyncio.Queue[StreamChunk | StreamEnd] = asyncio.Queue()
        self.ended: StreamEnd | None = None
        #: how many duplicates and gaps this reader saw (for tests and curious users)
        self.duplicates = 0
        self.gaps = 0

    def _deliver(self, message: StreamChunk | StreamEnd) -> None:
        if isinstance(message, StreamChunk) and message.restart and message.seq > self._next:
            # A new start past what we expected (a hub that restarted numbers its resumed
            # streams from far ahead): nothing before it counts any more.
            self._early = {seq: m for seq, m in self._early.items() if seq > message.seq}
            self._next = message.seq
        if message.seq < self._next or message.seq in self._early:
            self.duplicates += 1
            return
        self._early[message.seq] = message
        while self._next in self._early:
            self._ready.put_nowait(self._early.pop(self._next))
            self._next += 1

    def _close_gaps(self) -> None:
        """The reply came: whatever is still held waits for nothing more."""
        if self._early:
            self.gaps += 1
            for seq in sorted(self._early):
                self._ready.put_nowait(self._early.pop(seq))

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[StreamChunk]:
        while self.ended is None:
            reply_waiter = asyncio.ensure_future(asyncio.shield(self._reply))
            getter = asyncio.ensure_future(self._ready.get())
            try:
                waiters: set[asyncio.Future[Any]] = {getter, reply_waiter}
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reply_waiter.cancel()
                if not getter.done():
                    getter.cancel()
            if getter in done:
                message = getter.result()
            elif self._ready.empty():
                # The reply came and nothing is queued: the end message was lost or gapped.
                self._close_gaps()
                if self._ready.empty():
                    return
                continue
            else:
                continue
            if isinstance(message, StreamEnd):
                self.ended = message
                return
            yield message

    async def answer(self) -> Answer:
        """The full answer (or RequestFailed), as ``SwarmClient.ask`` would give it."""
        reply = await self._reply
        if isinstance(reply, ErrorReply):
            raise RequestFailed(reply.error.code, reply.error.message, retry_after_s=reply.error.retry_after_s)
        return reply

    @property
    def finished(self) -> bool:
        return self._reply.done()


class SwarmClient:
    def __init__(
        self,
        url: BrokerURL | None = None,
        *,
        links: Links | None = None,
        swarm: str = "main",
        ca_file: Path | None = None,
        watch: bool = False,
        metrics: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.topics = Topics(swarm)
        self.name = f"c-{uuid.uuid4().hex[:12]}"
        #: the login our requests belong to (the shared scope on a broker without logins)
        links = links_for(url, links, ca_file=ca_file)
        self.scope = _scope_of(links.url)
        shared = self.scope == SHARED_SCOPE
        self.reply_topic = self.topics.reply(self.scope, self.name)
        self._prompt_topic = self.topics.prompt(None if shared else self.scope)
        self._cancel_topic = self.topics.cancel(None if shared else self.scope)
        self._conn = links.open(client_id=self.name)
        self._waiting: dict[str, asyncio.Future[Answer | ErrorReply]] = {}
        self._streams: dict[str, Stream] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watch = watch
        #: raising ProtocolError drops the message (logged), as with any malformed one
        self._metrics = metrics
        #: the hub's retained status and node table (``watch=True`` only; None until seen)
        self.hub: HubStatus | None = None
        self.fleet: NodeTable | None = None

    async def __aenter__(self) -> SwarmClient:
        await self._conn.__aenter__()
        await self._conn.subscribe(self.reply_topic, f"{self.reply_topic}/stream/+", qos=1)
        if self._watch:
            await self._conn.subscribe(self.topics.hub_status(), self.topics.hub_nodes(), qos=1)
        if self._metrics is not None:
            # QoS 0, as the hub publishes them: a lost reading is replaced by the next round's.
            await self._conn.subscribe(self.topics.metrics_all(), qos=0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            # wait, not await: the reader's own end (cancelled, or the broker gone) is not ours
            # to raise, but a cancel of whoever is closing us must still get through.
            await asyncio.wait([self._reader])
            if not self._reader.cancelled():
                self._reader.exception()  # retrieved, so asyncio does not log it as lost
        await self._conn.__aexit__(exc_type, exc, tb)

    async def wait_closed(self) -> NoReturn:
        """Until the connection ends, then ``ConnectionLost`` saying why: for owners that
        reconnect (``broker.link.reconnect.reconnecting``)."""
        error: BaseException | None = None
        if self._reader is not None:
            await asyncio.wait([self._reader])
            error = None if self._reader.cancelled() else self._reader.exception()
        raise ConnectionLost(str(error) if error is not None else "the connection ended")

    async def _read(self) -> None:
        stream_prefix = f"{self.reply_topic}/stream/"
        try:
            async for message in self._conn.messages():
                try:
                    if message.topic.startswith(stream_prefix):
                        part = decode_stream(message.payload)
                        stream = self._streams.get(part.id)
                        if stream is not None:
                            stream._deliver(part)
                    elif message.topic == self.reply_topic:
                        reply = decode_reply(message.payload)
                        future = self._waiting.get(reply.id or "")
                        if future is not None and not future.done():
                            future.set_result(reply)
                    elif message.topic == self.topics.hub_status() and message.payload:
                        self.hub = decode(HubStatus, message.payload)
                    elif message.topic == self.topics.hub_nodes() and message.payload:
                        self.fleet = decode(NodeTable, message.payload)
                    elif self._metrics is not None and self.topics.parse_metrics(message.topic):
                        self._metrics(message.topic, message.payload)
                except ProtocolError as exc:
                    log.debug("ignored a malformed message", topic=message.topic, error=str(exc))
        except Exception as exc:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(exc)
            raise

    async def send(self, request: PromptRequest) -> asyncio.Future[Answer | ErrorReply]:
        """Publish a request (an id and our reply topic are filled in); await the future for its reply."""
        _, future = await self._send(request, stream=False)
        return future

    async def _send(self, request: PromptRequest, *, stream: bool) -> tuple[str, asyncio.Future[Answer | ErrorReply]]:
        """``send``, and the id it gave the request. With ``stream``, a Stream in ``_streams``
        takes the request's chunks from before it leaves, so none is missed; whoever asked for
        it removes it."""
        request_id = request.id or uuid.uuid4().hex
        request = request.model_copy(update={"id": request_id, "reply_to": self.reply_topic})
        future: asyncio.Future[Answer | ErrorReply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future

        def forget(_: asyncio.Future[Answer | ErrorReply]) -> None:
            self._waiting.pop(request_id, None)

        future.add_done_callback(forget)
        if stream:
            self._streams[request_id] = Stream(request_id, future)
        try:
            await self._conn.publish(self._prompt_topic, request.encode(), qos=1)
        except BaseException:
            self._streams.pop(request_id, None)
            future.cancel()
            raise
        return request_id, future

    async def ask(self, request: PromptRequest, *, timeout: float) -> Answer:
        """The answer, or RequestFailed with the hub's error code (or a local timeout)."""
        reply = await self._wait(await self.send(request), timeout)
        if isinstance(reply, ErrorReply):
            raise RequestFailed(reply.error.code, reply.error.message, retry_after_s=reply.error.retry_after_s)
        return reply

    @asynccontextmanager
    async def streaming(self, request: PromptRequest, *, timeout: float) -> AsyncIterator[Stream]:
        """Send ``request`` with ``stream`` on, and read its tokens as they come.

        Leaving the block before the reply came (an error, a cancel, a client gone away)
        cancels the request at the hub, which stops the node generating it."""
        request_id, future = await self._send(request.model_copy(update={"stream": True}), stream=True)
        stream = self._streams[request_id]
        give_up = asyncio.get_running_loop().call_later(timeout, self._time_out, future, timeout)
        try:
            yield stream
        finally:
            give_up.cancel()
            self._streams.pop(request_id, None)
            if not future.done():
                future.cancel()
                try:
                    await asyncio.shield(self.cancel(request_id, "the client stopped reading the stream"))
                except ConnectionLost:
                    pass  # the hub times the request out on its own

    @staticmethod
    def _time_out(future: asyncio.Future[Answer | ErrorReply], timeout: float) -> None:
        if not future.done():
            future.set_exception(_local_timeout(timeout))

    async def cancel(self, request_id: str, reason: str = "cancelled by the client") -> None:
        """Ask the hub to stop a request of ours; its reply is a ``cancelled`` error."""
        message = CancelRequest(id=request_id, reason=reason[:256])
        await self._conn.publish(self._cancel_topic, message.encode(), qos=1)

    async def _wait(self, future: asyncio.Future[Answer | ErrorReply], timeout: float) -> Answer | ErrorReply:
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as exc:
            raise _local_timeout(timeout) from exc


def _scope_of(url: BrokerURL) -> str:
    """Our login's name is our scope; a broker without logins (or a name that cannot be a topic
    level) leaves us the shared one."""
    if not url.username:
        return SHARED_SCOPE
    try:
        return check_id(url.username, what="login")
    except ConfigError:
        return SHARED_SCOPE


def _local_timeout(timeout: float) -> RequestFailed:
    return RequestFailed(ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout:.0f} s (is the hub running?)")
