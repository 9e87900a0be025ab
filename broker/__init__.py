"""The bus: the wire contract every part speaks, and the brokers that carry it.

Three subpackages: ``contract`` (topics, messages, errors: what hub and node must agree on),
``link`` (the client connection, URLs, discovery) and ``server`` (the brokers, ACL and TLS a
hub starts). Hub and node both import the contract and the link; neither imports the other. A
node never imports ``server``, and its bundle leaves it out: a phone never needs amqtt.
"""

from nova_swarm.broker.contract.errors import (
    ConfigError,
    ConnectionLost,
    ErrorCode,
    ProtocolError,
    RequestFailed,
    SwarmError,
)
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import LocalSwarm, Login, Role, SwarmHome
from nova_swarm.broker.link.base import Message, Will
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.url import BrokerURL

__all__ = [
    "BrokerURL",
    "ConfigError",
    "Connection",
    "ConnectionLost",
    "ErrorCode",
    "LocalSwarm",
    "Login",
    "Message",
    "ProtocolError",
    "RequestFailed",
    "Role",
    "SwarmError",
    "SwarmHome",
    "Topics",
    "Will",
]
