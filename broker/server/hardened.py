"""amqtt 0.12.1, hardened for a hostile LAN: the embedded broker's protocol boundary.

amqtt is pinned, and this module replaces the parts of it that a peer can turn against the
broker (see the team notes, BROKERS.md, and issue 21):

- **Login first.** amqtt deletes the session of a clean-session CONNECT's client id before it
  checks the password, so one refused CONNECT with the hub's id left the hub connected but deaf.
  Here a CONNECT is framed, validated (``framing.py``) and authenticated before anything touches
  another session.
- **Nothing waits for ever.** A TCP connection that sends no CONNECT is closed after
  ``BrokerLimits.connect_timeout_s``; a client silent for 1.5x its keepalive is closed
  abnormally, so its Will goes out; a takeover closes the old socket; every error path closes
  the socket, and a close that would wait on a peer that stopped reading aborts instead (no
  CLOSE-WAIT, no slot held).
- **Bounded memory.** A packet's length is checked against ``max_packet_bytes`` from its fixed
  header, before its body is read; an impossible length ends the connection once. Each
  subscriber's backlog is capped at ``max_queued_messages``: beyond that messages to it are
  dropped and counted.
- **Clean refusals.** A publish to a wildcard topic, or any malformed packet, closes the
  connection (MQTT 3.1.1 section 4.8); a publish to a ``$`` topic is dropped, as Mosquitto does.
  An MQTT 5 or 3.1 CONNECT gets CONNACK 0x01 rather than silence.
- **No tracebacks for a peer's error.** Every connection ends in one place that logs one line.

It also keeps the earlier fixes: retained messages are replayed only to a session that holds the
matching subscription (amqtt replayed them past the ACL), and fan-out walks a snapshot of the
subscription table.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from amqtt.adapters import BufferReader, ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, CodecError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from nova_swarm.broker.contract.limits import BrokerLimits
from nova_swarm.broker.passwords import LoginCheck
from nova_swarm.broker.server import framing

log = structlog.get_logger("nova_swarm.broker")

#: how long closing a connection may wait for its last bytes to leave before the socket is aborted
CLOSE_GRACE_S = 2.0
#: how long a takeover waits for the old connection's Will and clean-up before going on
TAKEOVER_WAIT_S = 2.0
#: publishes read from one client but not yet fanned out; past this we stop reading from it
INBOUND_BACKLOG = 64
#: messages waiting for fan-out across the broker; past this, clients' message loops wait
BROADCAST_BACKLOG = 1024

_HANDLERS = {
    framing.PUBLISH: "handle_publish",
    framing.PUBACK: "handle_puback",
    framing.PUBREC: "handle_pubrec",
    framing.PUBREL: "handle_pubrel",
    framing.PUBCOMP: "handle_pubcomp",
    framing.SUBSCRIBE: "handle_subscribe",
    framing.UNSUBSCRIBE: "handle_unsubscribe",
    framing.PINGREQ: "handle_pingreq",
}

#: what a peer's garbage can make amqtt's parsers raise
_PARSE_ERRORS = (AMQTTError, MQTTError, NoDataError, CodecError, ValueError, struct.error, UnicodeError)
#: what a peer that vanished makes a read or write raise
_GONE = (asyncio.IncompleteReadError, ConnectionError, NoDataError, OSError)


async def read_frame(reader: ReaderAdapter, max_bytes: int) -> tuple[int, bytes]:
    """One packet's first byte and body, its length checked before the body is read.

    ``reader.read(n)`` returns exactly n bytes or raises (amqtt's stream adapter), and a cancelled
    read consumes nothing, so a timeout around this never splits a packet.
    """
    first = (await reader.read(1))[0]
    prefix = b""
    while (length := framing.remaining_length(prefix)) is None:
        prefix += await reader.read(1)
    if length > max_bytes:
        raise framing.Malformed(f"packet of {length} bytes is over the {max_bytes}-byte limit")
    return first, (await reader.read(length) if length else b"")


async def _parse(first: int, body: bytes) -> Any:
    """amqtt's packet object for a frame ``framing.check_packet`` accepted; it must use every byte."""
    fixed = MQTTFixedHeader(first >> 4, first & 0x0F, len(body))
    reader = BufferReader(body)
    try:
        packet = await packet_class(fixed).from_stream(reader, fixed_header=fixed)
    except _PARSE_ERRORS as exc:
        raise framing.Malformed(f"unreadable packet type {first >> 4}: {exc}") from exc
    if reader._stream.tell() != len(body):
        raise framing.Malformed(f"packet type {first >> 4} has stray bytes")
    return packet


class BoundedWriter(StreamWriterAdapter):
    """amqtt's stream writer, whose close cannot hang: it waits for a peer that stopped reading
    only ``CLOSE_GRACE_S``, then aborts the socket (amqtt's close waited on ``drain()`` for ever,
    holding the file descriptor).

    It also sends what one turn of the event loop wrote in one go: amqtt writes every packet on
    its own, and a system call per packet (each publish, each acknowledgement) was the largest
    single cost of the embedded broker under load, over a quarter of its time."""

    is_closed: bool  # set by amqtt's __init__
    _pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if self._pending is None:
            self._pending = [data]
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._writer.transport.is_closing():
            self._writer.write(b"".join(pending))

    async def close(self) -> None:
        if self.is_closed:
            return
        self._flush()
        self.is_closed = True
        transport = self._writer.transport
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await self._writer.drain()
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                self._writer.close()
                await self._writer.wait_closed()
        except (TimeoutError, *_GONE):
            transport.abort()
        except asyncio.CancelledError:
            transport.abort()
            raise


class GuardedHandler(BrokerProtocolHandler):
    """amqtt's per-connection protocol handler with a reader loop that frames and checks every
    packet itself, and enforces the keepalive (amqtt's read timeout did nothing)."""

    limits: BrokerLimits = BrokerLimits()
    #: why the broker closed this connection, for the log line that ends it
    closed_because: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set when this client's inbound backlog has room again or the connection is closing,
        # so a reader held back by a stuck fan-out sleeps instead of polling.
        self._room = asyncio.Event()
        self._closing = False

    async def mqtt_deliver_next_message(self) -> Any:
        message = await super().mqtt_deliver_next_message()
        session = self.session
        if session is None or session.delivered_message_queue.qsize() < INBOUND_BACKLOG:
            self._room.set()
        return message

    async def stop(self) -> None:
        self._closing = True
        self._room.set()  # a reader waiting for room wakes up and ends
        await super().stop()

    async def _handle_message_flow(self, app_message: Any) -> None:
        """amqtt's QoS flows, except that a QoS 1 or 2 delivery cut short by the connection's end
        stays in a persistent session, to be sent again when the client is back (MQTT-4.4.0-1).

        amqtt forgot it (its ``finally`` drops the in-flight message when the ack waiter is
        cancelled), so nothing was redelivered on reconnect (upstream issue #401).
        """
        try:
            await super()._handle_message_flow(app_message)
        except asyncio.CancelledError:
            session = self.session
            if (
                session is not None
                and not session.clean_session
                and isinstance(app_message, OutgoingApplicationMessage)
                and app_message.packet_id is not None
                and app_message.puback_packet is None
                and app_message.pubcomp_packet is None
                and len(session.inflight_out) < self.limits.max_queued_messages
            ):
                session.inflight_out[app_message.packet_id] = app_message
            raise

    def _exchange_done(self, exchanges: set[asyncio.Task[None]]) -> Any:
        """The done callback of one QoS 2 exchange: forgets it and takes its error, logged once."""

        def done(task: asyncio.Task[None]) -> None:
            exchanges.discard(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                client_id = self.session.client_id if self.session is not None else "?"
                log.warning("QoS 2 exchange failed", client_id=client_id, error=f"{type(exc).__name__}: {exc}")

        return done

    async def _reader_loop(self) -> None:
        session, reader, ready = self.session, self.reader, self._reader_ready
        if session is None or reader is None or ready is None:
            raise AMQTTError("reader started before the handler was attached")
        ready.set()
        # MQTT-3.1.2-24: silent for 1.5x the keepalive means gone; 0 turns the check off.
        silence = 1.5 * session.keep_alive if session.keep_alive > 0 else None
        exchanges: set[asyncio.Task[None]] = set()  # QoS 2 publishes wait for their PUBREL
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        first, body = await read_frame(reader, self.limits.max_packet_bytes)
                    framing.check_packet(first, body)
                    packet = await _parse(first, body)
                except TimeoutError:
                    self.closed_because = f"silent for {silence:g} s, 1.5x its keepalive"
                    break
                except framing.Malformed as exc:
                    self.closed_because = str(exc)
                    break
                except _GONE:
                    break
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
                kind = first >> 4
                if kind == framing.DISCONNECT:
                    await self.handle_disconnect(packet)
                    break
                handle = getattr(self, _HANDLERS[kind])
                if kind == framing.PUBLISH and packet.qos == QOS_2:
                    # Owned by ``exchanges``: its error is taken and logged once when it ends,
                    # and it is cancelled and awaited when the connection closes.
                    task = asyncio.create_task(handle(packet))
                    exchanges.add(task)
                    task.add_done_callback(self._exchange_done(exchanges))
                else:
                    # In order, one at a time: a client that floods us waits for its own acks.
                    await handle(packet)
                if kind == framing.PUBLISH:
                    # Read no further while this client's publishes wait for fan-out: amqtt
                    # read as fast as a client sent and queued it all (a 32 MB burst grew the
                    # broker by 28 MB). The peer's own TCP window holds the rest.
                    while session.delivered_message_queue.qsize() >= INBOUND_BACKLOG and not self._closing:
                        self._room.clear()
                        await self._room.wait()
                    if self._closing:
                        break
        except asyncio.CancelledError:
            pass  # stop() ends the loop; the clean-up below still runs, as in amqtt
        except Exception as exc:  # a peer's packet must end its connection, never the broker
            self.closed_because = f"{type(exc).__name__}: {exc}"
        pending = list(exchanges)
        for task in pending:
            task.cancel()
        if pending:  # bounded: the done callback takes each one's error
            await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()


class _Snapshots(dict[str, list[tuple[Session, int]]]):
    """amqtt's subscription table, iterated over copies.

    amqtt 0.12.1 walks ``_subscriptions`` with an ``await`` inside the loop (fanning a message
    out, replaying retained messages on CONNECT). A client that subscribes or leaves meanwhile
    changes the dict: the walk dies with "dictionary changed size during iteration", and the
    message, already acknowledged to its publisher, reaches no one (8 of 3,600 replies under
    load). Walking a snapshot delivers to whoever was subscribed when the message came in.

    Fan-out looks a topic up here rather than matching it against every filter: with a
    thousand nodes, each with its own task and cancel filters, matching every one cost the broker
    most of its time per message. Only the filters with a wildcard are matched, and that list is
    worked out again only when a filter comes or goes.
    """

    def __init__(self, table: dict[str, list[tuple[Session, int]]]) -> None:
        super().__init__(table)
        self._wildcards: list[str] | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def items(self):  # type: ignore[no-untyped-def,override]
        return [(k, list(v)) for k, v in super().items()]

    # amqtt adds and removes filters with these alone (broker.py, 0.12.1).
    def __setitem__(self, key: str, value: list[tuple[Session, int]]) -> None:
        self._wildcards = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._wildcards = None
        super().__delitem__(key)

    def clear(self) -> None:
        self._wildcards = None
        super().clear()

    def matching(self, topic: str, matches: Callable[[str, str], bool]) -> list[str]:
        """The filters ``topic`` matches: itself, if subscribed to, and the wildcard ones that
        ``matches`` (amqtt's rule, with its ``$`` exception) says match it."""
        if self._wildcards is None:
            self._wildcards = [f for f in super().keys() if "+" in f or "#" in f]
        found = [f for f in self._wildcards if matches(topic, f)]
        if super().__contains__(topic):
            found.append(topic)
        return found


class HardenedBroker(Broker):
    """amqtt's broker with the defects above closed. ``limits`` bounds what one peer may ask."""

    def __init__(self, *args: Any, limits: BrokerLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or BrokerLimits()
        self._subscriptions: _Snapshots = _Snapshots(self._subscriptions)  # type: ignore[has-type]
        # Bounded, so many publishers together also wait for fan-out instead of queueing without end.
        self._broadcast_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=BROADCAST_BACKLOG)
        # Deliveries in flight. amqtt kept them in a deque it only emptied from the front, so one
        # stuck subscriber kept every later finished delivery alive: memory without bound.
        self._deliveries: set[asyncio.Task[None]] = set()
        self._backlog: dict[BrokerProtocolHandler, int] = {}
        #: messages dropped per client id because its backlog was full, kept while its session lives
        self.dropped: dict[str, int] = {}
        #: the TLS listeners' contexts, so a reissued certificate can be loaded into them
        self.ssl_contexts: list[ssl.SSLContext] = []

    # ------------------------------------------------------------------ TLS

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:  # type: ignore[override]
        # amqtt's is a staticmethod, called through self: kept here as it is made.
        context = Broker._create_ssl_context(listener)
        self.ssl_contexts.append(context)
        return context

    def reload_certificate(self, cert: Path, key: Path) -> None:
        """Serve new TLS connections with this certificate. OpenSSL copies a context's
        certificate into each connection as it starts, so those already up keep theirs."""
        for context in self.ssl_contexts:
            context.load_cert_chain(cert, key)

    # ------------------------------------------------------------------ connections

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        await self._client_connected(listener_name, StreamReaderAdapter(reader), BoundedWriter(writer))

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """One connection from accept to close. Whatever happens, the socket is closed and the
        listener's slot released here (amqtt forgot both on several error paths)."""
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"Invalid listener name '{listener_name}'")
        await server.acquire_connection()
        peer = "?"
        try:
            info = writer.get_peer_info()
            if info is None:
                return
            peer = f"{info[0]}:{info[1]}"
            admitted = await self._admit(reader, writer, peer, listener_name)
            if admitted is None:
                return
            handler, session = admitted
            await self._handle_client_session(reader, writer, session, handler, server, listener_name)
            if handler.closed_because is not None:
                log.warning("connection closed", peer=peer, client_id=session.client_id, why=handler.closed_because)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one line for a peer's error, never a traceback on the console
            log.warning("connection failed", peer=peer, error=f"{type(exc).__name__}: {exc}")
        finally:
            await writer.close()
            server.release_connection()

    async def _admit(
        self, reader: ReaderAdapter, writer: WriterAdapter, peer: str, listener_name: str
    ) -> tuple[GuardedHandler, Session] | None:
        """Read, check and authenticate the CONNECT; only then touch the client id's old session.

        None when the connection is refused (answered with a CONNACK where MQTT says to).
        """
        limits = self.limits
        try:
            async with asyncio.timeout(limits.connect_timeout_s):
                first, body = await read_frame(reader, limits.max_connect_bytes)
        except TimeoutError:
            log.warning("connection refused", peer=peer, why=f"no CONNECT within {limits.connect_timeout_s:g} s")
            return None
        except framing.Malformed as exc:
            log.warning("connection refused", peer=peer, why=str(exc))
            return None
        except _GONE:
            return None  # gone before logging in: nothing to say
        if first != 0x10:
            log.warning("connection refused", peer=peer, why=f"first packet {first:#04x} is not a CONNECT")
            return None
        try:
            connect = framing.check_connect(body)
        except framing.UnacceptableVersion as exc:
            await self._answer(writer, framing.UNACCEPTABLE_PROTOCOL_VERSION)
            log.warning("connection refused", peer=peer, why=str(exc))
            return None
        except framing.IdentifierRejected as exc:
            await self._answer(writer, framing.IDENTIFIER_REJECTED)
            log.warning("connection refused", peer=peer, why=str(exc))
            return None
        except framing.Malformed as exc:
            log.warning("connection refused", peer=peer, why=str(exc))
            return None
        raw = bytes([first]) + framing.encode_length(len(body)) + body
        handler, session = await GuardedHandler.init_from_connect(BufferReader(raw), writer, self.plugins_manager)
        handler.limits = limits
        if not await self._authenticate(session, self.listeners_config[listener_name]):
            await self._answer(writer, framing.NOT_AUTHORIZED)
            log.warning("connection refused", peer=peer, client_id=connect.client_id, why="login refused")
            return None
        if session.client_id and self._held_by_another_login(session):
            # MQTT lets the newcomer close the first connection (MQTT-3.1.4-2); between logins
            # that would let any client silence another whose id it learnt. Same login: take over.
            await self._answer(writer, framing.IDENTIFIER_REJECTED)
            log.warning("connection refused", peer=peer, client_id=connect.client_id, why="id held by another login")
            return None
        if session.client_id:
            await self._take_over(session.client_id, peer)
        # What amqtt's _initialize_client_session does after reading the CONNECT, now that the
        # login is known good.
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions and self._sessions[session.client_id][0].username != session.username:
            # Another login's persistent session is never handed over: its queue holds that
            # login's private replies. Start afresh, as Mosquitto does for a new username.
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for field in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive"):
                setattr(existing, field, getattr(session, field))
            existing.username, existing.password = session.username, session.password
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        return handler, session

    async def _answer(self, writer: WriterAdapter, return_code: int) -> None:
        """A refusing CONNACK, best effort: the peer may already be gone."""
        try:
            writer.write(framing.connack(return_code))
            async with asyncio.timeout(CLOSE_GRACE_S):
                await writer.drain()
        except (TimeoutError, *_GONE):
            pass

    def _held_by_another_login(self, session: Session) -> bool:
        """Is ``session``'s client id connected right now under a different username?"""
        current = self._sessions.get(session.client_id)
        if current is None:
            return False
        held, handler = current
        return handler is not None and held.transitions.is_connected() and held.username != session.username

    async def _take_over(self, client_id: str, peer: str) -> None:
        """A second login with a connected client id closes the first connection (MQTT-3.1.4-2).

        amqtt only forgot the old session and left its socket open. The old connection ends
        abnormally, so its Will goes out before the new one is let in.
        """
        current = self._sessions.get(client_id)
        if current is None:
            return
        old, handler = current
        if handler is None or not old.transitions.is_connected():
            return
        log.info("client id taken over", client_id=client_id, peer=peer)
        await handler.stop()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + TAKEOVER_WAIT_S
        while old.transitions.is_connected() and loop.time() < give_up:
            await asyncio.sleep(0.01)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's per-client loop, except that what a client published before it disconnected is
        still delivered: amqtt handled the disconnect first and dropped whatever was queued."""
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    await self._handle_message_delivery(client_session, handler, wait_deliver)
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter in done:
                    queued = client_session.delivered_message_queue
                    while not queued.empty():
                        message: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                        message.set_result(queued.get_nowait())
                        await self._handle_message_delivery(client_session, handler, message)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    return
        except asyncio.CancelledError:
            log.debug("client loop cancelled", client_id=client_session.client_id)
        finally:
            waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is not None and message.topic and message.topic.startswith("$"):
            # MQTT-4.7.2-1: `$` topics are the server's. Mosquitto drops such a publish and keeps
            # the connection; amqtt stopped serving the connection and left it open.
            log.debug("publish to a $ topic dropped", client_id=client_session.client_id, topic=message.topic)
            return True
        if await super()._handle_message_delivery(client_session, handler, wait_deliver):
            return True
        # amqtt gives up on the connection here without closing it; end it as MQTT says.
        await handler.handle_connection_closed()
        return True

    # ------------------------------------------------------------------ fan-out

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """amqtt's fan-out of one message, with each subscriber's backlog bounded."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        table = self._subscriptions
        for topic_filter in table.matching(topic, self._matches):
            # Only the lists of the filters that match are copied: still a walk over a snapshot.
            for target, sub_qos in list(dict.get(table, topic_filter, ())):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target.transitions.state == "connected"
                if not connected and not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    if target.retained_messages.qsize() >= self.limits.max_queued_messages:
                        self._drop(target)
                    else:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target) if connected else None
                if handler is None:
                    continue
                if self._backlog.get(handler, 0) >= self.limits.max_queued_messages:
                    self._drop(target)
                    continue
                self._backlog[handler] = self._backlog.get(handler, 0) + 1
                # Owned by self._deliveries and cancelled at shutdown (amqtt's own design spawns
                # one task per delivery; the set replaces its leaking deque).
                task = asyncio.create_task(self._deliver(handler, target, topic, broadcast["data"], qos))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self, handler: BrokerProtocolHandler, target: Session, topic: str, data: bytes, qos: int
    ) -> None:
        try:
            await handler.mqtt_publish(topic, data, qos, retain=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a subscriber that went away mid-delivery is its own problem
            log.debug("delivery failed", client_id=target.client_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            left = self._backlog.get(handler, 1) - 1
            if left:
                self._backlog[handler] = left
            else:
                self._backlog.pop(handler, None)

    def _drop(self, target: Session) -> None:
        client_id = target.client_id or "?"
        count = self.dropped[client_id] = self.dropped.get(client_id, 0) + 1
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: a stuck reader cannot flood the log
            log.warning(
                "subscriber too slow: messages dropped",
                client_id=client_id,
                dropped=count,
                queue_limit=self.limits.max_queued_messages,
            )

    # A login may invent any number of client ids, so a drop count lives only as long as its
    # session: both of amqtt's ways of forgetting a session forget the count too.

    async def _delete_session(self, client_id: str) -> None:
        self.dropped.pop(client_id, None)
        await super()._delete_session(client_id)

    async def _cleanup_session(self, client_id: str) -> None:
        self.dropped.pop(client_id, None)
        await super()._cleanup_session(client_id)

    async def _shutdown_broadcast_loop(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await super()._shutdown_broadcast_loop()

    # ------------------------------------------------------------------ retained messages, logins

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # On every CONNECT amqtt replays retained messages for *every* filter any client ever
        # subscribed to, past the ACL (BROKERS.md, defect 1): only a filter this session holds,
        # which it got past the ACL, is replayed.
        topic_filter, _ = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """What a persistent session missed while it was away, delivered as the live messages
        they were (BROKERS.md, defect 7).

        amqtt 0.12.1 keeps them in a queue it calls ``retained_messages`` and sends them with
        the retain flag set; MQTT 3.1.1 (3.3.1.3) says a message that matches an established
        subscription goes out with retain 0. The hub ignores retained prompts (a stray retained
        prompt would be re-run on every restart), so with the flag set the prompts it missed
        while restarting would be dropped instead of answered.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            send = handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
            sends.append(asyncio.ensure_future(send))
        # gather, not amqtt's wait: a send that fails (the client left again) has its error
        # taken rather than logged as never retrieved, and a cancelled replay cancels its sends.
        await asyncio.gather(*sends, return_exceptions=True)

    async def drop_stale_logins(self, check: LoginCheck) -> list[str]:
        """Disconnect every client whose login no longer passes ``check`` (revoked or rotated).

        Mosquitto does the same on SIGHUP. The disconnect counts as abnormal, so the client's
        Last Will goes out and the hub learns at once that a revoked node is gone.
        """
        dropped = []
        for client_id, (session, handler) in list(self._sessions.items()):
            if session.transitions.state != "connected" or handler is None:
                continue
            if not check(session.username, session.password):
                await handler.handle_disconnect(None)
                dropped.append(client_id)
        return dropped
