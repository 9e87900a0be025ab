"""What a reconnecting owner publishes: sent on the link it has now, or held for the next one.

The hub's replies and the node's results must never be dropped because the broker was away for
a moment. Their owner attaches each new link once it has subscribed, which sends everything
held, oldest first, and detaches it when the session ends:

    await outbox.attach(link)
    try:
        ...                       # outbox.send(...) from anywhere meanwhile
    finally:
        outbox.detach()
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import structlog

from nova_swarm.broker.contract.errors import ConnectionLost, ProtocolError
from nova_swarm.broker.link.base import Link

log = structlog.get_logger("nova_swarm.outbox")


@dataclass(frozen=True, slots=True)
class _Held:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None


class Outbox:
    def __init__(self) -> None:
        #: the link messages go out on now; None while there is none
        self.link: Link | None = None
        self._held: deque[_Held] = deque()

    def __len__(self) -> int:
        """How many messages wait for a link."""
        return len(self._held)

    async def send(self, topic: str, payload: bytes, *, retain: bool = False, correlation: bytes | None = None) -> None:
        """Publish at QoS 1 now, or hold the message for the next link: nothing is dropped."""
        tried = None
        while (link := self.link) is not None and link is not tried:
            try:
                await link.publish(topic, payload, qos=1, retain=retain, correlation_data=correlation)
                return
            except ConnectionLost:
                # A publish on a link that died can take its whole timeout to fail; a link that
                # came up meanwhile has sent what was held already: try it, or this message
                # would wait for the reconnect after next.
                tried = link
            except ProtocolError as exc:
                # Every topic we publish to is built by topics.py: this is a bug, and no broker
                # would take the message.
                log.error("dropped a message no broker would accept", topic=topic[:80], error=str(exc))
                return
        if tried is not None:
            log.warning("message held until the broker is back", topic=topic)
        self._held.append(_Held(topic, payload, retain, correlation))

    async def attach(self, link: Link) -> None:
        """Send what waited, in order, then publish on ``link`` from now on. A ``ConnectionLost``
        meanwhile leaves the rest held for the next link."""
        while self._held:
            held = self._held[0]
            await link.publish(held.topic, held.payload, qos=1, retain=held.retain, correlation_data=held.correlation)
            self._held.popleft()
        self.link = link

    def detach(self) -> None:
        self.link = None
