"""The user's config directory: generated credentials, the local swarm's address, the hub's DB.

Layout (all files 0600, the directory 0700)::

    ~/.config/nova-swarm/          ($NOVA_SWARM_HOME, else $XDG_CONFIG_HOME/nova-swarm)
        credentials.json           {"hub": {"username": ..., "password": ...}, "node": ..., "client": ...}
        passwd                     the same logins as $7$ hashes, for either broker
        local.json                 where `swarm-hub up` / `swarm-broker` listen, so `ask` needs no flags
        hub.sqlite                 the hub's registry and win rates
        mosquitto/                 generated Mosquitto config and ACL (Mosquitto mode)

Credentials are made on first use with a CSPRNG; there is no default password anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from .errors import ConfigError
from .passwords import write_password_file, write_private
from .topics import DEFAULT_SWARM, check_id
from .url import BrokerURL

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883


class Role(StrEnum):
    HUB = "hub"
    NODE = "node"
    CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Login:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class LocalSwarm:
    """Where the swarm on this machine listens."""

    swarm: str = DEFAULT_SWARM
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    engine: str = "amqtt"


@dataclass(frozen=True, slots=True)
class SwarmHome:
    path: Path

    @classmethod
    def default(cls) -> SwarmHome:
        if env := os.environ.get("NOVA_SWARM_HOME"):
            return cls(Path(env))
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return cls(Path(base) / "nova-swarm")

    @property
    def credentials_file(self) -> Path:
        return self.path / "credentials.json"

    @property
    def password_file(self) -> Path:
        return self.path / "passwd"

    @property
    def local_file(self) -> Path:
        return self.path / "local.json"

    @property
    def db_file(self) -> Path:
        return self.path / "hub.sqlite"

    @property
    def mosquitto_dir(self) -> Path:
        return self.path / "mosquitto"

    def ensure(self) -> dict[Role, Login]:
        """Load the logins, generating them (and the password file) on first run."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.credentials_file.exists():
            logins = {role: Login(role.value, secrets.token_urlsafe(24)) for role in Role}
            raw = {r.value: {"username": login.username, "password": login.password} for r, login in logins.items()}
            write_private(self.credentials_file, json.dumps(raw, indent=2))
        logins = self.logins()
        if not self.password_file.exists():
            write_password_file(self.password_file, {login.username: login.password for login in logins.values()})
        return logins

    def logins(self) -> dict[Role, Login]:
        try:
            raw = json.loads(self.credentials_file.read_text())
            return {Role(k): Login(v["username"], v["password"]) for k, v in raw.items()}
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no credentials in {self.path}: start the swarm once with `swarm-hub up` "
                "(or `swarm-broker`), or pass --broker mqtt://user:pass@host:port"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.credentials_file} is not a valid credentials file: {exc}") from exc

    def save_local(self, local: LocalSwarm) -> None:
        check_id(local.swarm, what="swarm id")
        write_private(self.local_file, json.dumps(asdict(local), indent=2))

    def local(self) -> LocalSwarm:
        try:
            raw = json.loads(self.local_file.read_text())
        except FileNotFoundError:
            return LocalSwarm()
        except ValueError as exc:
            raise ConfigError(f"{self.local_file} is not valid JSON: {exc}") from exc
        return LocalSwarm(**{k: raw[k] for k in ("swarm", "host", "port", "engine") if k in raw})

    def url(self, role: Role, *, port: int | None = None, host: str | None = None) -> BrokerURL:
        """The URL a local ``role`` connects with; ``port``/``host`` override local.json."""
        local = self.local()
        login = self.logins()[role]
        return BrokerURL(
            host=host or _connect_host(local.host),
            port=port or local.port,
            username=login.username,
            password=login.password,
        )


def _connect_host(listen_host: str) -> str:
    # A broker listening on every interface is still reached locally through loopback.
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host
