"""LAN discovery (DNS-SD over mDNS): the hub announces its swarm, a node finds it by name.

The hub registers one service of type ``_nova-swarm._tcp.local.``::

    instance   "<swarm> on <hostname>"            (zeroconf appends " (2)" on a clash)
    SRV        <hostname>.local.  port = the broker's port
    A          the LAN addresses the broker listens on (never 127.x)
    TXT        txtvers=1  swarm=<id>  tls=0|1  engine=amqtt|mosquitto  key=<hub key id>  [gw=<port>]

``key`` is the key id (:attr:`PublicKey.key_id`) of the hub's signing key, which every join token
carries: a node takes only the announcement whose swarm *and* key match its token, so two swarms
both called "main" on one Wi-Fi never get mixed up. mDNS itself is unauthenticated (anyone on the
LAN can announce anything); what proves the broker is the swarm's is the CA pinned in the token
(``--tls``). Without TLS a LAN attacker could redirect a node, as with any plaintext LAN service.

Only IPv4 is announced: the addresses a phone on Wi-Fi reaches and the certificate names; zeroconf
binds to exactly the addresses given (``interfaces=``), so nothing is sent on other interfaces.

Zeroconf's and the socket layer's errors become :class:`DiscoveryError` here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import structlog
from zeroconf import BadTypeInNameException, IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from nova_swarm.broker.contract.errors import ConfigError, DiscoveryError, ProtocolError
from nova_swarm.broker.contract.signing import PublicKey
from nova_swarm.broker.contract.topics import check_id
from nova_swarm.broker.home import Joined
from nova_swarm.broker.link import net
from nova_swarm.broker.link.url import BrokerURL

SERVICE_TYPE = "_nova-swarm._tcp.local."
TXT_VERSION = "1"
#: how long a node waits for the swarm to answer by default: mDNS responders answer within
#: 20-120 ms of a query and the browser re-asks at 1 s and 3 s, so 5 s covers a lost packet or two.
DEFAULT_TIMEOUT_S = 5.0
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes "²"
_ENGINES = ("amqtt", "mosquitto")
# Zeroconf's own errors, plus the socket errors it lets through (no multicast route, port taken).
_FOREIGN = (ZeroconfError, OSError)

log = structlog.get_logger("nova_swarm.discovery")


@dataclass(frozen=True, slots=True)
class Announcement:
    """What the hub tells the LAN about its swarm, and where."""

    swarm: str
    port: int
    tls: bool
    engine: str
    #: :attr:`PublicKey.key_id` of the hub's signing key
    key_id: str
    #: IPv4 addresses the broker is reached at; zeroconf binds to these alone
    addresses: tuple[str, ...]
    #: the HTTP gateway's port, when it listens beyond loopback
    gateway_port: int | None = None
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])

    @property
    def instance(self) -> str:
        # A DNS-SD instance label is at most 63 bytes; the swarm id leads, so it survives the cut.
        return f"{self.swarm} on {self.hostname}".encode()[:63].decode(errors="ignore")

    @property
    def server(self) -> str:
        return f"{self.hostname}.local."


@dataclass(frozen=True, slots=True)
class Found:
    """One swarm's announcement, as a node read it."""

    instance: str
    swarm: str
    port: int
    tls: bool
    engine: str
    key_id: str
    addresses: tuple[str, ...]
    server: str | None = None
    gateway_port: int | None = None


def encode_txt(announcement: Announcement) -> dict[str, str]:
    """The TXT record's key=value pairs (DNS-SD keys are short: at most 9 characters)."""
    txt = {
        "txtvers": TXT_VERSION,
        "swarm": announcement.swarm,
        "tls": "1" if announcement.tls else "0",
        "engine": announcement.engine,
        "key": announcement.key_id,
    }
    if announcement.gateway_port is not None:
        txt["gw"] = str(announcement.gateway_port)
    return txt


