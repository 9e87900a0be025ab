"""MQTT 3.1.1 framing rules the embedded broker enforces before amqtt parses a packet (no I/O).

amqtt 0.12.1 reads whatever a peer sends: an impossible length becomes a stream of packets, a
CONNECT with Will QoS 3 or a NUL in its client id is accepted, a 256 MB publish is read into
memory. The hardened broker (``hardened.py``) frames every packet itself, asks this module whether
the frame is well formed, and only then hands it to amqtt. Anything this module rejects closes the
connection (MQTT 3.1.1 section 4.8: a protocol violation ends the network connection), except the
few cases the standard answers with a CONNACK return code.

    Malformed                  close the connection, no answer
    ├── UnacceptableVersion    CONNACK 0x01 first (an MQTT 5 or MQTT 3.1 client learns why)
    └── IdentifierRejected     CONNACK 0x02 first (an empty client id without a clean session)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14

#: CONNACK return codes (MQTT 3.1.1 table 3.1)
UNACCEPTABLE_PROTOCOL_VERSION = 0x01
IDENTIFIER_REJECTED = 0x02
NOT_AUTHORIZED = 0x05

#: the fixed flags of each packet a client may send once connected (PUBLISH's flags vary)
_CLIENT_PACKET_FLAGS = {
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
#: packets whose remaining length is fixed by the standard
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}


class Malformed(Exception):
    """The peer broke MQTT 3.1.1: close the connection."""


class UnacceptableVersion(Malformed):
    """A CONNECT for another protocol version: answer CONNACK 0x01, then close."""


class IdentifierRejected(Malformed):
    """An empty client id that asks to keep its session: answer CONNACK 0x02, then close."""


def remaining_length(prefix: bytes) -> int | None:
    """The remaining length once ``prefix`` holds its whole encoding, None while it needs more bytes.

    The encoding is at most four bytes; a fourth byte that still says "more follows" is
    impossible, and the connection ends there rather than being read as a stream of packets.
    """
    value = 0
    for index, byte in enumerate(prefix):
        value += (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value
        if index == 3:
            raise Malformed("remaining length longer than four bytes")
    return None


def encode_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connack(return_code: int) -> bytes:
    """A CONNACK refusing with ``return_code`` (session present is always 0 on a refusal)."""
    return bytes([0x20, 2, 0, return_code])


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What the hardened broker needs from a valid CONNECT before amqtt parses it."""

    client_id: str
    clean_session: bool
    keep_alive: int


class _Cursor:
    """Reads MQTT fields from a frame's body, refusing to run past its end."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.body):
            raise Malformed(f"{what} runs past the end of the packet")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(struct.unpack("!H", self.take(2, what))[0])

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(f"{what} length"), what)

    def text(self, what: str) -> str:
        return utf8(self.binary(what), what)

    def done(self, what: str) -> None:
        if self.pos != len(self.body):
            raise Malformed(f"{len(self.body) - self.pos} stray bytes after the {what}")


def utf8(raw: bytes, what: str) -> str:
    """A well-formed MQTT string: strict UTF-8 (no surrogates) and no U+0000 (MQTT-1.5.3-1, -2)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"{what} is not valid UTF-8") from exc
    if "\x00" in text:
        raise Malformed(f"{what} contains U+0000")
    return text


def check_topic_name(topic: str, what: str = "topic") -> None:
    """A topic one may publish to: not empty and without wildcards (MQTT-3.3.2-2, 4.7.3-1)."""
    if not topic:
        raise Malformed(f"empty {what}")
    if "+" in topic or "#" in topic:
        raise Malformed(f"wildcard in {what} {topic!r}")


def check_connect(body: bytes) -> ConnectInfo:
    """Validate a CONNECT's body (everything after its fixed header) as MQTT 3.1.1 requires."""
    cursor = _Cursor(body)
    name = cursor.binary("protocol name")
    level = cursor.u8("protocol level")
    if (name, level) != (b"MQTT", 4):
        if name in (b"MQTT", b"MQIsdp"):
            raise UnacceptableVersion(f"protocol level {level}: only MQTT 3.1.1 (level 4) is spoken here")
        raise Malformed(f"unknown protocol name {name[:16]!r}")
    flags = cursor.u8("connect flags")
    keep_alive = cursor.u16("keep alive")
    if flags & 0x01:
        raise Malformed("reserved connect flag set (MQTT-3.1.2-3)")
    clean = bool(flags & 0x02)
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise Malformed("Will QoS 3 (MQTT-3.1.2-14)")
    if not will and (will_qos or will_retain):
        raise Malformed("Will QoS or Will retain without a Will (MQTT-3.1.2-13, -15)")
    if has_password and not has_username:
        raise Malformed("password without a user name (MQTT-3.1.2-22)")
    client_id = cursor.text("client id")
    if will:
        check_topic_name(cursor.text("Will topic"), "Will topic")
        cursor.binary("Will message")
    if has_username:
        cursor.text("user name")
    if has_password:
        cursor.binary("password")
    cursor.done("CONNECT payload")
    if not client_id and not clean:
        raise IdentifierRejected("an empty client id needs a clean session (MQTT-3.1.3-8)")
    return ConnectInfo(client_id=client_id, clean_session=clean, keep_alive=keep_alive)


def check_packet(first_byte: int, body: bytes) -> None:
    """Validate a packet a connected client sent: its type, flags, lengths and strings.

    A second CONNECT (MQTT-3.1.0-2) or a packet only a server sends ends the connection.
    """
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind == PUBLISH:
        _check_publish(flags, body)
        return
    if kind not in _CLIENT_PACKET_FLAGS:
        raise Malformed(f"packet type {kind} is not one a connected client may send")
    if flags != _CLIENT_PACKET_FLAGS[kind]:
        raise Malformed(f"packet type {kind} with flags {flags:#x} (MQTT-2.2.2-2)")
    if kind in _FIXED_LENGTH:
        if len(body) != _FIXED_LENGTH[kind]:
            raise Malformed(f"packet type {kind} with remaining length {len(body)}")
        return
    cursor = _Cursor(body)
    if cursor.u16("packet id") == 0:
        raise Malformed("packet id 0 (MQTT-2.3.1-1)")
    if cursor.pos == len(body):
        raise Malformed("SUBSCRIBE or UNSUBSCRIBE without a topic filter (MQTT-3.8.3-3, 3.10.3-2)")
    while cursor.pos < len(body):
        if not cursor.text("topic filter"):
            raise Malformed("empty topic filter (MQTT-4.7.3-1)")
        if kind == SUBSCRIBE and cursor.u8("requested QoS") > 2:
            raise Malformed("requested QoS above 2 (MQTT-3.8.3-4)")


def _check_publish(flags: int, body: bytes) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3 (MQTT-3.3.1-4)")
    if qos == 0 and flags & 0x08:
        raise Malformed("DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2)")
    cursor = _Cursor(body)
    check_topic_name(cursor.text("topic"))
    if qos and cursor.u16("packet id") == 0:
        raise Malformed("packet id 0 (MQTT-2.3.1-1)")


def publish_topic(body: bytes) -> str:
    """The topic of a PUBLISH that ``check_packet`` accepted."""
    return _Cursor(body).text("topic")
