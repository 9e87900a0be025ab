"""A broker inside the process, and links to it: the fake that tests run real flows on.

    broker = MemoryBroker()
    async with Hub(config, links=broker.links(hub_url)) as hub, Node(..., links=broker.links(node_url)):
        ...
    broker.cut("node-pixel7")          # the phone drops off Wi-Fi: its Will fires

It keeps what the swarm relies on from MQTT, so the hub and the node behave on it as they do on
a real broker: topic filters with ``+`` and ``#``; delivery in publish order at the lower of
the publish's and the subscription's QoS; retained messages (an empty payload clears one), sent
on subscribe with the retain flag set; a Last Will published when a link ends without a clean
close, or when another link takes its client id; and persistent sessions, which keep their
subscriptions while the link is down and queue QoS 1 messages until the client id is back.

What it leaves out: logins and the ACL (every link may do anything), packet and queue limits,
keepalive (a link is up until it is closed or cut), MQTT 5 properties other than correlation
data, and any network. Tests of those use a real broker (``server/``). Like dramatiq's
``StubBroker``, it ships in the package so tests anywhere can use it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, ProtocolError
from nova_swarm.broker.contract.topics import is_concrete, matches
from nova_swarm.broker.link.base import Message, MqttVersion, Will
from nova_swarm.broker.link.url import BrokerURL

#: how an ended link's reader learns it ended (queued after whatever it had still to read)
_CLOSED = object()


@dataclass(eq=False)
class _Session:
    """What the broker keeps for a client id: its subscriptions, and, while it is away, what a
    persistent session queued for it."""

    client_id: str
    persistent: bool
    filters: dict[str, int] = field(default_factory=dict)
    queued: deque[Message] = field(default_factory=deque)
    link: MemoryLink | None = None


class MemoryBroker:
    """An MQTT broker in memory; see the module docstring for what it keeps of MQTT."""

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._anonymous = itertools.count(1)

    def links(self, url: BrokerURL | str = "mqtt://memory") -> MemoryLinks:
        """Links to this broker as the login ``url`` names (its user and password are only
        carried: the memory broker lets every link do anything)."""
        return MemoryLinks(self, url if isinstance(url, BrokerURL) else BrokerURL.parse(url))

    def connected(self) -> list[str]:
        """The client ids with a link up, sorted."""
        return sorted(s.client_id for s in self._sessions.values() if s.link is not None)

    def retained(self, topic: str) -> bytes | None:
        message = self._retained.get(topic)
        return None if message is None else message.payload

    def cut(self, client_id: str) -> None:
        """End a client's link as a dropped network would: no goodbye, so its Will fires, and
        its reader gets ``ConnectionLost``. Its session stays if it is persistent."""
        session = self._sessions.get(client_id)
        if session is None or session.link is None:
            raise ConfigError(f"no link with client id {client_id!r} is up")
        session.link._end("the link was cut", will=True)

    # ------------------------------------------------------------ what links call

    def _attach(self, link: MemoryLink) -> None:
        client_id = link.client_id or f"memory-{next(self._anonymous)}"
        link.client_id = client_id
        session = self._sessions.get(client_id)
        if session is not None and session.link is not None:
            # MQTT's takeover: the newer link wins, the older one ends as if dropped.
            session.link._end("another link took this client id", will=True)
        if session is None or not (session.persistent and link.persistent):
            session = _Session(client_id, link.persistent)
            self._sessions[client_id] = session
        session.link = link
        link._session = session
        while session.queued:
            link._deliver(session.queued.popleft())

    def _detach(self, link: MemoryLink, *, will: bool) -> None:
        session = link._session
        if session is None or session.link is not link:
            return
        session.link = None
        if not session.persistent:
            del self._sessions[session.client_id]
        if will and link.will is not None:
            w = link.will
            self._publish(Message(w.topic, w.payload, w.qos, w.retain))

    def _subscribe(self, session: _Session, filters: tuple[str, ...], qos: int) -> None:
        for topic_filter in filters:
            session.filters[topic_filter] = qos
            for message in list(self._retained.values()):
                if matches(topic_filter, message.topic) and session.link is not None:
                    session.link._deliver(_at(message, min(qos, message.qos), retain=True))

    def _publish(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in list(self._sessions.values()):
            granted = [q for f, q in session.filters.items() if matches(f, message.topic)]
            if not granted:
                continue
            # Overlapping subscriptions deliver once, at the highest QoS among them.
            delivered = _at(message, min(message.qos, max(granted)), retain=False)
            if session.link is not None:
                session.link._deliver(delivered)
            elif delivered.qos >= 1:
                session.queued.append(delivered)


def _at(message: Message, qos: int, *, retain: bool) -> Message:
    return Message(message.topic, message.payload, qos, retain, message.response_topic, message.correlation_data)


@dataclass(frozen=True, slots=True)
class MemoryLinks:
    """``base.Links`` to a :class:`MemoryBroker`."""

    broker: MemoryBroker
    url: BrokerURL

    def open(
        self,
        *,
        client_id: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        protocol: MqttVersion = "3.1.1",
        timeout: float = 10.0,
        persistent: bool = False,
    ) -> MemoryLink:
        if persistent and not client_id:
            raise ConfigError("a persistent session needs a stable client id")
        return MemoryLink(self.broker, client_id=client_id, will=will, persistent=persistent)


class MemoryLink:
    """One session with a :class:`MemoryBroker` (a ``base.Link``)."""

    #: correlation data is carried, as MQTT 5 carries it
    mqtt5 = True

    def __init__(self, broker: MemoryBroker, *, client_id: str | None, will: Will | None, persistent: bool) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.persistent = persistent
        self._session: _Session | None = None
        self._inbox: asyncio.Queue[Message | object] = asyncio.Queue()
        self._ended: str | None = None
        #: filters unsubscribed with drop_pending: what is still queued for them is not read
        self._dropped: set[str] = set()

    async def __aenter__(self) -> Self:
        if self._session is not None or self._ended is not None:
            raise ConfigError("a memory link is opened once")
        self.broker._attach(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A clean close, as a DISCONNECT: the Will is not published.
        self._end("the link was closed", will=False)

    def _end(self, why: str, *, will: bool) -> None:
        if self._ended is not None:
            return
        self._ended = why
        self.broker._detach(self, will=will)
        self._inbox.put_nowait(_CLOSED)

    def _deliver(self, message: Message) -> None:
        if self._ended is None:
            self._inbox.put_nowait(message)

    def _live(self) -> _Session:
        if self._ended is not None or self._session is None:
            raise ConnectionLost(f"memory link {self.client_id}: {self._ended or 'not open'}")
        return self._session

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        session = self._live()
        self._dropped -= set(filters)
        self.broker._subscribe(session, filters, qos)

    async def unsubscribe(self, *filters: str, drop_pending: bool = True) -> None:
        session = self._live()
        for topic_filter in filters:
            session.filters.pop(topic_filter, None)
        if drop_pending:
            self._dropped |= set(filters)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, correlation_data: bytes | None = None
    ) -> None:
        if not is_concrete(topic):
            raise ProtocolError(f"refusing to publish to {topic[:80]!r}: not a topic every broker accepts")
        self._live()
        self.broker._publish(Message(topic, payload, qos, retain, correlation_data=correlation_data))
        # A real publish yields to the event loop; so does this, or a publishing loop would
        # starve every reader.
        await asyncio.sleep(0)

    async def messages(self) -> AsyncIterator[Message]:
        session = self._live()
        while True:
            item = await self._inbox.get()
            if item is _CLOSED:
                raise ConnectionLost(f"memory link {self.client_id}: {self._ended}")
            assert isinstance(item, Message)
            pending = [f for f in self._dropped if matches(f, item.topic)]
            if pending and not any(matches(f, item.topic) for f in session.filters):
                continue
            yield item
