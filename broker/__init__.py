"""The bus: the wire contract every part speaks, and the brokers that carry it.

Hub and node both import the contract from here (``topics``, ``messages``, ``errors``,
``connection``); neither imports the other. Importing this package does not import amqtt:
a phone never needs the broker's dependencies.
"""

from .connection import Connection, Message, Will
from .errors import ConfigError, ConnectionLost, ErrorCode, ProtocolError, RequestFailed, SwarmError
from .home import LocalSwarm, Login, Role, SwarmHome
from .topics import Topics
from .url import BrokerURL

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
