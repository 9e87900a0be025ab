"""How much one peer may ask of the broker: packet size, queue depth, time to log in.

One frozen value, built by the CLI and handed to whichever engine runs (``embedded.py`` applies it
in amqtt, ``mosquitto.py`` writes it into mosquitto.conf), so both brokers hold the same line.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_swarm.broker.contract.errors import ConfigError

#: The gateway takes request bodies up to 1 MiB; the task that carries one to a node adds its
#: envelope and JSON escaping (up to twice the text for non-ASCII). 2 MiB leaves that headroom;
#: the hub's own payload check (``hub/intake.py``) is far below it.
MAX_PACKET_BYTES = 2 * 2**20
#: A subscriber's backlog beyond this is dropped and counted. The hub subscribes to every node's
#: heartbeats and results: 10,000 covers a burst from a fleet of thousands while keeping a stuck
#: reader's share of memory to tens of MB at most.
MAX_QUEUED_MESSAGES = 10_000
#: How long a persistent session (the hub's) is kept while nobody resumes it, queueing what
#: comes for it. A day covers any restart; past that the hub is gone, or its login was rotated
#: (the hub's client id follows its login) and the old session would queue for no one.
SESSION_EXPIRY_S = 86_400
#: A TCP connection that has not sent CONNECT by then is closed.
CONNECT_TIMEOUT_S = 10.0
#: An unauthenticated CONNECT is small (client id, Will, login); it never gets a big buffer.
MAX_CONNECT_BYTES = 64 * 2**10


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    max_packet_bytes: int = MAX_PACKET_BYTES
    max_queued_messages: int = MAX_QUEUED_MESSAGES
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 1024 <= self.max_packet_bytes <= 268_435_455:
            raise ConfigError("the maximum packet size must be between 1024 bytes and 256 MB (MQTT's own limit)")
        if self.max_queued_messages < 1:
            raise ConfigError("the per-subscriber queue must hold at least one message")
        if not 0 < self.connect_timeout_s <= 3600:
            raise ConfigError("the CONNECT timeout must be between 0 and 3600 seconds")

    @property
    def max_connect_bytes(self) -> int:
        return min(MAX_CONNECT_BYTES, self.max_packet_bytes)
