"""Home Assistant's MQTT topics, built in one place (they live outside ``swarm/``).

Home Assistant reads device discovery from ``<prefix>/device/<id>/config`` (retained; an empty
retained payload removes the device) and announces itself with ``online`` on ``<prefix>/status``
when it (re)starts. Nodes publish the first and listen to the second (``node/homeassistant.py``
builds the payload); the hub clears the first when it revokes a node. The topics are here, in the
contract, because the hub and the node never import each other.

The ACL (``acl.py``) grants these topics under the default prefix only.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.topics import check_id, is_concrete

DEFAULT_PREFIX = "homeassistant"
#: what Home Assistant publishes on ``<prefix>/status`` when it starts (its birth message)
BIRTH = b"online"


@dataclass(frozen=True, slots=True)
class HomeAssistantTopics:
    """``HomeAssistantTopics().device_config("pixel7")`` -> ``homeassistant/device/pixel7/config``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not is_concrete(self.prefix) or "" in self.prefix.split("/"):
            raise ConfigError(f"Home Assistant prefix {self.prefix!r} must be a plain topic, such as 'homeassistant'")

    def device_config(self, node_id: str) -> str:
        return f"{self.prefix}/device/{check_id(node_id, what='node id')}/config"

    def status(self) -> str:
        return f"{self.prefix}/status"
