"""What a node says about itself, built from its state. No I/O.

The announce (retained) says who the node is and what it can serve; the status (retained)
whether it takes work and how it stands with the pins; the heartbeat, every few seconds, how it
is doing; the Home Assistant discovery payload describes it as a device. ``agent.py`` sends them.
"""

from __future__ import annotations

import time
from typing import get_args

from nova_swarm.broker.contract.messages import (
    Announce,
    Capability,
    Heartbeat,
    ModelInfo,
    NodeState,
    PinReport,
    Status,
)
from nova_swarm.broker.contract.version import __version__

from . import homeassistant
from .config import NodeConfig
from .execution import Executor
from .model_set import ModelSet
from .sensors import Reading

#: what a node may announce (``messages.Capability``); an engine's other claims are not ours to pass on
CAPABILITIES = frozenset(get_args(Capability))


def announce(config: NodeConfig, models: ModelSet, *, tokens_per_s: float, reading: Reading) -> Announce:
    """``tokens_per_s``: what the node measured at start (``execution.profile``)."""
    info = models.current_info()
    return Announce(
        node_id=config.node_id,
        model=ModelInfo(name=info.name, sha256=info.sha256, size_bytes=info.size_bytes, ctx=info.ctx),
        threads=info.threads,
        tokens_per_s=round(tokens_per_s, 2),
        ram_total_mb=reading.ram_total_mb,
        device=config.device,  # type: ignore[arg-type]
        tags=list(config.tags),
        agent_version=__version__,
        slots=config.slots,
        queue_max=config.queue_max,
        max_tokens=config.max_tokens,
        max_temperature=config.max_temperature,
        ts=time.time(),
        capabilities=sorted(c for c in info.capabilities if c in CAPABILITIES),  # type: ignore[misc]
        progress_s=config.progress_s,
        models=models.announced(),
        ram_budget_bytes=models.policy.budget_bytes,
    )


def heartbeat(
    config: NodeConfig,
    reading: Reading,
    executor: Executor,
    *,
    busy: int,
    queued: int,
    paused: bool,
    pauses: int,
    swaps: int,
) -> Heartbeat:
    return Heartbeat(
        node_id=config.node_id,
        ts=time.time(),
        battery_pct=reading.battery_pct,
        charging=reading.charging,
        temp_c=reading.temp_c,
        ram_free_mb=reading.ram_free_mb,
        load=reading.load,
        tokens_per_s=executor.recent_tokens_per_s,
        busy=busy,
        slots=config.slots,
        queued=queued,
        tokens_served=executor.tokens_served,
        tasks_done=executor.tasks_done,
        tasks_failed=executor.tasks_failed,
        paused=paused,
        pauses=pauses,
        swaps=swaps,
    )


def status(
    config: NodeConfig, state: NodeState, reason: str | None, bundle: PinReport | None, model_pin: PinReport | None
) -> Status:
    return Status(
        node_id=config.node_id, state=state, reason=reason, ts=time.time(), bundle=bundle, model_pin=model_pin
    )


def discovery(config: NodeConfig) -> tuple[str, bytes]:
    """The node as a Home Assistant device: topic and retained payload, sent after every connect
    and every Home Assistant start."""
    payload = homeassistant.discovery_payload(
        node_id=config.node_id, swarm=config.swarm, version=__version__, heartbeat_s=config.heartbeat_s
    )
    return config.home_assistant.topics.device_config(config.node_id), homeassistant.encode(payload)
