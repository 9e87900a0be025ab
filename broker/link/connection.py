"""One MQTT connection, the single boundary where aiomqtt/paho errors become ours.

    async with Connection(url, client_id="pixel7", will=Will(...)) as conn:
        await conn.subscribe(topics.node_task("pixel7"))
        async for message in conn.messages():
            ...

Reconnecting is a loop the caller writes around ``async with`` (``reconnect.reconnecting``).
What this layer adds on top of aiomqtt:

- TCP_NODELAY on the socket: without it a QoS 1 round trip took 44-88 ms (BROKERS.md).
- Only messages matching one of *our* subscriptions are delivered: amqtt may push retained
  messages for filters other clients subscribed to (BROKERS.md, defect 1).
- Publishing to a wildcard or ``$`` topic is refused locally: amqtt silently stops serving a
  connection that does it (BROKERS.md, defect 4).
- ``protocol="auto"`` speaks MQTT 5 where the broker does (to honour response-topic and
  correlation-data) and falls back to 3.1.1 (amqtt refuses MQTT 5).
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiomqtt
import structlog
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, ProtocolError
from nova_swarm.broker.contract.limits import SESSION_EXPIRY_S
from nova_swarm.broker.contract.topics import is_concrete, matches
from nova_swarm.broker.link.base import Links, Message, MqttVersion, Will
from nova_swarm.broker.link.url import BrokerURL

log = structlog.get_logger("nova_swarm.connection")

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

#: A node's heartbeat interval unless told otherwise (``NodeConfig.heartbeat_s``).
HEARTBEAT_S = 10.0


def keepalive_for(heartbeat_s: float) -> int:
    """The MQTT keepalive for a client that publishes every ``heartbeat_s``: 1.5 times that.

    Chosen for a phone's battery. Every packet wakes the Wi-Fi radio out of its power save, and
    it then stays up for a tail of ~100-200 ms. paho sends a PINGREQ only when nothing went out
    (or came in) for a whole keepalive; the heartbeat goes out every ``heartbeat_s`` and the
    hub's status comes in as often, so with a keepalive a half-interval longer than the
    heartbeat, heartbeats *are* the keepalive traffic and a healthy node never sends a ping: no
    wake-ups beyond the heartbeats it sends anyway. The price is detection time: the broker
    drops a silent client after 1.5 keepalives (Mosquitto, and the embedded broker), so a phone
    that drops off Wi-Fi while idle is written off, and its Last Will published, within
    :func:`written_off_after` (22.5 s at the default 10 s heartbeat). A *busy* phone is noticed
    much sooner, by its missing progress (``hub/lifecycle.py``).
    """
    return max(5, math.ceil(1.5 * heartbeat_s))


def written_off_after(heartbeat_s: float) -> float:
    """How long a silent client of :func:`keepalive_for` keeps its connection: 1.5 keepalives,
    as MQTT has the broker enforce it. The hub's heartbeat timeout defaults to the same."""
    return 1.5 * keepalive_for(heartbeat_s)


