"""The HTTP gateway's settings: one frozen object built by the CLI, and the checks on its values.

Apart from ``config.py``'s ``HubConfig`` because the gateway is a service of its own (``swarm-hub
gateway`` runs it without a hub), and its settings bring uvicorn in (``http_timeouts.py``), which
a program that only runs a hub has no need to load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.topics import DEFAULT_SWARM, check_id

from .http_timeouts import HttpTimeouts
from .model_names import ModelNames

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    #: the bearer token clients send (``SwarmHome.gateway_token()``)
    token: str
    host: str = DEFAULT_HTTP_HOST
    #: 0 picks a free port (see ``Gateway.port`` once ready)
    port: int = DEFAULT_HTTP_PORT
    swarm: str = DEFAULT_SWARM
    #: how long the gateway waits for a reply when the request gives no ``timeout_s``
    request_timeout_s: float = 300.0
    #: larger bodies get 413 (the hub's own limit, for MQTT payloads, is 256 KiB)
    max_body_bytes: int = 1024 * 1024
    #: how long a request waits for the gateway's broker connection when it is down
    connect_wait_s: float = 5.0
    #: on shutdown, how long open responses (streams) may finish before they are cut
    shutdown_grace_s: int = 5
    #: HTTPS with this certificate and key (the broker's, from ``broker/server/tls.py``); None: plain HTTP
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: how long a client may take to send a request's headers, and its body (``http_timeouts.py``)
    timeouts: HttpTimeouts = HttpTimeouts()
    #: model aliases, and whether unknown names fall back to a swarm's only model (``model_names.py``)
    models: ModelNames = ModelNames()
    #: web pages on these origins may call the API from a browser (CORS); none by default. ``*``
    #: allows any page: fine for a token-protected API, since browsers never send the token on their own
    cors_origins: tuple[str, ...] = ()
    #: a header that may carry the token, bare, for clients that cannot set Authorization
    #: (``X-Api-Key``); None: Authorization only
    api_key_header: str | None = None
    #: requests with no token at all are served (for a trusted LAN only); a wrong token is still refused
    allow_anonymous: bool = False
    #: ``/metrics`` is served without the token, for scrapers on a trusted network (it shows node
    #: ids, models, load and counts, never a prompt or an answer); by default it takes the token
    metrics_public: bool = False

    def __post_init__(self) -> None:
        check_id(self.swarm, what="swarm id")
        if len(self.token) < 16:
            raise ConfigError("the gateway token is too short (16 characters at least)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"HTTP port {self.port} is out of range")
        if self.request_timeout_s <= 0 or self.max_body_bytes < 1024:
            raise ConfigError("request_timeout_s must be positive and max_body_bytes at least 1024")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("HTTPS needs both a certificate and its key")
        for origin in self.cors_origins:
            check_origin(origin)
        if self.api_key_header is not None:
            check_header_name(self.api_key_header)


def check_header_name(text: str) -> str:
    """An HTTP header name (a token, RFC 9110) other than Authorization, which always works."""
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", text) or text.lower() == "authorization":
        raise ConfigError(f"an API key header is a header name like X-Api-Key (not Authorization), not {text!r}")
    return text


def check_origin(text: str) -> str:
    """A CORS origin as browsers send it (``https://app.example:8443``, no path), or ``*``."""
    if text != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+", text):
        raise ConfigError(f"a CORS origin is scheme://host[:port] (like http://localhost:3000) or *, not {text!r}")
    return text


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT`` as (host, port); the host defaults to loopback."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # a bare IPv6 address needs brackets: [::1]:8080
        sep = "?"
    if (
        not port.isdigit()
        or not 0 <= int(port) <= 65535
        or sep not in ("", ":")
        or (sep and not host and text[0] != ":")
    ):
        raise ConfigError(f"--http {text!r}: expected HOST:PORT, like 127.0.0.1:8080 or 0.0.0.0:8080")
    return host or DEFAULT_HTTP_HOST, int(port)


def browser_host(host: str) -> str:
    """The address to put in a URL for a browser on this machine."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
