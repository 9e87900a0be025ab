"""The user's config directory: generated credentials, the local swarm's address, the hub's DB.

Layout (all files 0600, the directories 0700, whatever the umask: ``private.py``)::

    ~/.config/nova-swarm/          ($NOVA_SWARM_HOME, else $XDG_CONFIG_HOME/nova-swarm)
        credentials.json           {"hub": {"username": ..., "password": ...}, "client": ...}
        nodes.json                 one login per enrolled node: {"pixel7": {"password": ..., "owner": ...}}
        clients.json               client logins (`enroll --client`, the gateway's): {"alice": {"password": ...}}
        passwd                     every login above as $7$ hashes, for either broker
        local.json                 where `swarm-hub up` / `swarm-broker` listen, so `ask` needs no flags
        hub.sqlite                 the hub's registry, win rates and request journal
        ledger.sqlite              the contribution ledger: signed, hash-chained receipts
        tls/                       the swarm's CA and the broker's certificate (`up --tls`)
        mosquitto/                 generated Mosquitto config and ACL (Mosquitto mode)
        signing/hub.key            the hub's Ed25519 key that signs model pins and node bundles
        gateway.token              the bearer token of the OpenAI-compatible HTTP gateway
        joined.json                on a node's machine: how `swarm-node join` says to reach the swarm
        logs/                      JSON logs of the hub, broker and nodes, rotated by size

Credentials are made on first use with a CSPRNG; there is no default password anywhere. A node's
username is its node id: the ACL ties its topics to it, so one node cannot speak for another. A
client login's name is its scope: only it may send prompts on ``prompt/{name}`` and read
``reply/{name}``. Node ids and client login names share one namespace.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.signing import PublicKey, SigningKey
from nova_swarm.broker.contract.topics import DEFAULT_SWARM, check_id, check_login_name, check_node_id
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.broker.passwords import write_password_file
from nova_swarm.broker.private import open_private, private_dir, tighten_tree, write_private

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
#: The HTTP gateway's own client login, made at setup: its requests are its own scope, apart
#: from the shared ``client`` login's.
GATEWAY_LOGIN = "gateway"


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
    #: TLS only: the broker listens for mqtts:// and nothing else
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Enrolment:
    node_id: str
    password: str
    owner: str | None = None
    enrolled_at: float = 0.0
    #: the owner trusts this node with private requests (``swarm-hub enroll NODE --trusted``)
    trusted: bool = False


@dataclass(frozen=True, slots=True)
class Joined:
    """What a node's machine keeps after ``swarm-node join``: where the swarm is, and its login."""

    url: str
    swarm: str
    node_id: str
    ca_pem: str | None = None
    #: the hub's public signing key: the node applies only pins and bundles signed with it
    hub_key: str | None = None
    #: find the hub by mDNS (``enroll --discover`` / ``join --discover``): joining looks it up,
    #: and a node whose saved address stops answering looks again at start (DHCP moves hubs)
    discover: bool = False


JOIN_PREFIX = "nova1."