class Connection:
    """An open MQTT connection (a ``base.Link``); use it as an async context manager."""

    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        protocol: MqttVersion = "3.1.1",
        ca_file: Path | None = None,
        timeout: float = 10.0,
        persistent: bool = False,
    ) -> None:
        """``persistent``: keep the broker-side session across disconnects (MQTT's clean session
        off, or an MQTT 5 session expiry of :data:`SESSION_EXPIRY_S`), so QoS 1 messages on our
        subscriptions are queued while we are away. Needs a stable ``client_id``."""
        if persistent and not client_id:
            raise ConfigError("a persistent session needs a stable client id")
        self.url = url
        self._client_id = client_id
        self._will = will
        self._keepalive = keepalive
        self._protocol = protocol
        self._ca_file = ca_file or url.ca_file
        self._timeout = timeout
        self._persistent = persistent
        self._client: aiomqtt.Client | None = None
        self._filters: list[str] = []
        self.mqtt5 = False

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.url.tls:
            return None
        try:
            return ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use CA certificate {self._ca_file}: {exc}") from exc

    def _make_client(self, version: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
        v5 = version == aiomqtt.ProtocolVersion.V5
        will = None
        if self._will is not None:
            will = aiomqtt.Will(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        return aiomqtt.Client(
            self.url.host,
            self.url.port,
            username=self.url.username,
            password=self.url.password,
            identifier=self._client_id,
            protocol=version,
            will=will,
            keepalive=self._keepalive,
            timeout=self._timeout,
            tls_context=self._tls_context(),
            socket_options=[_NODELAY],
            # Most links take a fresh session on every connect: broker sessions are unreliable
            # on amqtt (BROKERS.md, defect 7), so we resubscribe and rely on ids for idempotence.
            # A persistent one (the hub's) still resubscribes, and only adds what the broker
            # queued while it was away.
            clean_session=None if v5 else not self._persistent,
            clean_start=False if self._persistent and v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties(version),
        )

    def _connect_properties(self, version: aiomqtt.ProtocolVersion) -> Properties | None:
        if not self._persistent or version != aiomqtt.ProtocolVersion.V5:
            return None
        # MQTT 5 ends a session with its connection unless told how long to keep it.
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        return properties

    async def __aenter__(self) -> Connection:
        if self._protocol == "auto":
            mqtt5 = await probe_mqtt5(self.url, self._tls_context())
        else:
            mqtt5 = self._protocol == "5"
        version = aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311
        client = self._make_client(version)
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            raise ConnectionLost(f"broker {self.url.redacted()} refused the connection: {exc}") from exc
        except (aiomqtt.MqttError, OSError) as exc:
            raise ConnectionLost(f"cannot connect to {self.url.redacted()}: {exc}") from exc
        self._client = client
        self.mqtt5 = mqtt5
        self._filters = []
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError:
            # The connection is already gone; whatever was in flight is covered by ids and retries.
            pass

    @property
    def client(self) -> aiomqtt.Client:
        if self._client is None:
            raise ConnectionLost("not connected")
        return self._client

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        try:
            for topic_filter in filters:
                await self.client.subscribe(topic_filter, qos=qos)
                self._filters.append(topic_filter)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"subscribe failed: {exc}") from exc

    async def unsubscribe(self, *filters: str, drop_pending: bool = True) -> None:
        """Stop the broker sending these. With ``drop_pending`` (the default) messages already on
        their way are dropped too; without, they are still delivered, for a caller that must
        answer each one (a pausing node refuses its late tasks rather than lose them)."""
        if drop_pending:
            self._filters = [f for f in self._filters if f not in filters]
        try:
            for topic_filter in filters:
                await self.client.unsubscribe(topic_filter)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"unsubscribe failed: {exc}") from exc

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        if not is_concrete(topic):
            raise ProtocolError(
                f"refusing to publish to {topic[:80]!r}: not a topic every broker accepts"
                " (wildcards, '$', control characters or over 64 KiB)"
            )
        properties = None
        if correlation_data is not None and self.mqtt5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation_data
        try:
            await self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"publish to {topic} failed: {exc}") from exc

    async def messages(self) -> AsyncIterator[Message]:
        """Messages on our subscriptions, until the connection drops (then ConnectionLost)."""
        try:
            async for raw in self.client.messages:
                topic = raw.topic.value
                if not any(matches(f, topic) for f in self._filters):
                    log.debug("dropped unsolicited message", topic=topic)
                    continue
                payload = raw.payload if isinstance(raw.payload, bytes) else str(raw.payload).encode()
                response_topic = correlation = None
                if raw.properties is not None:
                    response_topic = getattr(raw.properties, "ResponseTopic", None)
                    correlation = getattr(raw.properties, "CorrelationData", None)
                yield Message(topic, payload, raw.qos, bool(raw.retain), response_topic, correlation)
        except aiomqtt.MqttError as exc:
            raise ConnectionLost(f"connection to {self.url.redacted()} lost: {exc}") from exc
        raise ConnectionLost(f"connection to {self.url.redacted()} closed")


async def probe_mqtt5(url: BrokerURL, tls_context: ssl.SSLContext | None = None, timeout: float = 3.0) -> bool:
    """Does the broker speak MQTT 5? One anonymous CONNECT, and we read the CONNACK's shape.

    An MQTT 5 CONNACK carries a properties section (remaining length >= 3) even when it refuses
    us; a 3.1.1-only broker such as amqtt answers with the 2-byte form (return code 1). paho,
    asked for MQTT 5, just waits out its timeout on amqtt, hence this probe.
    """
    connect_body = b"\x00\x04MQTT\x05\x02\x00\x0a\x00" + b"\x00\x0cnova-probe-5"
    packet = b"\x10" + bytes([len(connect_body)]) + connect_body
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                url.host, url.port, ssl=tls_context, server_hostname=url.host if tls_context else None
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:
        raise ConnectionLost(f"cannot connect to {url.redacted()}: {exc}") from exc
    try:
        writer.write(packet)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(2), timeout)
        return header[0] == 0x20 and header[1] >= 3
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def wait_for_broker(
    url: BrokerURL,
    *,
    timeout: float = 20.0,
    exited: Callable[[], int | None] | None = None,
    ca_file: Path | None = None,
) -> None:
    """Return once the broker accepts a login as ``url``; a full MQTT handshake, so a broker
    that listens but is not ready yet (or rejects us) is not mistaken for a ready one."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    last: Exception | None = None
    while loop.time() < give_up:
        status = exited() if exited is not None else None
        if status is not None:
            raise ConnectionLost(f"the broker exited with status {status} before accepting connections")
        try:
            async with Connection(url, ca_file=ca_file, timeout=2.0):
                return
        except ConnectionLost as exc:
            last = exc
            await asyncio.sleep(0.1)
    raise ConnectionLost(f"broker {url.redacted()} not ready after {timeout:.0f} s: {last}")


@dataclass(frozen=True, slots=True)
class MqttLinks:
    """``base.Links`` over the network: each link a :class:`Connection` to the broker at ``url``."""

    url: BrokerURL
    ca_file: Path | None = None

    def open(
        self,
        *,
        client_id: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        protocol: MqttVersion = "3.1.1",
        timeout: float = 10.0,
        persistent: bool = False,
    ) -> Connection:
        return Connection(
            self.url,
            client_id=client_id,
            will=will,
            keepalive=keepalive,
            protocol=protocol,
            ca_file=self.ca_file,
            timeout=timeout,
            persistent=persistent,
        )


def links_for(url: BrokerURL | None, links: Links | None, *, ca_file: Path | None = None) -> Links:
    """The links an owner was given: ``links`` (a memory broker's, in a test), or MQTT to ``url``.
    Exactly one of the two."""
    if (url is None) == (links is None):
        raise ConfigError("give a broker url or links to one, not both or neither")
    if links is not None:
        return links
    assert url is not None
    return MqttLinks(url, ca_file)
