"""Small socket helpers for starting servers: a free loopback port, and waiting for a listener."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from .errors import ConfigError


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
