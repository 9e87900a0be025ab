"""The gateway's HTTP server, apart from what it serves: uvicorn as the gateway runs it.

    sock = listen(config.host, config.port)     # a port in use is a clear error before anything starts
    await server(app, config, started=ready.set).serve(sockets=[sock])

uvicorn without its signal handlers (they belong to whoever owns the gateway), with the request
deadlines of ``http_timeouts.py``, HTTPS when the config has a certificate, and one structured
log line per request in place of uvicorn's access log. :func:`read_json` reads a request's body
within the gateway's limit. Nothing here knows of the swarm.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode

from . import api_errors
from .api_errors import ApiError
from .gateway_config import GatewayConfig
from .http_timeouts import TimedConfig

log = structlog.get_logger("nova_swarm.gateway")

#: how far past the limit an oversized body is still read, so its sender gets the 413
_DRAIN_FACTOR = 16


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or ConfigError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the HTTP gateway cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def server(app: ASGIApp, config: GatewayConfig, *, started: Callable[[], None]) -> uvicorn.Server:
    """uvicorn serving ``app`` as ``config`` says; ``started()`` once it accepts connections."""
    return _Server(
        TimedConfig(
            _AccessLog(app),
            timeouts=config.timeouts,
            lifespan="off",
            log_config=None,
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=config.shutdown_grace_s,
            ssl_certfile=str(config.tls_cert) if config.tls_cert else None,
            ssl_keyfile=str(config.tls_key) if config.tls_key else None,
        ),
        started=started,
    )


async def read_json(request: Request, *, limit: int) -> Any:
    """The request's body as JSON, at most ``limit`` bytes (else a 413), or a 400 if it is not JSON."""
    body = bytearray()
    seen = 0
    async for part in request.stream():
        seen += len(part)
        if seen <= limit:
            body += part
        elif seen > _DRAIN_FACTOR * limit:
            break  # past any honest mistake: stop reading, the connection is dropped
    # An oversized body is read to its end (and thrown away) before the 413: a server that
    # answers while the client is still sending resets the connection, and most clients
    # then report the reset instead of our answer.
    if seen > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="payload_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise api_errors.bad_request(f"the body is not valid JSON: {exc}", code=ErrorCode.BAD_JSON) from exc


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers: signals belong to whoever owns the gateway."""

    def __init__(self, config: uvicorn.Config, started: Callable[[], None]) -> None:
        super().__init__(config)
        self._started = started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._started()


class _AccessLog:
    """One structured log line per HTTP request (uvicorn's own access log is off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # polled by the chat page, probes and scrapers
            quiet = scope["path"] in ("/health", "/v1/swarm/nodes", "/healthz", "/metrics")
            (log.debug if quiet else log.info)(
                "http",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.monotonic() - started) * 1000, 1),
            )