def join_token(joined: Joined) -> str:
    """One copy-pasteable string with everything a node needs (it holds a secret: treat it as one)."""
    raw = json.dumps(asdict(joined), separators=(",", ":")).encode()
    return JOIN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_join_token(token: str) -> Joined:
    token = token.strip()
    if not token.startswith(JOIN_PREFIX):
        raise ConfigError(f"a join token starts with {JOIN_PREFIX!r}; get one with `swarm-hub enroll NODE`")
    body = token[len(JOIN_PREFIX) :]
    try:
        raw = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        joined = Joined(
            url=raw["url"],
            swarm=raw["swarm"],
            node_id=raw["node_id"],
            ca_pem=raw.get("ca_pem"),
            hub_key=raw.get("hub_key"),
            discover=raw.get("discover", False) is True,
        )
    except (ValueError, binascii.Error, KeyError, TypeError) as exc:
        raise ConfigError(f"the join token is damaged (copy all of it): {exc}") from exc
    BrokerURL.parse(joined.url)
    if joined.hub_key is not None:
        PublicKey.parse(joined.hub_key)
    check_node_id(joined.node_id)
    return joined


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
    def nodes_file(self) -> Path:
        return self.path / "nodes.json"

    @property
    def clients_file(self) -> Path:
        return self.path / "clients.json"

    @property
    def tls_dir(self) -> Path:
        return self.path / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def joined_file(self) -> Path:
        return self.path / "joined.json"

    @property
    def joined_ca_file(self) -> Path:
        return self.path / "swarm-ca.pem"

    @property
    def signing_key_file(self) -> Path:
        return self.path / "signing" / "hub.key"

    @property
    def ledger_file(self) -> Path:
        return self.path / "ledger.sqlite"

    @property
    def gateway_token_file(self) -> Path:
        return self.path / "gateway.token"

    def log_file(self, name: str) -> Path:
        """``logs/<name>.log``: one file per process (hub, broker, node-<id>)."""
        return self.path / "logs" / f"{name}.log"

    @property
    def mosquitto_dir(self) -> Path:
        return self.path / "mosquitto"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the login files across processes (nodes starting
        together on the hub's machine each enrol themselves)."""
        # Every command that changes logins passes here: a config dir made looser by an older
        # version (or a permissive umask) is made private again.
        private_dir(self.path)
        fd = open_private(self.path / ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ensure(self) -> dict[Role, Login]:
        """Load the hub's and clients' logins, generating them (and the password file) on first run.

        Nodes get no shared login: each is enrolled on its own (:meth:`enroll`).
        """
        with self._locked():
            # Each process starts here: whatever an older version (or a looser umask) left in
            # the config dir is made private before anything is read from it or added to it.
            tighten_tree(self.path)
            if not self.credentials_file.exists():
                self._save_logins({role: Login(role.value, _new_password()) for role in (Role.HUB, Role.CLIENT)})
            logins = self.logins()
            if not self.password_file.exists():
                self.write_password_file()
            if not self.signing_key_file.exists():
                SigningKey.generate().save(self.signing_key_file)
            if not self.gateway_token_file.exists():
                write_private(self.gateway_token_file, f"sk-swarm-{secrets.token_urlsafe(32)}\n")
            clients = self.client_logins()
            if GATEWAY_LOGIN not in clients:
                # A config dir from before client logins: the gateway gets its own now.
                self._save_clients({**clients, GATEWAY_LOGIN: Login(GATEWAY_LOGIN, _new_password())})
        return logins

    def gateway_token(self) -> str:
        """The HTTP gateway's bearer token (made by :meth:`ensure`, at setup)."""
        try:
            token = self.gateway_token_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"no gateway token in {self.path}: run `swarm-hub up` once, or pass --config-dir"
            ) from None
        if len(token) < 16:
            raise ConfigError(f"{self.gateway_token_file} holds no usable token; delete it and run `swarm-hub up`")
        return token

    # ---------------------------------------------------------------- signing

    def signing_key(self) -> SigningKey:
        """The hub's key for model pins and bundles (made by :meth:`ensure`, at setup)."""
        if not self.signing_key_file.exists():
            raise ConfigError(
                f"no signing key in {self.path}: run `swarm-hub up` once on the hub's machine, "
                "or pass that machine's --config-dir"
            )
        return SigningKey.load(self.signing_key_file)

    def hub_public_key(self) -> PublicKey | None:
        """The key a node on this machine trusts: from `swarm-node join`, else this machine's hub."""
        joined = self.joined()
        if joined is not None and joined[0].hub_key:
            return PublicKey.parse(joined[0].hub_key)
        if self.signing_key_file.exists():
            return self.signing_key().public
        return None

    def _save_logins(self, logins: dict[Role, Login]) -> None:
        raw = {r.value: {"username": login.username, "password": login.password} for r, login in logins.items()}
        write_private(self.credentials_file, json.dumps(raw, indent=2))

    def rotate(self, role: Role) -> Login:
        """A new password for the hub or client login; the brokers pick it up within a second and
        drop connections that still use the old one."""
        if role is Role.NODE:
            raise ConfigError("nodes have their own logins: rotate one with `swarm-hub enroll NODE --rotate`")
        with self._locked():
            logins = self.logins()
            logins[role] = Login(role.value, _new_password())
            self._save_logins(logins)
            self.write_password_file()
        return logins[role]

    def write_password_file(self) -> None:
        """Every current login, hashed, for whichever broker runs (both watch this file)."""
        logins = {login.username: login.password for login in self.logins().values()}
        logins.update({e.node_id: e.password for e in self.enrolments().values()})
        clients = self.client_logins()
        logins.update({name: login.password for name, login in clients.items()})
        write_password_file(self.password_file, logins, clients=frozenset(clients))

    # ---------------------------------------------------------------- client logins

    def client_logins(self) -> dict[str, Login]:
        """Client logins of their own (``swarm-hub enroll --client NAME``, and the gateway's)."""
        raw = _read_json(self.clients_file)
        if raw is None:
            return {}
        try:
            return {name: Login(name, fields["password"]) for name, fields in raw.items()}
        except (TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"{self.clients_file} is not a valid client login file: {exc}") from exc

    def _save_clients(self, clients: dict[str, Login]) -> None:
        raw = {name: {"password": login.password} for name, login in sorted(clients.items())}
        write_private(self.clients_file, json.dumps(raw, indent=2))
        self.write_password_file()

    def enroll_client(self, name: str, *, rotate: bool = False) -> Login:
        """A client login of its own, made on first use (or anew with ``rotate``). Its requests
        and replies are its own scope: no other login can read, redirect or squat on them."""
        if name != GATEWAY_LOGIN:  # reserved for others, but the setup's own to rotate
            check_login_name(name)
        self.ensure()
        with self._locked():
            if name in self.enrolments():
                raise ConfigError(f"{name!r} is an enrolled node; node ids and client logins share one namespace")
            clients = self.client_logins()
            current = clients.get(name)
            if current is not None and not rotate:
                return current
            clients[name] = Login(name, _new_password())
            self._save_clients(clients)
        return clients[name]

    def revoke_client(self, name: str) -> bool:
        """Remove a client login; the broker drops its connections and refuses it from then on."""
        if name == GATEWAY_LOGIN:
            raise ConfigError(
                "the gateway's login is part of the setup; rotate it with `enroll --client gateway --rotate`"
            )
        with self._locked():
            clients = self.client_logins()
            if clients.pop(name, None) is None:
                return False
            self._save_clients(clients)
        return True

    def client_url(self, name: str, *, port: int | None = None, host: str | None = None) -> BrokerURL:
        """How a client with login ``name`` on this machine reaches this machine's swarm."""
        login = self.client_logins().get(name)
        if login is None:
            raise ConfigError(f"no client login {name!r} here: make one with `swarm-hub enroll --client {name}`")
        return self.url(Role.CLIENT, port=port, host=host).with_login(login.username, login.password)

    # ---------------------------------------------------------------- nodes

    def enrolments(self) -> dict[str, Enrolment]:
        raw = _read_json(self.nodes_file)
        if raw is None:
            return {}
        try:
            return {node_id: Enrolment(node_id, **fields) for node_id, fields in raw.items()}
        except (TypeError, AttributeError) as exc:
            raise ConfigError(f"{self.nodes_file} is not a valid enrolment file: {exc}") from exc

    def _save_enrolments(self, enrolments: dict[str, Enrolment]) -> None:
        raw = {e.node_id: {k: v for k, v in asdict(e).items() if k != "node_id"} for e in enrolments.values()}
        write_private(self.nodes_file, json.dumps(raw, indent=2, sort_keys=True))
        self.write_password_file()

    def enroll(
        self, node_id: str, *, owner: str | None = None, rotate: bool = False, trusted: bool | None = None
    ) -> Enrolment:
        """The node's own login, made on first enrolment (or anew with ``rotate``); ``owner`` and
        ``trusted`` change only when given."""
        check_node_id(node_id)
        self.ensure()
        with self._locked():
            if node_id in self.client_logins():
                raise ConfigError(f"{node_id!r} is a client login; node ids and client logins share one namespace")
            enrolments = self.enrolments()
            current = enrolments.get(node_id)
            if (
                current is not None
                and not rotate
                and (owner is None or owner == current.owner)
                and (trusted is None or trusted == current.trusted)
            ):
                return current
            enrolment = Enrolment(
                node_id=node_id,
                password=_new_password() if current is None or rotate else current.password,
                owner=owner if owner is not None else (current.owner if current else None),
                enrolled_at=time.time() if current is None else current.enrolled_at,
                trusted=trusted if trusted is not None else (current.trusted if current else False),
            )
            enrolments[node_id] = enrolment
            self._save_enrolments(enrolments)
        return enrolment

    def revoke(self, node_id: str) -> bool:
        """Remove the node's login; the broker drops its connection and refuses it from then on."""
        with self._locked():
            enrolments = self.enrolments()
            if enrolments.pop(node_id, None) is None:
                return False
            self._save_enrolments(enrolments)
        return True

    def node_url(self, node_id: str, *, port: int | None = None, host: str | None = None) -> BrokerURL:
        """How a node on this machine reaches this machine's swarm (enrolling it on first use)."""
        enrolment = self.enroll(node_id)
        return self.url(Role.HUB, port=port, host=host).with_login(node_id, enrolment.password)

    def save_joined(self, joined: Joined) -> None:
        private_dir(self.path)
        if joined.ca_pem:
            write_private(self.joined_ca_file, joined.ca_pem)
        write_private(self.joined_file, json.dumps(asdict(joined), indent=2))

    def joined(self) -> tuple[Joined, BrokerURL] | None:
        raw = _read_json(self.joined_file)
        if raw is None:
            return None
        try:
            joined = Joined(**raw)
        except TypeError as exc:
            raise ConfigError(f"{self.joined_file} is damaged; run `swarm-node join` again: {exc}") from exc
        ca = self.joined_ca_file if joined.ca_pem else None
        return joined, BrokerURL.parse(joined.url, ca_file=ca)

    def logins(self) -> dict[Role, Login]:
        try:
            raw = json.loads(self.credentials_file.read_text())
            # A "node" entry from before per-node logins is ignored (and dropped on the next write).
            return {Role(k): Login(v["username"], v["password"]) for k, v in raw.items() if k != Role.NODE}
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
        raw = _read_json(self.local_file)
        if raw is None:
            return LocalSwarm()
        return LocalSwarm(**{k: raw[k] for k in ("swarm", "host", "port", "engine", "tls") if k in raw})

    def url(self, role: Role, *, port: int | None = None, host: str | None = None) -> BrokerURL:
        """The URL a local ``role`` connects with; ``port``/``host`` override local.json."""
        if role is Role.NODE:
            raise ConfigError("each node has its own login: use SwarmHome.node_url(node_id)")
        local = self.local()
        login = self.logins()[role]
        return BrokerURL(
            host=host or _connect_host(local.host),
            port=port or local.port,
            username=login.username,
            password=login.password,
            tls=local.tls,
            ca_file=self.ca_file if local.tls else None,
        )


def _read_json(path: Path) -> Any:
    """A config file's JSON, or None when the file does not exist (yet)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _connect_host(listen_host: str) -> str:
    # A broker listening on every interface is still reached locally through loopback.
    return "127.0.0.1" if listen_host in ("0.0.0.0", "", "::") else listen_host
