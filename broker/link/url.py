"""Broker URLs: ``mqtt://user:pass@host:port`` and ``mqtts://...`` for TLS.

One URL is all a hub, node or client needs, so the same code runs on the embedded amqtt broker,
Mosquitto or EMQX.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from nova_swarm.broker.contract.errors import ConfigError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    #: the CA certificate to trust for ``mqtts://`` (None: the system's trust store). It travels
    #: with the URL because "where the broker is" and "how to know it is really the broker" go together.
    ca_file: Path | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str, *, ca_file: Path | None = None) -> BrokerURL:
        parts = urlsplit(text)
        if parts.scheme not in DEFAULT_PORTS:
            raise ConfigError(f"broker URL {cls._redact(text)!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {cls._redact(text)!r} has no host")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"broker URL {cls._redact(text)!r} has a bad port") from exc
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {cls._redact(text)!r} must not have a path or query")
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "mqtts",
            ca_file=ca_file,
        )

    def with_login(self, username: str, password: str) -> BrokerURL:
        return replace(self, username=username, password=password)

    def __str__(self) -> str:
        return self._render(quote(self.password, safe="") if self.password else None)

    def redacted(self) -> str:
        """The URL with its password hidden: the only form that may reach a log."""
        return self._render("***" if self.password else None)

    def _render(self, password: str | None) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        login = ""
        if self.username:
            login = quote(self.username, safe="") + (f":{password}" if password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{login}{host}:{self.port}"

    @staticmethod
    def _redact(text: str) -> str:
        parts = urlsplit(text)
        if parts.password:
            return text.replace(parts.password, "***")
        return text