def decode_txt(properties: Mapping[bytes, bytes | None] | Mapping[str, str | None]) -> dict[str, object]:
    """Swarm, tls, engine, key id and gateway port from a TXT record; ``ProtocolError`` says what
    is wrong with one that is not ours or is damaged. Unknown keys are ignored (later versions may
    add some)."""
    txt: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            value = raw_value.decode() if isinstance(raw_value, bytes) else raw_value
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"TXT record is not UTF-8: {exc}") from exc
        if value is not None:
            txt[key.lower()] = value
    if txt.get("txtvers") != TXT_VERSION:
        raise ProtocolError(f"TXT version {txt.get('txtvers')!r} is not {TXT_VERSION!r}")
    missing = [k for k in ("swarm", "tls", "engine", "key") if k not in txt]
    if missing:
        raise ProtocolError(f"TXT record lacks {', '.join(missing)}")
    try:
        # Matched whole here as well: check_id's `$` would let a trailing newline through.
        if txt["swarm"] != txt["swarm"].strip():
            raise ConfigError(f"swarm id {txt['swarm']!r} has surrounding whitespace")
        check_id(txt["swarm"], what="swarm id")
    except ConfigError as exc:
        raise ProtocolError(f"TXT record: {exc}") from exc
    if txt["tls"] not in ("0", "1"):
        raise ProtocolError(f"TXT tls={txt['tls']!r}: want 0 or 1")
    if txt["engine"] not in _ENGINES:
        raise ProtocolError(f"TXT engine={txt['engine']!r}: want one of {', '.join(_ENGINES)}")
    if not _KEY_ID.fullmatch(txt["key"]):
        raise ProtocolError(f"TXT key={txt['key']!r}: want a 16-hex-digit hub key id")
    gateway_port = None
    if "gw" in txt:
        if not _PORT.fullmatch(txt["gw"]) or not 0 < int(txt["gw"]) < 65536:
            raise ProtocolError(f"TXT gw={txt['gw']!r}: want a port number")
        gateway_port = int(txt["gw"])
    return {
        "swarm": txt["swarm"],
        "tls": txt["tls"] == "1",
        "engine": txt["engine"],
        "key_id": txt["key"],
        "gateway_port": gateway_port,
    }


def check(found: Found, *, swarm: str, key: PublicKey) -> None:
    """Pass when ``found`` is the swarm a token names; ``DiscoveryError`` says why not."""
    if found.swarm != swarm:
        raise DiscoveryError(f"{found.instance!r} announces swarm {found.swarm!r}, not {swarm!r}")
    if found.key_id != key.key_id:
        raise DiscoveryError(
            f"{found.instance!r} announces swarm {swarm!r} with hub key {found.key_id}, but your token's is"
            f" {key.key_id}: another swarm of the same name"
        )
    if not found.addresses:
        raise DiscoveryError(f"{found.instance!r} announces no IPv4 address")


def beyond_loopback(listen_host: str) -> bool:
    """Whether a broker listening on ``listen_host`` can be reached from other devices."""
    if listen_host in ("0.0.0.0", "", "::"):
        return True
    return bool(announce_addresses(listen_host))


def announce_addresses(listen_host: str) -> list[str]:
    """The IPv4 addresses to announce for a broker listening on ``listen_host``: none for
    loopback (nothing else could reach it), every LAN address for a wildcard."""
    if listen_host in ("0.0.0.0", "", "::"):
        return net.lan_ipv4_addresses()
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(listen_host))
        except OSError:
            return []
    if address.version != 4 or address.is_loopback or address.is_unspecified:
        return []
    return [str(address)]


def browse_addresses() -> list[str]:
    """This machine's IPv4 LAN addresses: where a node asks (never loopback)."""
    addresses = net.lan_ipv4_addresses()
    if not addresses:
        raise DiscoveryError("no network interface with an IPv4 LAN address is up: join the Wi-Fi first")
    return addresses


@asynccontextmanager
async def _zeroconf(interfaces: Sequence[str], *, unicast: bool = False) -> AsyncIterator[AsyncZeroconf]:
    try:
        aiozc = AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only, unicast=unicast)
    except _FOREIGN as exc:
        raise DiscoveryError(f"mDNS cannot start on {', '.join(interfaces)}: {exc}") from exc
    try:
        yield aiozc
    finally:
        await aiozc.async_close()  # says goodbye for anything registered, then closes the sockets


@asynccontextmanager
async def announced(announcement: Announcement) -> AsyncIterator[str]:
    """Announce the swarm for as long as the block runs; yields the instance name registered."""
    if not announcement.addresses:
        raise DiscoveryError("no LAN address to announce: the broker listens on loopback only, or no network is up")
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{announcement.instance}.{SERVICE_TYPE}",
        port=announcement.port,
        properties=encode_txt(announcement),
        server=announcement.server,
        parsed_addresses=list(announcement.addresses),
    )
    async with _zeroconf(announcement.addresses) as aiozc:
        try:
            # The first await registers; the second waits until the announcements went out.
            await (await aiozc.async_register_service(info, allow_name_change=True))
        except (NonUniqueNameException, BadTypeInNameException, *_FOREIGN) as exc:
            raise DiscoveryError(f"cannot announce swarm {announcement.swarm!r}: {exc}") from exc
        yield info.name.removesuffix(f".{SERVICE_TYPE}")


