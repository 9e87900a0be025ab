"""Ollama's API as a group of routes the gateway mounts under ``/api/``.

    Starlette(routes=[..., *OllamaRoutes(gateway, models=config.models, started=t).routes()])

``ollama_api.py`` translates the shapes (no I/O); this module is the endpoints: each reads its
body and the swarm through the gateway (:class:`Mount`), asks or streams, and answers in
Ollama's shape, errors as ``{"error": ...}``. Streams are NDJSON unless ``"stream": false``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nova_swarm.broker.contract.messages import Answer, PromptRequest

from . import ollama_api, openai_api
from .api_errors import ApiError
from .client import SwarmClient
from .leniency import ignored_header
from .model_names import ModelNames
from .relay import NDJSON, SSE, Events, EventsFor, OllamaEvents

Endpoint = Callable[[Request], Awaitable[Response]]

#: the Ollama routes served (any other method on them is a 405)
SERVED = frozenset(
    f"/api/{name}" for name in ("chat", "generate", "embed", "embeddings", "tags", "ps", "show", "version")
)


class Mount(Protocol):
    """What the routes use of the gateway that mounts them (``gateway.Gateway``)."""

    def guarded(
        self, endpoint: Endpoint, *, shape: Callable[[ApiError], Response] | None = None, key_header: str | None = None
    ) -> Endpoint: ...
    async def body(self, request: Request) -> Any: ...
    async def swarm(self) -> SwarmClient: ...
    async def ask(self, request: Request, client: SwarmClient, prompt: PromptRequest) -> Answer: ...
    async def relay(
        self,
        request: Request,
        client: SwarmClient,
        prompt: PromptRequest,
        events: EventsFor,
        *,
        headers: dict[str, str],
        media_type: str = SSE,
    ) -> Response: ...


def error(exc: ApiError) -> Response:
    """A refusal in Ollama's shape."""
    return JSONResponse(ollama_api.error_body(exc), status_code=exc.status, headers=exc.headers())


class OllamaRoutes:
    def __init__(self, gateway: Mount, *, models: ModelNames, started: int) -> None:
        """``models``: the gateway's model names; ``started``: when it started (the models' date)."""
        self._gateway = gateway
        self._models = models
        self._started = started

    def routes(self) -> list[Route]:
        """The routes, the catch-all last; the same authentication and refusals as the OpenAI
        routes, in Ollama's error shape."""

        def guarded(endpoint: Endpoint) -> Endpoint:
            return self._gateway.guarded(endpoint, shape=error)

        return [
            Route("/api/chat", guarded(self._chat), methods=["POST"]),
            Route("/api/generate", guarded(self._generate), methods=["POST"]),
            Route("/api/embed", guarded(self._embed), methods=["POST"]),
            Route("/api/embeddings", guarded(self._embeddings), methods=["POST"]),
            Route("/api/tags", guarded(self._tags), methods=["GET"]),
            Route("/api/ps", guarded(self._ps), methods=["GET"]),
            Route("/api/show", guarded(self._show), methods=["POST"]),
            Route("/api/version", self._version, methods=["GET"]),  # no auth: Ollama's clients probe it
            # pull, push, create, copy, delete...: the owner pins models (swarm-hub pin), not clients
            Route("/api/{rest:path}", self._unknown, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        ]

    def _names(self, client: SwarmClient) -> tuple[set[str] | None, ModelNames]:
        return openai_api.known_models(client.fleet), self._models

    async def _unknown(self, request: Request) -> Response:
        path = request.url.path
        if path in SERVED:
            return error(ApiError(405, f"{request.method} is not allowed on {path}", code="method_not_allowed"))
        message = f"{path} is not served by this swarm: its owner chooses the models (swarm-hub pin)"
        return error(ApiError(404, message, code="not_found"))

    async def _version(self, request: Request) -> Response:
        return JSONResponse(ollama_api.version())

    async def _tags(self, request: Request) -> Response:
        client = await self._gateway.swarm()
        limit = client.hub.max_tokens if client.hub else None
        return JSONResponse(ollama_api.tags(client.fleet, started=self._started, max_tokens_limit=limit))

    async def _ps(self, request: Request) -> Response:
        client = await self._gateway.swarm()
        limit = client.hub.max_tokens if client.hub else None
        return JSONResponse(ollama_api.running(client.fleet, max_tokens_limit=limit))

    async def _show(self, request: Request) -> Response:
        body = await self._gateway.body(request)
        client = await self._gateway.swarm()
        limit = client.hub.max_tokens if client.hub else None
        card = ollama_api.show(body, client.fleet, started=self._started, names=self._models, limit=limit)
        return JSONResponse(card)

    async def _chat(self, request: Request) -> Response:
        body = await self._gateway.body(request)
        client = await self._gateway.swarm()
        served, names = self._names(client)
        call = ollama_api.chat_request(body, served=served, names=names)
        return await self._answer(request, client, "chat", call)

    async def _generate(self, request: Request) -> Response:
        body = await self._gateway.body(request)
        client = await self._gateway.swarm()
        served, names = self._names(client)
        call = ollama_api.generate_request(body, served=served, names=names)
        return await self._answer(request, client, "generate", call)

    async def _embed(self, request: Request) -> Response:
        return await self._embedding(request, legacy=False)

    async def _embeddings(self, request: Request) -> Response:
        return await self._embedding(request, legacy=True)

    async def _embedding(self, request: Request, *, legacy: bool) -> Response:
        body = await self._gateway.body(request)
        client = await self._gateway.swarm()
        served, names = self._names(client)
        call = ollama_api.embed_request(body, served=served, names=names, legacy=legacy)
        assert call.request is not None
        answer = await self._gateway.ask(request, client, call.request)
        if legacy:
            return JSONResponse(ollama_api.embeddings_response(answer), headers=ignored_header(call.ignored))
        result = ollama_api.embed_response(answer, model=call.model)
        return JSONResponse(result, headers=ignored_header(call.ignored))

    async def _answer(
        self, request: Request, client: SwarmClient, kind: ollama_api.Kind, call: ollama_api.OllamaCall
    ) -> Response:
        created_at = ollama_api.timestamp()
        headers = ignored_header(call.ignored)
        if call.request is None:
            done = ollama_api.loaded(kind, call.model, created_at=created_at)
            if call.stream:
                return Response(ollama_api.ndjson(done), media_type=NDJSON, headers=headers)
            return JSONResponse(done, headers=headers)
        if not call.stream:
            answer = await self._gateway.ask(request, client, call.request)
            return JSONResponse(ollama_api.response(kind, answer, created_at=created_at), headers=headers)

        def events(request_id: str, requested: str | None, served: str | None) -> Events:
            # Ollama's clients show the model that answered, so the node's own name comes first.
            return OllamaEvents(ollama_api.Lines(kind, model=served or requested or call.model, created_at=created_at))

        return await self._gateway.relay(request, client, call.request, events, headers=headers, media_type=NDJSON)
