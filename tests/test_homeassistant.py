"""Home Assistant MQTT discovery: the payload checked directly against HA's device schema, then
real nodes on real brokers, Home Assistant's birth message, and `swarm-hub revoke` removing the
device again."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.homeassistant import HomeAssistantTopics
from nova_swarm.broker.contract.messages import Heartbeat, NodeState, Status
from nova_swarm.broker.contract.topics import Topics, is_concrete
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.base import Message
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.net import free_port
from nova_swarm.node import FakeEngine
from nova_swarm.node.homeassistant import HomeAssistantConfig, discovery_payload, encode, expire_after, is_birth

from .conftest import BIN, RunningBroker, env_for, running_node, within

T = Topics("main")
HA = HomeAssistantTopics()
ON = HomeAssistantConfig(enabled=True)
HEARTBEAT_SENSORS = {"battery": "battery_pct", "temperature": "temp_c", "tokens_per_s": "tokens_per_s"}
#: how Home Assistant splits a discovery topic (after the prefix), from its MQTT integration
HA_TOPIC = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")


def payload(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"node_id": "pixel7", "swarm": "main", "version": "1.2.3", "heartbeat_s": 10.0}
    settings.update(overrides)
    return discovery_payload(**settings)


# ---------------------------------------------------------------- the payload, no broker


def test_the_payload_has_what_device_discovery_requires() -> None:
    config = payload()
    dev = config["dev"]
    assert dev["identifiers"] == ["nova-swarm-pixel7"]
    assert dev["name"] and dev["model"] == "nova-swarm node" and dev["manufacturer"] == "nova-swarm"
    assert dev["sw_version"] == "1.2.3"
    assert config["o"]["name"] == "nova-swarm"
    components = config["cmps"]
    assert set(components) == {"battery", "temperature", "tokens_per_s", "state"}
    unique_ids = [c["unique_id"] for c in components.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for object_id, component in components.items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", object_id), object_id
        assert component["p"] == "sensor"
        assert component["unique_id"] == f"nova-swarm-pixel7-{object_id}"
        assert is_concrete(component["state_topic"])
        assert component["value_template"].startswith("{{")
    # Round trip through the wire: plain JSON, UTF-8 (the degree sign is not escaped away).
    raw = encode(config)
    assert json.loads(raw) == config and "°C".encode() in raw


def test_heartbeat_sensors_read_the_heartbeat_and_expire_without_one() -> None:
    components = payload(heartbeat_s=20.0)["cmps"]
    for object_id, key in HEARTBEAT_SENSORS.items():
        sensor = components[object_id]
        assert sensor["state_topic"] == T.node_heartbeat("pixel7")
        assert key in sensor["value_template"]
        assert sensor["expire_after"] == 60  # 3 heartbeats
        assert sensor["state_class"] == "measurement"
    assert components["battery"]["device_class"] == "battery" and components["battery"]["unit_of_measurement"] == "%"
    assert components["temperature"]["device_class"] == "temperature"
    assert components["temperature"]["unit_of_measurement"] == "°C"
    assert components["tokens_per_s"]["unit_of_measurement"] == "tok/s"
    assert "expire_after" not in components["state"]  # retained status, kept up to date by the Will
    assert expire_after(0.5) == 30 and expire_after(10.0) == 30 and expire_after(10.1) == 31


def test_availability_follows_the_retained_status_and_the_state_sensor_shows_offline() -> None:
    config = payload()
    [availability] = config["availability"]
    assert availability["topic"] == T.node_status("pixel7")
    assert availability["payload_available"] == "online" and availability["payload_not_available"] == "offline"
    state = config["cmps"]["state"]
    assert state["state_topic"] == T.node_status("pixel7")
    assert state["device_class"] == "enum" and state["options"] == ["online", "paused", "offline"]
    # Its own (empty) availability overrides the shared one, so it reads "offline", not "unavailable".
    assert state["availability"] == []


def test_the_templates_render_what_home_assistant_expects() -> None:
    import jinja2  # always here: llama-cpp-python renders chat templates with it

    env = jinja2.Environment()
    config = payload()

    def render(template: str, message: bytes) -> str:
        return env.from_string(template).render(value_json=json.loads(message))

    known = Heartbeat(
        node_id="pixel7", ts=1.0, battery_pct=81.0, charging=True, temp_c=33.5, ram_free_mb=None, load=None,
        tokens_per_s=4.2, busy=0, slots=1, queued=0, tokens_served=0, tasks_done=0, tasks_failed=0,
    )  # fmt: skip
    unknown = known.model_copy(update={"battery_pct": None, "temp_c": None, "tokens_per_s": None})
    for object_id, key in HEARTBEAT_SENSORS.items():
        template = config["cmps"][object_id]["value_template"]
        assert render(template, known.encode()) == str(getattr(known, key))
        # A numeric MQTT sensor reads the text "None" as unknown; "unknown" would be refused as not a number.
        assert render(template, unknown.encode()) == "None"
    availability = config["availability"][0]["value_template"]
    state = config["cmps"]["state"]["value_template"]
    for node_state, available in (("online", "online"), ("paused", "online"), ("offline", "offline")):
        status = Status(node_id="pixel7", state=NodeState(node_state), reason=None, ts=1.0).encode()
        assert render(availability, status) == available
        assert render(state, status) == node_state


def test_topics_are_where_home_assistant_looks() -> None:
    topic = HA.device_config("pixel7")
    assert topic == "homeassistant/device/pixel7/config" and is_concrete(topic)
    match = HA_TOPIC.fullmatch(topic.removeprefix("homeassistant/"))
    assert match is not None and match["component"] == "device" and match["object_id"] == "pixel7"
    assert HA.status() == "homeassistant/status"
    assert HomeAssistantTopics("ha/discovery").device_config("x") == "ha/discovery/device/x/config"
    for bad in ("", "/homeassistant", "homeassistant/", "home//assistant", "home+", "#", "$SYS"):
        with pytest.raises(ConfigError):
            HomeAssistantTopics(bad)
        with pytest.raises(ConfigError):
            HomeAssistantConfig(enabled=True, prefix=bad)
    with pytest.raises(ConfigError):
        HA.device_config("Not An Id")
    assert is_birth(b"online") and is_birth(b"online\n") and not is_birth(b"offline") and not is_birth(b"")


# ---------------------------------------------------------------- real nodes, real brokers


@asynccontextmanager
async def home_assistant(broker: RunningBroker, *filters: str) -> AsyncIterator[Connection]:
    """Home Assistant's side: the shared client login, as `swarm-hub creds` hands it out."""
    async with Connection(broker.url(Role.CLIENT), client_id="home-assistant") as conn:
        await conn.subscribe(*filters, qos=1)
        yield conn


