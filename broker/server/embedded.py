"""The embedded amqtt broker, hardened and on loopback by default.

It runs in its own process (``swarm-broker``, or a child of ``swarm-hub up``): amqtt shares its
event loop with whatever embeds it, and inference must never delay a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.limits import SESSION_EXPIRY_S, BrokerLimits
from nova_swarm.broker.passwords import FileWatch, LoginCheck
from nova_swarm.broker.server.tls import RECHECK_S, TLSFiles
from nova_swarm.broker.server.tls import watch as watch_certificate

log = structlog.get_logger("nova_swarm.broker")


@dataclass(frozen=True, slots=True)
class EmbeddedBrokerConfig:
    host: str
    port: int
    swarm: str
    password_file: Path
    #: TLS only when set: no plaintext listener at all
    tls: TLSFiles | None = None
    #: packet size, queue depth and CONNECT timeout (hardened.py applies them)
    limits: BrokerLimits = BrokerLimits()
    #: seconds between checks that the certificate still names every address we are reached by
    tls_recheck_s: float = RECHECK_S


def amqtt_config(config: EmbeddedBrokerConfig) -> dict[str, Any]:
    """An explicit plugin set: auth, ACL, nothing else (the defaults cost ~35 % of throughput)."""
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{config.host}:{config.port}"}
    if config.tls is not None:
        listener.update(ssl=True, certfile=str(config.tls.cert), keyfile=str(config.tls.key))
    return {
        "listeners": {"default": listener},
        # The hub's persistent session outlives a restart, not a hub gone for good (limits.py).
        "session_expiry_interval": SESSION_EXPIRY_S,
        "plugins": {
            "nova_swarm.broker.server.plugins.PasswordAuth": {"password_file": str(config.password_file)},
            "nova_swarm.broker.server.plugins.TopicACL": {"swarm": config.swarm},
        },
    }


async def serve(config: EmbeddedBrokerConfig, *, on_ready: Callable[[], None] | None = None) -> None:
    """Run the broker until cancelled."""
    from amqtt.errors import BrokerError

    from nova_swarm.broker.server.hardened import HardenedBroker

    # amqtt logs every connection at INFO through stdlib logging; keep its chatter at WARNING.
    # HardenedBroker logs each connection's end itself, in one line: amqtt's own warnings about
    # a peer (with a traceback, for a reset) are noise a peer can produce at will.
    logging.getLogger("amqtt").setLevel(logging.ERROR)

    logins = FileWatch(config.password_file)  # before the broker first reads the file
    broker = HardenedBroker(amqtt_config(config), limits=config.limits)
    # A failed start is reported once, by the ConfigError below; amqtt's own line about it
    # ("Broker startup failed", with the bind error's traceback) would only say it twice.
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    try:
        await broker.start()
    except BrokerError as exc:
        hint = " (is another broker, such as Debian's mosquitto service, on that port? pick another with --port)"
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.__cause__ or exc}{hint}") from exc
    finally:
        logging.getLogger("amqtt").setLevel(logging.ERROR)
    log.info(
        "broker listening",
        engine="amqtt",
        host=config.host,
        port=config.port,
        swarm=config.swarm,
        tls=config.tls is not None,
        max_packet_bytes=config.limits.max_packet_bytes,
        max_queued_messages=config.limits.max_queued_messages,
        connect_timeout_s=config.limits.connect_timeout_s,
    )
    if on_ready is not None:
        on_ready()
    check = LoginCheck(config.password_file)
    try:
        async with asyncio.TaskGroup() as tg:
            if config.tls is not None:

                def reload(files: TLSFiles) -> None:
                    broker.reload_certificate(files.cert, files.key)

                # The addresses we are reached by can change while we run (another network).
                tg.create_task(watch_certificate(config.tls, config.host, reload, every_s=config.tls_recheck_s))
            # Enrolments, rotations and revocations land in the password file: apply them to the
            # clients already connected, as Mosquitto does on SIGHUP.
            async for _ in logins:
                check.reload()
                dropped = await broker.drop_stale_logins(check)
                log.info("password file changed", dropped=dropped)
    finally:
        await broker.shutdown()
        log.info("broker stopped", engine="amqtt")
