"""Home Assistant MQTT discovery for a node (``swarm-node run --home-assistant``; off by default).

One retained device-discovery message on ``homeassistant/device/<node_id>/config`` makes the node
a device in Home Assistant with four sensors read straight from topics the node already
publishes: battery, temperature and tokens/s from its heartbeat, and its state (online, paused,
offline) from its retained status. Nothing here does I/O: the agent publishes what
:func:`discovery_payload` returns after every connect and whenever Home Assistant says it is back
(``online`` on ``homeassistant/status``).

Two details follow from what Home Assistant and our brokers do:

- Heartbeat values are ``null`` when the node cannot read them. A numeric MQTT sensor takes the
  rendered text ``None`` as "unknown" (any other text, ``unknown`` included, is refused as not a
  number), so the templates render ``None`` for ``null``.
- amqtt never fires a Last Will when a frozen client's keepalive runs out, so the heartbeat
  sensors carry ``expire_after``: they go unavailable when heartbeats stop, Will or not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from nova_swarm.broker.contract.homeassistant import BIRTH, DEFAULT_PREFIX, HomeAssistantTopics
from nova_swarm.broker.contract.messages import NodeState
from nova_swarm.broker.contract.topics import Topics

MANUFACTURER = "nova-swarm"
MODEL = "nova-swarm node"
#: heartbeat sensors expire after this many missed heartbeats, and never sooner than the floor
MISSED_HEARTBEATS = 3
MIN_EXPIRE_AFTER_S = 30


@dataclass(frozen=True, slots=True)
class HomeAssistantConfig:
    """Whether the node shows up in Home Assistant, and under which discovery prefix."""

    enabled: bool = False
    prefix: str = DEFAULT_PREFIX
    #: built once from ``prefix`` (a bad prefix fails here, at start-up): the node compares every
    #: incoming topic with ``topics.status()``
    topics: HomeAssistantTopics = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "topics", HomeAssistantTopics(self.prefix))


def is_birth(payload: bytes) -> bool:
    """Home Assistant's ``online`` on its status topic: it (re)started and wants discovery again."""
    return payload.strip() == BIRTH


def expire_after(heartbeat_s: float) -> int:
    """Seconds without a heartbeat before Home Assistant shows the heartbeat sensors unavailable."""
    return max(MIN_EXPIRE_AFTER_S, math.ceil(MISSED_HEARTBEATS * heartbeat_s))


def _numeric(key: str) -> str:
    return f"{{{{ value_json.{key} if value_json.{key} is not none else 'None' }}}}"


def discovery_payload(*, node_id: str, swarm: str, version: str, heartbeat_s: float) -> dict[str, Any]:
    """The device-discovery config for one node, as Home Assistant's device schema wants it:
    ``dev`` (device), ``o`` (origin) and ``cmps`` (components, each with its platform ``p``)."""
    topics = Topics(swarm)
    heartbeat = topics.node_heartbeat(node_id)
    status = topics.node_status(node_id)
    device_id = f"nova-swarm-{node_id}"
    expiry = expire_after(heartbeat_s)

    def from_heartbeat(object_id: str, key: str, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "p": "sensor",
            "name": name,
            "unique_id": f"{device_id}-{object_id}",
            "state_topic": heartbeat,
            "value_template": _numeric(key),
            "state_class": "measurement",
            "expire_after": expiry,
            **extra,
        }

    return {
        "dev": {
            "identifiers": [device_id],
            "name": f"nova-swarm {node_id}",
            "model": MODEL,
            "sw_version": version,
            "manufacturer": MANUFACTURER,
        },
        "o": {"name": "nova-swarm", "sw_version": version},
        # Shared by every component that does not set its own: the node's retained status, which
        # its Last Will turns to "offline" when its connection drops.
        "availability": [
            {
                "topic": status,
                "value_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "cmps": {
            "battery": from_heartbeat(
                "battery", "battery_pct", "Battery", device_class="battery", unit_of_measurement="%"
            ),
            "temperature": from_heartbeat(
                "temperature",
                "temp_c",
                "Temperature",
                device_class="temperature",
                unit_of_measurement="°C",
                suggested_display_precision=1,
            ),
            "tokens_per_s": from_heartbeat(
                "tokens_per_s", "tokens_per_s", "Tokens/s", unit_of_measurement="tok/s", suggested_display_precision=1
            ),
            "state": {
                "p": "sensor",
                "name": "State",
                "unique_id": f"{device_id}-state",
                "state_topic": status,
                "value_template": "{{ value_json.state }}",
                "device_class": "enum",
                "options": [state.value for state in NodeState],
                # No availability of its own (an empty list overrides the shared one): this sensor
                # should read "offline" when the node is gone, not "unavailable".
                "availability": [],
            },
        },
    }


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
