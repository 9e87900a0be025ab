"""The OpenAI-compatible HTTP gateway: any OpenAI client, and the chat page, talk to the swarm.

    async with Gateway(GatewayConfig(token=home.gateway_token()), home.client_url(GATEWAY_LOGIN)) as gateway:
        print(gateway.chat_url)        # http://127.0.0.1:8080/#token=...
        ...                            # serving until the block ends

or ``await gateway.run()`` in the caller's task group until ``gateway.stop()``.

The gateway is one more MQTT client of the swarm (a ``SwarmClient`` with its own client login,
``gateway``, made at setup, so its requests and replies are a scope of their own; following the
hub's status and node table), so every request takes the same path as one from ``mosquitto_pub``:
the hub validates, schedules, retries and journals it. ``openai_api.py`` translates the shapes;
``relay.py`` streams answers in each API's events; this module does the HTTP (Starlette on
uvicorn), authentication and the connection to the broker, which it keeps up across broker
restarts, and mounts the route groups of other APIs (``ollama_routes.py``).

    GET  /                      the chat page (hub/static/index.html)      no auth
    GET  /health                {"status", "hub", "nodes_online", "max_tokens_limit"}   no auth
    GET  /healthz               200 while the broker link is up and the hub online, else 503   no auth
    GET  /metrics               Prometheus text format (``prometheus.py``)   token unless metrics_public
    GET  /v1/models[/{id}]      models of the nodes online or paused: context length, capabilities
    POST /v1/chat/completions   chat, streamed (SSE) or not; JSON schema; tool calls
    POST /v1/embeddings         one vector per input text
    POST /v1/completions        OpenAI's legacy text completions (``completions_api.py``), streamed or not
    POST /v1/responses          OpenAI's Responses API, stateless (``responses_api.py``), streamed or not
    POST /v1/messages           Anthropic's Messages API (``anthropic_api.py``): streamed events, tools;
                                its ``x-api-key`` header carries the token too; errors in its shape
    GET  /v1/swarm/nodes        the hub's node table, as on the wire
    POST /api/chat, /api/generate           Ollama's API (``ollama_routes.py``): NDJSON streams unless
    POST /api/embed, /api/embeddings        ``"stream": false``; errors as ``{"error": ...}``
    GET  /api/tags, /api/ps, /api/version   (/api/version needs no auth, as Ollama's clients probe it)
    POST /api/show
    GET  /join/{name}           a node's installer and wheel (``join.py``)   the node's download key

With ``tls_cert`` set (``swarm-hub up --tls``) it serves HTTPS with the broker's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import re
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import Answer, PromptRequest
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.link.base import Links
from nova_swarm.broker.link.connection import links_for
from nova_swarm.broker.link.reconnect import reconnecting
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.service import Service

from . import anthropic_api, api_errors, completions_api, openai_api, responses_api
from .api_errors import ApiError
from .client import SwarmClient
from .gateway_config import GatewayConfig, browser_host
from .http_server import listen, read_json, server
from .join import JoinRefused, JoinService
from .leniency import IGNORED_HEADER, ignored_header
from .ollama_routes import OllamaRoutes
from .openai_api import ChatChunks
from .prometheus import MetricsBoard, SwarmCollector, SwarmView
from .relay import SSE, ClientGone, Events, EventsFor, OpenAIEvents, stream_answer, unless_gone

log = structlog.get_logger("nova_swarm.gateway")


class Gateway(Service):
    def __init__(
        self,
        config: GatewayConfig,
        url: BrokerURL | None = None,
        *,
        links: Links | None = None,
        ca_file: Path | None = None,
        join: JoinService | None = None,
    ) -> None:
        """The broker is ``url`` (MQTT, ``ca_file`` for TLS) or ``links`` (a memory broker's in a test)."""
        self.config = config
        self._links = links_for(url, links, ca_file=ca_file)
        #: what /join/ serves; None: no such routes (404)
        self._join = join
        self._client: SwarmClient | None = None
        self._link_up = asyncio.Event()
        self._socket: socket.socket | None = None
        self._started = int(time.time())
        #: Ollama's API under /api/
        self._ollama = OllamaRoutes(self, models=config.models, started=self._started)
        #: the hub's metrics as they come over MQTT, and /metrics' registry reading them at scrape time
        self._board = MetricsBoard(Topics(config.swarm))
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SwarmCollector(self._swarm_view))
        #: set once the HTTP server accepts connections (``port`` is then the real one)
        self.ready = asyncio.Event()
        self.port = config.port
        self._server = server(self.app(), config, started=self.ready.set)

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{browser_host(self.config.host)}:{self.port}"

    @property
    def chat_url(self) -> str:
        """The chat page, with the token in the fragment (which browsers never send to a server)."""
        return f"{self.base_url}/#token={self.config.token}"

    def bind(self) -> None:
        """Take the listening socket now, so a port in use is a clear error before anything starts."""
        if self._socket is not None:
            return
        self._socket = listen(self.config.host, self.config.port)
        self.port = self._socket.getsockname()[1]

    async def run(self) -> None:
        """Serve until :meth:`stop`; the broker connection is kept up (reconnecting) meanwhile."""
        self.bind()
        assert self._socket is not None
        try:
            async with asyncio.TaskGroup() as tg:
                link = tg.create_task(self._keep_linked())
                serving = tg.create_task(self._server.serve(sockets=[self._socket]))
                started = tg.create_task(self.ready.wait())
                await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
                if self.ready.is_set():
                    log.info("gateway listening", url=self.base_url)
                    if self.config.allow_anonymous:
                        log.warning(
                            "ANYONE WHO CAN REACH THE GATEWAY MAY USE THE SWARM WITHOUT A TOKEN (--allow-anonymous)",
                            url=self.base_url,
                        )
                await serving
                started.cancel()
                link.cancel()
        finally:
            self._socket.close()
            self._socket = None
            log.info("gateway stopped")

    def stop(self) -> None:
        self._server.should_exit = True

    async def __aenter__(self) -> Gateway:
        self.bind()  # the port is ours before anything starts: ``port`` is then the real one
        return await super().__aenter__()

    async def started(self, running: asyncio.Task[None]) -> None:
        """The block begins once the gateway listens (or its ``run()`` failed)."""
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()

    async def _keep_linked(self) -> None:
        def connect() -> SwarmClient:
            return SwarmClient(links=self._links, swarm=self.config.swarm, watch=True, metrics=self._board.feed)

        await reconnecting(connect, self._linked, name="gateway")

    async def _linked(self, client: SwarmClient) -> None:
        """One connection's life: requests use ``client`` until the broker drops it."""
        self._client = client
        self._link_up.set()
        log.info("gateway connected to the broker", broker=self._links.url.redacted())
        try:
            await client.wait_closed()
        finally:
            self._client = None
            self._link_up.clear()

    async def swarm(self) -> SwarmClient:
        """The broker connection, waiting ``connect_wait_s`` for it while it is down (then a 503)."""
        if self._client is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.connect_wait_s):
                    await self._link_up.wait()
        if self._client is None:
            raise ApiError(503, "the gateway cannot reach the swarm's broker right now", code="broker_unreachable")
        return self._client

    # ---------------------------------------------------------------- HTTP

    def app(self) -> Starlette:
        middleware = []
        if self.config.cors_origins:
            # Answers preflight requests (OPTIONS) for the origins given; headers are allowed
            # whatever their name, since each API authenticates in its own header.
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.config.cors_origins),
                    allow_methods=["GET", "POST"],
                    allow_headers=["*"],
                    expose_headers=[IGNORED_HEADER, "Retry-After"],
                    max_age=600,
                )
            )
        return Starlette(
            middleware=middleware,
            routes=[
                Route("/", self._index, methods=["GET"]),
                Route("/static/{name}", self._static, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route(
                    "/metrics",
                    self._metrics if self.config.metrics_public else self.guarded(self._metrics),
                    methods=["GET"],
                ),
                Route("/v1/models", self.guarded(self._models), methods=["GET"]),
                Route("/v1/models/{model:path}", self.guarded(self._model), methods=["GET"]),
                Route("/v1/chat/completions", self.guarded(self._chat), methods=["POST"]),
                Route("/v1/embeddings", self.guarded(self._embeddings), methods=["POST"]),
                Route("/v1/completions", self.guarded(self._completions), methods=["POST"]),
                Route("/v1/messages", self._anthropic(self._messages), methods=["POST"]),
                Route("/v1/responses", self.guarded(self._responses), methods=["POST"]),
                Route("/v1/swarm/nodes", self.guarded(self._nodes), methods=["GET"]),
                Route("/join/{name}", self._join_file, methods=["GET"]),
                *self._ollama.routes(),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    def guarded(
        self,
        endpoint: Callable[[Request], Awaitable[Response]],
        *,
        shape: Callable[[ApiError], Response] | None = None,
        key_header: str | None = None,
    ) -> Callable[[Request], Awaitable[Response]]:
        """Bearer authentication, and every refusal in OpenAI's error shape (or ``shape``'s)."""
        render = shape or _error

        async def guarded(request: Request) -> Response:
            try:
                self._authenticate(request, key_header=key_header)
                return await endpoint(request)
            except ApiError as exc:
                return render(exc)
            except RequestFailed as exc:
                return render(api_errors.error_from(exc))
            except ConnectionLost:
                return render(
                    ApiError(503, "the gateway lost the swarm's broker; try again", code="broker_unreachable")
                )
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except Exception:
                log.exception("gateway error", path=request.url.path)
                return render(ApiError(500, "the gateway hit an internal error", code=ErrorCode.INTERNAL_ERROR.value))

        return guarded

    def _authenticate(self, request: Request, *, key_header: str | None = None) -> None:
        """The token, from Authorization: Bearer, the configured header, or the API's own (``key_header``)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            names = [name for name in (key_header, self.config.api_key_header) if name]
            token = next((request.headers[n] for n in names if request.headers.get(n, "").strip()), "")
            if not token.strip():
                if self.config.allow_anonymous:
                    return
                extra = "".join(f" or '{name}: <token>'" for name in names)
                raise api_errors.unauthorized(
                    f"no API key: send 'Authorization: Bearer <token>'{extra} (`swarm-hub token`)"
                )
        if not secrets.compare_digest(token.strip().encode(), self.config.token.encode()):
            raise api_errors.unauthorized("incorrect API key (`swarm-hub token` prints the right one)")

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(
            ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        )

    async def body(self, request: Request) -> Any:
        """The request's JSON body, at most ``max_body_bytes`` (else a 413)."""
        return await read_json(request, limit=self.config.max_body_bytes)

    async def _index(self, request: Request) -> Response:
        return self._static_file("index.html")

    async def _static(self, request: Request) -> Response:
        return self._static_file(request.path_params["name"])

    def _static_file(self, name: str) -> Response:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}", name):
            return _error(ApiError(404, "no such file", code="not_found"))
        try:
            content = (resources.files("nova_swarm.hub") / "static" / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return _error(ApiError(404, f"no such file: {name}", code="not_found"))
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        # The page holds no secret (its token comes in the URL fragment); no caching keeps it fresh.
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})

    async def _join_file(self, request: Request) -> Response:
        """The installers and wheel, for a node's download key only (never anonymous)."""
        join = self._join
        name = request.path_params["name"]
        if join is None or name not in (*join.installers, join.wheel_name):
            return PlainTextResponse(f"no such file: /join/{name}\n", status_code=404)
        try:
            node_id = join.authorize(request.headers.get("authorization", ""))
        except JoinRefused as exc:
            return PlainTextResponse(f"{exc}\n", status_code=exc.status)
        log.info("join download", node_id=node_id, file=name)
        if name == join.wheel_name:
            try:
                wheel = await asyncio.to_thread(join.wheel)
            except ConfigError as exc:
                return PlainTextResponse(f"{exc}\n", status_code=503)
            return Response(wheel, media_type="application/zip", headers={"Cache-Control": "no-store"})
        if name == "install.sh":
            key = request.headers["authorization"].partition(" ")[2].strip()
            try:
                # The address the device reached us by is the one it can fetch the rest from.
                text = join.bootstrap(str(request.base_url).rstrip("/"), key)
            except ValueError as exc:
                return PlainTextResponse(f"{exc}\n", status_code=400)
        else:
            text = join.installer(name)
        return PlainTextResponse(text, media_type="text/x-shellscript", headers={"Cache-Control": "no-store"})

    async def _health(self, request: Request) -> Response:
        client = self._client
        return JSONResponse(openai_api.health(client.hub if client else None, client.fleet if client else None))

    async def _healthz(self, request: Request) -> Response:
        """Liveness and readiness for probes: 200 while the broker link is up and the hub online."""
        client = self._client
        linked = client is not None
        hub = client.hub.state if client is not None and client.hub is not None else "unknown"
        ready = linked and hub == "online"
        body = {"status": "ok" if ready else "unavailable", "broker": "up" if linked else "down", "hub": hub}
        return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: Request) -> Response:
        """The Prometheus text format, built from the swarm's state at this moment (``prometheus.py``)."""
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

    def _swarm_view(self) -> SwarmView:
        client = self._client
        return SwarmView(
            linked=client is not None,
            hub=client.hub if client is not None else None,
            fleet=client.fleet if client is not None else None,
            board=self._board,
        )

    async def _models(self, request: Request) -> Response:
        client = await self.swarm()
        limit = client.hub.max_tokens if client.hub else None
        return JSONResponse(openai_api.models(client.fleet, created=self._started, max_tokens_limit=limit))

    async def _model(self, request: Request) -> Response:
        client = await self.swarm()
        limit = client.hub.max_tokens if client.hub else None
        card = openai_api.model(
            client.fleet,
            request.path_params["model"],
            created=self._started,
            names=self.config.models,
            max_tokens_limit=limit,
        )
        return JSONResponse(card)

    async def _nodes(self, request: Request) -> Response:
        client = await self.swarm()
        return JSONResponse(openai_api.nodes(client.fleet))

    async def _embeddings(self, request: Request) -> Response:
        body = await self.body(request)
        client = await self.swarm()
        call = openai_api.embed_request(
            body, known_models=openai_api.known_models(client.fleet), names=self.config.models
        )
        answer = await self.ask(request, client, call.request)
        return JSONResponse(
            openai_api.embeddings(answer, encoding_format=call.encoding_format), headers=ignored_header(call.ignored)
        )

    async def _chat(self, request: Request) -> Response:
        body = await self.body(request)
        client = await self.swarm()
        known = openai_api.known_models(client.fleet)
        call = openai_api.chat_request(body, known_models=known, names=self.config.models)
        if call.request.stream:
            return await self._chat_stream(request, client, call)
        answer = await self.ask(request, client, call.request)
        return JSONResponse(
            openai_api.chat_completion(answer, created=int(time.time())), headers=ignored_header(call.ignored)
        )

    def _wait_s(self, prompt: PromptRequest) -> float:
        # The hub answers deadline_exceeded at the request's deadline; our own limit is a backstop.
        return (prompt.timeout_s or self.config.request_timeout_s) + 5.0

    async def ask(self, request: Request, client: SwarmClient, prompt: PromptRequest) -> Answer:
        """``prompt``'s answer, under a request id of its own; cancelled if the client goes away."""
        prompt = prompt.model_copy(update={"id": uuid.uuid4().hex})
        assert prompt.id is not None
        try:
            return await unless_gone(request, client.ask(prompt, timeout=self._wait_s(prompt)))
        except ClientGone:
            log.info("client went away; cancelling its request", request_id=prompt.id)
            with contextlib.suppress(ConnectionLost):
                await client.cancel(prompt.id, "the HTTP client disconnected")
            raise

    async def relay(
        self,
        request: Request,
        client: SwarmClient,
        prompt: PromptRequest,
        events: EventsFor,
        *,
        headers: dict[str, str],
        media_type: str = SSE,
    ) -> Response:
        """A streamed answer to ``prompt`` under a request id of its own (``relay.py``)."""
        prompt = prompt.model_copy(update={"id": uuid.uuid4().hex})
        timeout = self._wait_s(prompt)
        return await stream_answer(
            request, client, prompt, events, timeout=timeout, headers=headers, media_type=media_type
        )

    async def _chat_stream(self, request: Request, client: SwarmClient, call: openai_api.ChatCall) -> Response:
        def events(request_id: str, requested: str | None, served: str | None) -> Events:
            model = requested or served or "unknown"
            chunks = ChatChunks(request_id, model=model, created=int(time.time()), include_usage=call.include_usage)
            return OpenAIEvents(chunks)

        return await self.relay(request, client, call.request, events, headers=ignored_header(call.ignored))

    # ---------------------------------------------------------------- Anthropic's API, text completions

    def _anthropic(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """The same authentication, plus Anthropic's own ``x-api-key``; refusals in Anthropic's shape."""
        return self.guarded(endpoint, shape=_anthropic_error, key_header="x-api-key")

    async def _messages(self, request: Request) -> Response:
        body = await self.body(request)
        client = await self.swarm()
        known = openai_api.known_models(client.fleet)
        call = anthropic_api.messages_request(body, known_models=known, names=self.config.models)
        headers = ignored_header(call.ignored)
        if not call.request.stream:
            answer = await self.ask(request, client, call.request)
            return JSONResponse(anthropic_api.message(answer), headers=headers)

        def events(request_id: str, requested: str | None, served: str | None) -> Events:
            return anthropic_api.MessageEvents(request_id, model=requested or served or "unknown")

        return await self.relay(request, client, call.request, events, headers=headers)

    async def _completions(self, request: Request) -> Response:
        body = await self.body(request)
        client = await self.swarm()
        known = openai_api.known_models(client.fleet)
        call = completions_api.completion_request(body, known_models=known, names=self.config.models)
        headers = ignored_header(call.ignored)
        if not call.request.stream:
            answer = await self.ask(request, client, call.request)
            return JSONResponse(
                completions_api.completion(answer, created=int(time.time()), echo=call.echo), headers=headers
            )

        def events(request_id: str, requested: str | None, served: str | None) -> Events:
            model = requested or served or "unknown"
            chunks = completions_api.CompletionChunks(
                request_id, model=model, created=int(time.time()), include_usage=call.include_usage, echo=call.echo
            )
            return OpenAIEvents(chunks)

        return await self.relay(request, client, call.request, events, headers=headers)

    async def _responses(self, request: Request) -> Response:
        body = await self.body(request)
        client = await self.swarm()
        known = openai_api.known_models(client.fleet)
        call = responses_api.responses_request(body, known_models=known, names=self.config.models)
        headers = ignored_header(call.ignored)
        if not call.request.stream:
            answer = await self.ask(request, client, call.request)
            return JSONResponse(responses_api.response(answer, created=int(time.time())), headers=headers)

        def events(request_id: str, requested: str | None, served: str | None) -> Events:
            model = requested or served or "unknown"
            return responses_api.ResponseEvents(request_id, model=model, created=int(time.time()))

        return await self.relay(request, client, call.request, events, headers=headers)


def _error(exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _anthropic_error(exc: ApiError) -> Response:
    return JSONResponse(anthropic_api.error_body(exc), status_code=exc.status, headers=exc.headers())
