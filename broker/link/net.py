"""Small socket helpers: a free loopback port, waiting for a listener, and this machine's LAN
addresses (what join tokens and the broker's certificate name)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from nova_swarm.broker.contract.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_listening(
    host: str, port: int, *, timeout: float = 15.0, exited: Callable[[], int | None] | None = None
) -> None:
    """Return once something accepts TCP connections on host:port.

    ``exited`` returns the server process's exit status once it has died, so we fail at once
    instead of waiting out the timeout.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while loop.time() < give_up:
        status = exited() if exited is not None else None
        if status is not None:
            raise ConfigError(f"the server exited with status {status} before listening on port {port} (in use?)")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise ConfigError(f"nothing listened on {host}:{port} within {timeout:.0f} s")


# ------------------------------------------------------------------ LAN interface addresses

_SIOCGIFCONF = 0x8912  # Linux ioctl numbers (linux/sockios.h)
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
# IPv6 address flags in /proc/net/if_inet6 (linux/if_addr.h): not yet usable, or on its way out.
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40


def _reachable_from_lan(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _interface_flags(sock: socket.socket, name: str) -> int | None:
    import fcntl

    request = struct.pack("16s16x", name.split(":")[0].encode()[:15])  # an alias label: its device
    try:
        return int(struct.unpack("16sH", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)[:18])[1])
    except OSError:
        return None  # gone since it was listed


def _linux_ipv4() -> list[str]:
    """Every IPv4 address of every up, non-loopback interface, secondary ones included
    (SIOCGIFCONF, what ``ifconfig`` reads; SIOCGIFADDR would give one per interface)."""
    import array
    import fcntl

    # struct ifreq: 16 bytes of name, then a union the size of struct ifmap (24 on 64-bit).
    size = 40 if struct.calcsize("P") == 8 else 32
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        slots = 64
        while True:
            buf = array.array("B", bytes(size * slots))
            request = struct.pack("iP", len(buf), buf.buffer_info()[0])
            used = int(struct.unpack("iP", fcntl.ioctl(sock.fileno(), _SIOCGIFCONF, request))[0])
            if used < len(buf):
                break
            slots *= 2  # it filled the buffer: there may be more
        data = buf.tobytes()[:used]
        for offset in range(0, used, size):
            name = data[offset : offset + 16].split(b"\0", 1)[0].decode(errors="replace")
            flags = _interface_flags(sock, name)
            if flags is None or not flags & _IFF_UP or flags & _IFF_LOOPBACK:
                continue
            found.append(socket.inet_ntoa(data[offset + 20 : offset + 24]))  # sockaddr_in's address
    return found


def _linux_ipv6() -> list[str]:
    """IPv6 addresses of up interfaces, from /proc/net/if_inet6 (the kernel's own table)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []  # IPv6 disabled
    up = set(_up_interfaces())
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[5] not in up:
            continue
        if int(fields[4], 16) & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED | _IFA_F_DEPRECATED):
            continue
        found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def _up_interfaces() -> list[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return [name for _, name in socket.if_nameindex() if (_interface_flags(sock, name) or 0) & _IFF_UP]


def _psutil_addresses() -> list[str] | None:
    try:
        import psutil
    except ImportError:
        return None
    stats = psutil.net_if_stats()
    return [
        str(a.address).split("%")[0]
        for name, addrs in psutil.net_if_addrs().items()
        if name in stats and stats[name].isup
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    ]


def _default_route_source() -> str | None:
    """The address this machine sends from on its default route. A UDP connect only looks the
    route up; no packet leaves. None when there is no default route (an isolated LAN)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: never a real peer
        except OSError:
            return None
        return str(sock.getsockname()[0])


def lan_addresses() -> list[str]:
    """This machine's addresses that other devices on the LAN can reach, best first.

    Never loopback or link-local, and only from interfaces that are up. The source address of
    the default route comes first (on a laptop with Docker that is Wi-Fi, not docker0), then
    private IPv4 (home networks), then other IPv4, then IPv6.
    """
    found: list[str] = []
    if sys.platform.startswith(("linux", "android")):
        try:
            found = _linux_ipv4() + _linux_ipv6()
        except OSError:  # an ioctl a sandbox forbids (Android's SELinux, some containers)
            found = []
    preferred = _default_route_source()
    if not found:
        found = (_psutil_addresses() or []) + ([preferred] if preferred else [])
    found = [a for a in dict.fromkeys(found) if _reachable_from_lan(a)]

    def rank(address: str) -> tuple[int, int]:
        ip = ipaddress.ip_address(address)
        if address == preferred:
            return (0, 0)
        return (1, 0 if ip.version == 4 and ip.is_private else 1 if ip.version == 4 else 2)

    return sorted(found, key=rank)


def lan_ipv4_addresses() -> list[str]:
    """:func:`lan_addresses`, IPv4 only: what a wildcard IPv4 listener is reached at, and all
    that discovery announces and asks on."""
    return [a for a in lan_addresses() if ipaddress.ip_address(a).version == 4]


def mdns_name() -> str:
    """The name this machine is announced by on the LAN (mDNS/DNS-SD): ``<hostname>.local``."""
    return socket.gethostname().split(".")[0] + ".local"
