"""`up` as a process supervisor: the broker and the local node run as child processes it stops in order."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nova_swarm.broker.home import LocalSwarm, SwarmHome

from ..hub import Hub


def child_env(home: SwarmHome) -> dict[str, str]:
    """The children find the swarm through its config dir, whichever --config-dir `up` got."""
    return {**os.environ, "NOVA_SWARM_HOME": str(home.path)}


def child_log_flags(args: argparse.Namespace) -> list[str]:
    """`up`'s log flags, passed on to each child."""
    flags = ["--log-level", args.log_level] + (["--log-json"] if args.log_json else [])
    flags += ["--no-log-file"] if args.no_log_file else []  # each child keeps its own file otherwise
    return flags


# Children get their own session, so a Ctrl-C reaches only us and we stop them in order:
# the hub drains first (it needs the node), then the node, then the broker.


def start_broker(
    local: LocalSwarm, *, bridge: Path | None, env: dict[str, str], log_flags: list[str]
) -> subprocess.Popen[bytes]:
    """The broker ``local`` describes, as a child process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nova_swarm.broker",
            "--engine",
            local.engine,
            "--host",
            local.host,
            "--port",
            str(local.port),
            "--swarm",
            local.swarm,
            *(["--tls"] if local.tls else []),
            *(["--bridge", str(bridge.resolve())] if bridge else []),
            *log_flags,
        ],
        env=env,
        start_new_session=True,
    )


def start_node(
    args: argparse.Namespace, local: LocalSwarm, *, env: dict[str, str], log_flags: list[str]
) -> subprocess.Popen[bytes]:
    """The local node, with `up`'s node flags, as a child process."""
    node_cmd = [sys.executable, "-m", "nova_swarm.node", "run", "--port", str(local.port)]
    node_cmd += ["--heartbeat", str(args.heartbeat_interval), *log_flags]
    node_cmd += ["--home-assistant"] if args.home_assistant else []
    for flag, value in (("--model", args.model), ("--node-id", args.node_id), ("--threads", args.threads)):
        if value is not None:
            node_cmd += [flag, str(value)]
    return subprocess.Popen(node_cmd, env=env, start_new_session=True)


async def node_started(
    node: subprocess.Popen[bytes], hub: Hub, hub_task: asyncio.Task[None], node_id: str | None, since: float
) -> int | None:
    """Wait until the local node is heard at the hub (or the hub stops); the node's exit status
    when it exits first. Without --node-id the node picks its own id, so any node heard since it
    was started counts: on a fresh `up` that is it."""
    while not hub_task.done():
        status = node.poll()
        if status is not None:
            return status
        for record in hub.registry.nodes.values():
            if (node_id is None or record.node_id == node_id) and (record.last_seen or 0.0) >= since:
                return None
        await asyncio.sleep(0.1)
    return None


async def stop_child(child: subprocess.Popen[bytes], grace: float = 40.0) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        if child.poll() is None:
            child.kill()
            child.wait()
