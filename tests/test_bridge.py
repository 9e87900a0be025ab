"""The shipped Mosquitto bridge, with real Mosquitto twice: the swarm's broker (Mosquitto mode,
`--bridge deploy/mosquitto/bridge.conf`) and a central broker, as a site owner would run them.

Metrics and state reach the central broker under the site prefix, and a prompt published
centrally with `mosquitto_pub` is answered back there.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nova_swarm.broker.contract.messages import Answer, HubMetrics, NodeMetrics
from nova_swarm.broker.home import SwarmHome
from nova_swarm.broker.link.net import free_port, wait_listening
from nova_swarm.node import FakeEngine

from .conftest import hub_config, nodes_available, require_mosquitto, running_hub, running_node, start_broker

pytestmark = pytest.mark.mosquitto

BRIDGE = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "bridge.conf"
SITE = "sites/site1/"


@pytest.fixture
def central(tmp_path: Path) -> Iterator[int]:
    """A plain Mosquitto, as the owner's central broker (anonymous, loopback only)."""
    require_mosquitto()
    port = free_port()
    conf = tmp_path / "central.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    log = (tmp_path / "central.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_listening("127.0.0.1", port, exited=proc.poll))
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def rendered_bridge(tmp_path: Path, central_port: int) -> Path:
    """The shipped file, pointed at this test's central broker: only the address changes."""
    text = BRIDGE.read_text()
    assert "address 127.0.0.1:1884" in text
    out = tmp_path / "bridge.conf"
    out.write_text(text.replace("address 127.0.0.1:1884", f"address 127.0.0.1:{central_port}"))
    return out


def lines_from(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        topic, _, payload = line.partition(" ")
        out.append((topic, payload))
    return out


async def test_metrics_go_out_to_the_central_broker_and_prompts_come_back_in(
    central: int, home: SwarmHome, tmp_path: Path
) -> None:
    site = await start_broker("mosquitto", home, tmp_path, extra=("--bridge", str(rendered_bridge(tmp_path, central))))
    watched = tmp_path / "central-sub.txt"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(central), "-t", f"{SITE}#", "-v", "-W", "120"],
        stdout=watched.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        async with (
            running_hub(site, hub_config(tmp_path, metrics_interval_s=0.5)) as hub,
            running_node(site, FakeEngine(reply=lambda p: "Four."), "n1"),
        ):
            await nodes_available(hub, 1)
            want = {f"{SITE}swarm/main/metrics/hub", f"{SITE}swarm/main/metrics/node/n1"}
            want |= {f"{SITE}swarm/main/metrics/tokens_per_s", f"{SITE}swarm/main/node/n1/heartbeat"}
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 60
            while not want <= {topic for topic, _ in lines_from(watched)}:
                assert loop.time() < give_up, f"never arrived centrally: {want - {t for t, _ in lines_from(watched)}}"
                await asyncio.sleep(0.3)

            # Asked from the central broker, by someone who never touches the site's broker.
            pub = await asyncio.to_thread(
                subprocess.run,
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(central), "-q", "1"]
                + ["-t", f"{SITE}swarm/main/prompt", "-m", "What is 2+2?"],
                capture_output=True,
                text=True,
            )
            assert pub.returncode == 0, pub.stderr
            reply_topic = f"{SITE}swarm/main/reply/default"
            while not any(topic == reply_topic for topic, _ in lines_from(watched)):
                assert loop.time() < give_up, "the centrally published prompt was never answered centrally"
                await asyncio.sleep(0.3)
    finally:
        sub.terminate()
        sub.wait(10)
        site.stop()

    seen = lines_from(watched)
    answer = Answer.model_validate_json(next(p for t, p in seen if t == reply_topic))
    assert answer.text == "Four." and answer.node_id == "n1"
    hub_metrics = [json.loads(p) for t, p in seen if t == f"{SITE}swarm/main/metrics/hub"]
    assert all(set(m) == set(HubMetrics.model_fields) for m in hub_metrics)
    node_metrics = [json.loads(p) for t, p in seen if t == f"{SITE}swarm/main/metrics/node/n1"]
    assert all(set(m) == set(NodeMetrics.model_fields) for m in node_metrics)
    # Only what the bridge forwards, and all of it under the site prefix.
    assert all(t.startswith(f"{SITE}swarm/main/") for t, _ in seen)
    assert not any(t.endswith(("/task", "/result", "/cancel")) for t, _ in seen)