async def collect(conn: Connection, seconds: float) -> list[Message]:
    got: list[Message] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in conn.messages():
                got.append(message)
    except TimeoutError:
        pass
    return got


async def next_message(conn: Connection, topic: str, timeout: float = 30.0) -> Message:
    async def first() -> Message:
        async for message in conn.messages():
            if message.topic == topic:
                return message
        raise AssertionError("connection closed")

    message: Message = await within(first(), timeout)
    return message


async def test_a_node_with_home_assistant_on_is_discovered_and_one_without_is_not(broker: RunningBroker) -> None:
    async with (
        running_node(broker, FakeEngine(), "n1", home_assistant=ON),
        running_node(broker, FakeEngine(), "n2"),
        home_assistant(broker, "homeassistant/#") as ha,
    ):
        config = await next_message(ha, HA.device_config("n1"))
        assert config.retain, "discovery must be retained, or Home Assistant loses the device on restart"
        assert json.loads(config.payload) == payload(node_id="n1", version=__version__, heartbeat_s=0.5)
        later = await collect(ha, 2.0)
    assert not [m for m in later if m.topic == HA.device_config("n2")]


async def test_discovery_is_sent_again_when_home_assistant_comes_online(amqtt: RunningBroker) -> None:
    async with (
        running_node(amqtt, FakeEngine(), "n1", home_assistant=ON),
        home_assistant(amqtt, HA.device_config("n1")) as ha,
    ):
        first = await next_message(ha, HA.device_config("n1"))
        assert first.retain
        await ha.publish(HA.status(), b"online", qos=1)  # Home Assistant's birth message
        again = await next_message(ha, HA.device_config("n1"))
        assert again.payload == first.payload
    # Still retained for the next Home Assistant to come along.
    async with home_assistant(amqtt, HA.device_config("n1")) as fresh:
        assert (await next_message(fresh, HA.device_config("n1"))).retain


def revoke(broker: RunningBroker, node_id: str, port: int) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "swarm-hub"), "revoke", node_id, "--config-dir", str(broker.home.path), "--port", str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env_for(broker.home))


async def test_revoke_removes_the_node_from_home_assistant(broker: RunningBroker) -> None:
    topic = HA.device_config("n1")
    async with running_node(broker, FakeEngine(), "n1", home_assistant=ON):
        async with home_assistant(broker, topic) as ha:
            assert (await next_message(ha, topic)).retain
        out = await asyncio.to_thread(revoke, broker, "n1", broker.port)
        assert out.returncode == 0, out.stderr
        assert "removed from Home Assistant" in out.stdout, out.stdout + out.stderr
        # A Home Assistant that starts now finds no device (or the empty payload that deletes it).
        async with home_assistant(broker, topic) as ha:
            seen = [m.payload for m in await collect(ha, 2.0) if m.topic == topic]
    assert all(p == b"" for p in seen), seen


def test_revoke_without_a_broker_still_revokes_and_says_how_to_clean_up(home: SwarmHome) -> None:
    home.enroll("n1")
    argv = [str(BIN / "swarm-hub"), "revoke", "n1", "--config-dir", str(home.path), "--port", str(free_port())]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env_for(home))
    assert out.returncode == 0, out.stderr
    assert "n1" not in home.enrolments()
    assert "mosquitto_pub $(swarm-hub creds --role hub) -r -n -t homeassistant/device/n1/config" in out.stderr