class Announcer:
    """Keeps the swarm announced while :meth:`run` runs, until :meth:`stop`.

    The addresses are read again every ``check_every_s`` seconds: a new DHCP lease or Wi-Fi
    coming back is announced anew (with a goodbye for the old), and a hub that starts before
    the Wi-Fi is up, or where mDNS cannot start yet, is announced once it can be. Problems are
    logged, never raised: join tokens carry an address, so the swarm works without discovery.
    """

    def __init__(self, announcement: Announcement, *, listen_host: str, check_every_s: float = 5.0) -> None:
        self.announcement = announcement
        self.listen_host = listen_host
        self.check_every_s = check_every_s
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    def _addresses(self) -> tuple[str, ...]:
        return tuple(announce_addresses(self.listen_host))

    async def run(self) -> None:
        last_problem: str | None = None  # each problem is logged once, not every few seconds
        while not self._stop.is_set():
            current = replace(self.announcement, addresses=self._addresses())
            try:
                async with announced(current) as name:
                    last_problem = None
                    log.info(
                        "announced on the LAN", name=name, addresses=",".join(current.addresses), port=current.port
                    )
                    while not await self._stopped_within(self.check_every_s):
                        if self._addresses() != current.addresses:
                            log.info("LAN addresses changed; announcing again", was=",".join(current.addresses))
                            break
                continue
            except DiscoveryError as exc:
                if str(exc) != last_problem:
                    last_problem = str(exc)
                    log.warning("not announced on the LAN yet", reason=last_problem, retry_every_s=self.check_every_s)
            if await self._stopped_within(self.check_every_s):
                return


async def _resolve(aiozc: AsyncZeroconf, name: str) -> Found:
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    if not await info.async_request(aiozc.zeroconf, 3000):
        raise DiscoveryError(f"{name!r} did not answer")
    fields = decode_txt(info.properties)
    if info.port is None:
        raise ProtocolError(f"{name!r} has no port")
    return Found(
        instance=name.removesuffix(f".{SERVICE_TYPE}"),
        port=info.port,
        addresses=tuple(info.parsed_addresses(IPVersion.V4Only)),
        server=info.server,
        **fields,  # type: ignore[arg-type]
    )


async def find(
    swarm: str, key: PublicKey, *, timeout: float = DEFAULT_TIMEOUT_S, interfaces: Sequence[str] | None = None
) -> Found:
    """The announcement of swarm ``swarm`` whose hub key is ``key``, asked on ``interfaces``
    (default: every IPv4 LAN address). ``DiscoveryError`` after ``timeout`` seconds says what was
    seen instead, if anything."""
    names: asyncio.Queue[str] = asyncio.Queue()
    seen: list[str] = []

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Called on our loop by zeroconf's engine; the resolving happens in find's own body.
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)

    # Asked from an ephemeral port, so the hub answers by unicast (RFC 6762 6.7): Android drops
    # multicast for apps that hold no Wi-Fi multicast lock, and Termux holds none. Nothing
    # listens on port 5353 here either, so it works beside avahi or another responder.
    async with _zeroconf(interfaces or browse_addresses(), unicast=True) as aiozc:
        try:
            browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        except _FOREIGN as exc:
            raise DiscoveryError(f"cannot browse for swarms: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                while True:
                    name = await names.get()
                    try:
                        found = await _resolve(aiozc, name)
                        check(found, swarm=swarm, key=key)
                    except (DiscoveryError, ProtocolError) as exc:
                        seen.append(str(exc))
                        continue
                    except _FOREIGN as exc:
                        seen.append(f"{name!r}: {exc}")
                        continue
                    return found
        except TimeoutError:
            pass
        finally:
            await browser.async_cancel()
    others = "; seen instead: " + "; ".join(seen) if seen else ""
    raise DiscoveryError(
        f"no swarm {swarm!r} with hub key {key.key_id} answered on the LAN within {timeout:g} s"
        f" (is the hub up beyond loopback, without --no-discovery, and this device on the same network?){others}"
    )


async def answers(host: str, port: int, *, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port now."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the close itself failing says nothing about reachability
    return True


async def locate(joined: Joined, *, timeout: float = DEFAULT_TIMEOUT_S) -> Joined:
    """``joined`` pointed at where its swarm announces itself now (and marked to be found by
    discovery from then on): the first announced address that answers."""
    if not joined.hub_key:
        raise DiscoveryError(
            "this token carries no hub key, so discovery cannot tell your swarm from another:"
            " make a new one with `swarm-hub enroll NODE`"
        )
    url = BrokerURL.parse(joined.url)
    found = await find(joined.swarm, PublicKey.parse(joined.hub_key), timeout=timeout)
    if found.tls != url.tls:
        want = "mqtts://" if url.tls else "mqtt://"
        raise DiscoveryError(
            f"swarm {found.swarm!r} at {', '.join(found.addresses)} runs {'with' if found.tls else 'without'} TLS,"
            f" but your token says {want}: make a new token with `swarm-hub enroll NODE`"
        )
    # All at once: a hub with Docker or a VPN announces addresses this device cannot reach, and
    # each of those would cost a whole timeout in turn. The first in the hub's order that answers wins.
    async with asyncio.TaskGroup() as tg:
        probes = [(address, tg.create_task(answers(address, found.port))) for address in found.addresses]
    for address, probe in probes:
        if probe.result():
            return replace(joined, url=str(replace(url, host=address, port=found.port)), discover=True)
    raise DiscoveryError(
        f"swarm {found.swarm!r} announces {', '.join(found.addresses)} port {found.port}, but none answers"
        " (a firewall on the hub's machine?)"
    )
