"""Deadlines for reading an HTTP request: its headers, then its body.

uvicorn's h11 protocol has a keep-alive timeout (the idle gap *between* requests) and nothing
else: a client that opens a connection and sends one header line every few seconds holds the
connection, and a file descriptor, for as long as it likes. Four hundred such clients kept the
gateway's descriptors forever (issue: slow headers). uvicorn has no option for it, so
:class:`TimedH11Protocol` adds two timers to its protocol class:

* **headers**: from the first byte of a request (or from the connection opening, for the
  first one) until its headers are complete;
* **body**: from the end of the headers until the end of the body, the body as a whole, so
  that a byte every few seconds does not keep it alive either.

Either one firing closes the connection (no response: the request was never read whole, and
a client this slow is not waiting for one). A request whose body has arrived is not limited
here: answering can take minutes, and the gateway bounds that itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nova_swarm.broker.contract.errors import ConfigError

log = structlog.get_logger("nova_swarm.gateway")


@dataclass(frozen=True, slots=True)
class HttpTimeouts:
    #: the request line and headers must all arrive within this long
    headers_s: float = 10.0
    #: the whole body must arrive within this long after the headers (1 MiB at 200 kbit/s)
    body_s: float = 60.0
    #: an idle connection between requests is closed after this long (uvicorn's keep-alive)
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if not getattr(self, name) > 0:
                raise ConfigError(f"HTTP timeout {name} must be positive")


class TimedConfig(uvicorn.Config):
    """uvicorn's config, carrying our timeouts to :class:`TimedH11Protocol` (which uvicorn
    builds with nothing but the config)."""

    def __init__(self, app: Any, *, timeouts: HttpTimeouts, **kwargs: Any) -> None:
        super().__init__(app, http=TimedH11Protocol, **kwargs)
        self.timeouts = timeouts
        # Typed as whole seconds, but only ever handed to loop.call_later.
        self.timeout_keep_alive = timeouts.keep_alive_s  # type: ignore[assignment]


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a body deadline per request."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if not isinstance(config, TimedConfig):  # a real check: asserts vanish under python -O
            raise ConfigError(f"TimedH11Protocol is configured through TimedConfig, not {type(config).__name__}")
        self._timeouts = config.timeouts
        self._deadline: asyncio.TimerHandle | None = None
        #: what the running deadline waits for: "headers", "body", or None
        self._awaiting: str | None = None

    # uvicorn's own signature narrows asyncio's (BaseTransport) to Transport; ours must match it
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        if self._awaiting is None and self.conn.their_state is h11.IDLE:
            self._arm("headers")  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a pipelined request may have been read from the buffer just now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with h11's view of what the client still has to send."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._awaiting != "body":
                self._arm("body")
        elif state is not h11.IDLE or self._awaiting != "headers":
            # The request is read (DONE), or the connection is ending: nothing left to wait for.
            self._disarm()

    def _arm(self, what: str) -> None:
        self._disarm()
        seconds = self._timeouts.headers_s if what == "headers" else self._timeouts.body_s
        self._awaiting = what
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._awaiting = None

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline = None
        self._awaiting = None
        if not self.transport.is_closing():
            log.debug("closing a slow HTTP connection", waited_for=what, after_s=seconds, peer=self.client)
            self.transport.close()
