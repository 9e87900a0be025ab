"""The link seam: how the hub, the node and every client reach the broker.

    links = MqttLinks(url)                      # or MemoryBroker().links(url) in a test
    async with links.open(client_id="pixel7", will=Will(...)) as link:
        await link.subscribe(topics.node_task("pixel7"))
        async for message in link.messages():
            ...

A ``Link`` is one session with a broker, opened by ``async with`` and gone when it ends;
reconnecting is a loop the owner writes around it (``reconnect.reconnecting``). ``Links`` makes
links to one broker as one login. Two implementations ship:

- ``connection.MqttLinks`` opens a ``connection.Connection``: MQTT over TCP or TLS (aiomqtt);
- ``memory.MemoryBroker``: a broker inside the process, for tests of scheduling and lifecycle
  that need no broker process, in the way httpx ships ``MockTransport``.

Every link raises ``ConnectionLost`` when its session ends and ``ProtocolError`` for a topic no
broker would accept, so owners handle one set of errors whichever link they hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, Self

from nova_swarm.broker.link.url import BrokerURL

#: which MQTT a link speaks: "auto" asks the broker (MQTT 5 where it can, else 3.1.1)
MqttVersion = Literal["auto", "3.1.1", "5"]


@dataclass(frozen=True, slots=True)
class Will:
    """What the broker publishes for a client whose link ends without a clean goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: MQTT 5 request/response properties, when the publisher set them.
    response_topic: str | None = None
    correlation_data: bytes | None = None


class Link(Protocol):
    """One open session with a broker; use it as an async context manager."""

    #: the broker honours MQTT 5 properties (correlation data) on this link
    mqtt5: bool

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def subscribe(self, *filters: str, qos: int = 1) -> None: ...

    async def unsubscribe(self, *filters: str, drop_pending: bool = True) -> None:
        """``drop_pending``: messages already on their way are dropped too (else still delivered)."""

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, correlation_data: bytes | None = None
    ) -> None: ...

    def messages(self) -> AsyncIterator[Message]:
        """Messages on our subscriptions until the session ends (then ``ConnectionLost``)."""
        ...


class Links(Protocol):
    """Opens links to one broker, as the login its ``url`` names."""

    @property
    def url(self) -> BrokerURL: ...

    def open(
        self,
        *,
        client_id: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        protocol: MqttVersion = "3.1.1",
        timeout: float = 10.0,
        persistent: bool = False,
    ) -> Link:
        """``persistent``: the broker keeps the session's subscriptions while the link is down
        and queues QoS 1 messages for it; needs a stable ``client_id``."""
        ...
