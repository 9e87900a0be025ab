"""An answer streamed to an HTTP client in some API's event format.

    return await stream_answer(request, client, prompt, events, timeout=wait_s, headers={})

The swarm's stream (``SwarmClient.streaming``: pieces, then the answer) becomes the body of a
streaming response, framed by an :class:`Events` writer for the client's API: OpenAI's
server-sent events (:class:`OpenAIEvents`, for chat and legacy completions), Ollama's NDJSON
lines (:class:`OllamaEvents`), Anthropic's and the Responses API's events (``anthropic_api.py``,
``responses_api.py``). The first piece is awaited before the response starts, so a refusal
keeps its real HTTP status; a failure later is the stream's last event, in the API's shape.

A client that disconnects cancels its request at the hub: before the response starts through
:func:`unless_gone` (:class:`ClientGone`), after through :class:`EventStream` closing the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

from nova_swarm.broker.contract.errors import ConnectionLost, RequestFailed
from nova_swarm.broker.contract.messages import Answer, PromptRequest, StreamChunk

from . import api_errors, completions_api, ollama_api, openai_api
from .api_errors import ApiError
from .client import SwarmClient
from .openai_api import ChatChunks

#: OpenAI's, Anthropic's and the Responses API's streams: server-sent events
SSE = "text/event-stream"
#: Ollama's streams: one JSON object per line
NDJSON = "application/x-ndjson"
T = TypeVar("T")


class Events(Protocol):
    """What :func:`stream_answer` writes a stream with: its framed events (SSE, or NDJSON lines)."""

    def opening(self) -> list[bytes]: ...
    def piece(self, chunk: StreamChunk) -> list[bytes]: ...
    def closing(self, answer: Answer) -> list[bytes]: ...
    def failure(self, exc: ApiError) -> list[bytes]: ...


class OpenAIEvents:
    """An OpenAI-style chunk writer (dicts) as framed events: ``data:`` lines, DONE at the end."""

    def __init__(self, chunks: ChatChunks | completions_api.CompletionChunks) -> None:
        self._chunks = chunks

    def opening(self) -> list[bytes]:
        return [openai_api.sse(c) for c in self._chunks.opening()]

    def piece(self, chunk: StreamChunk) -> list[bytes]:
        return [openai_api.sse(c) for c in self._chunks.piece(chunk)]

    def closing(self, answer: Answer) -> list[bytes]:
        return [*(openai_api.sse(c) for c in self._chunks.closing(answer)), openai_api.DONE]

    def failure(self, exc: ApiError) -> list[bytes]:
        return [openai_api.sse(exc.body())]


class OllamaEvents:
    """Ollama's lines (dicts) as NDJSON: no opening, and the error as a last line."""

    def __init__(self, lines: ollama_api.Lines) -> None:
        self._lines = lines

    def opening(self) -> list[bytes]:
        return []

    def piece(self, chunk: StreamChunk) -> list[bytes]:
        return [ollama_api.ndjson(line) for line in self._lines.piece(chunk)]

    def closing(self, answer: Answer) -> list[bytes]:
        return [ollama_api.ndjson(line) for line in self._lines.closing(answer)]

    def failure(self, exc: ApiError) -> list[bytes]:
        return [ollama_api.ndjson(ollama_api.error_body(exc))]


#: how a route makes its stream's writer: from the request id, the model the client asked for
#: and the model of the node that serves it (either may be None)
EventsFor = Callable[[str, str | None, str | None], Events]


async def stream_answer(
    request: Request,
    client: SwarmClient,
    prompt: PromptRequest,
    events: EventsFor,
    *,
    timeout: float,
    headers: dict[str, str],
    media_type: str = SSE,
) -> Response:
    """``prompt``'s answer streamed, written by ``events(request_id, requested model, serving node's
    model)``: server-sent events, or Ollama's NDJSON lines. ``prompt`` carries its request id;
    ``timeout`` bounds the wait for the whole answer."""
    assert prompt.id is not None
    stack = AsyncExitStack()
    stream = await stack.enter_async_context(client.streaming(prompt, timeout=timeout))
    chunks = stream.__aiter__()
    answer: Answer | None = None
    try:
        # The first piece before the 200, so that a refusal keeps its real HTTP status.
        first = await unless_gone(request, anext(chunks, None))
        if first is None:
            answer = await stream.answer()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    writer = events(prompt.id, prompt.model, _model_of(client, first.node_id if first else None))

    async def body() -> AsyncIterator[bytes]:
        try:
            for data in writer.opening():
                yield data
            if first is not None:
                for data in writer.piece(first):
                    yield data
                async for piece in chunks:
                    for data in writer.piece(piece):
                        yield data
            for data in writer.closing(answer or await stream.answer()):
                yield data
        except ApiError as exc:
            for data in writer.failure(exc):
                yield data
        except RequestFailed as exc:
            for data in writer.failure(api_errors.error_from(exc)):
                yield data
        except ConnectionLost:
            for data in writer.failure(ApiError(503, "the gateway lost the broker", code="broker_unreachable")):
                yield data
        finally:
            # Leaving the streaming block before the answer came cancels the request at the hub.
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    return EventStream(
        body(), media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
    )


class EventStream(StreamingResponse):
    """A streaming response that always closes its generator, however the response ended.

    A client that goes away cancels the response while its generator may sit at a ``yield``;
    closing it here runs its ``finally`` at once, which cancels the request at the hub."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            body = self.body_iterator
            if hasattr(body, "aclose"):
                with anyio.CancelScope(shield=True):
                    await body.aclose()


class ClientGone(Exception):
    """The HTTP client disconnected before its answer came."""


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientGone (and ``work`` cancelled) if the client disconnects first."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def run() -> T:
        return await work

    working = asyncio.ensure_future(run())
    watching = asyncio.ensure_future(gone())
    try:
        await asyncio.wait([working, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
    if working.cancelled():
        raise ClientGone
    return working.result()


def _model_of(client: SwarmClient, node_id: str | None) -> str | None:
    if node_id is None or client.fleet is None:
        return None
    return next((row.model for row in client.fleet.nodes if row.node_id == node_id), None)
