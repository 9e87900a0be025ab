"""Asking the swarm from Python: what ``swarm-hub ask`` uses.

    async with SwarmClient(url) as client:
        answer = await client.ask(PromptRequest(prompt="What is 2+2?"), timeout=60)

Each client listens on its own reply topic and matches replies to requests by id, so many
requests can be in flight at once.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import TracebackType

from nova_swarm.broker.connection import Connection
from nova_swarm.broker.errors import ErrorCode, ProtocolError, RequestFailed
from nova_swarm.broker.messages import Answer, ErrorReply, PromptRequest, decode_reply
from nova_swarm.broker.topics import Topics
from nova_swarm.broker.url import BrokerURL


class SwarmClient:
    def __init__(self, url: BrokerURL, *, swarm: str = "main", ca_file: Path | None = None) -> None:
        self.topics = Topics(swarm)
        self.name = f"c-{uuid.uuid4().hex[:12]}"
        self.reply_topic = self.topics.reply(self.name)
        self._conn = Connection(url, client_id=self.name, ca_file=ca_file)
        self._waiting: dict[str, asyncio.Future[Answer | ErrorReply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SwarmClient:
        await self._conn.__aenter__()
        await self._conn.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        await self._conn.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        try:
            async for message in self._conn.messages():
                try:
                    reply = decode_reply(message.payload)
                except ProtocolError:
                    continue
                future = self._waiting.get(reply.id or "")
                if future is not None and not future.done():
                    future.set_result(reply)
        except Exception as exc:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(exc)
            raise

    async def send(self, request: PromptRequest) -> asyncio.Future[Answer | ErrorReply]:
        """Publish a request (an id and our reply topic are filled in); await the future for its reply."""
        request = request.model_copy(update={"id": request.id or uuid.uuid4().hex, "reply_to": self.reply_topic})
        future: asyncio.Future[Answer | ErrorReply] = asyncio.get_running_loop().create_future()
        assert request.id is not None
        self._waiting[request.id] = future
        request_id = request.id

        def forget(_: asyncio.Future[Answer | ErrorReply]) -> None:
            self._waiting.pop(request_id, None)

        future.add_done_callback(forget)
        await self._conn.publish(self.topics.prompt(), request.encode(), qos=1)
        return future

    async def ask(self, request: PromptRequest, *, timeout: float) -> Answer:
        """The answer, or RequestFailed with the hub's error code (or a local timeout)."""
        future = await self.send(request)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise RequestFailed(
                ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout:.0f} s (is the hub running?)"
            ) from exc
        if isinstance(reply, ErrorReply):
            raise RequestFailed(reply.error.code, reply.error.message, retry_after_s=reply.error.retry_after_s)
        return reply
