"""The shipped Grafana dashboard reads only what the hub publishes, where the bridge puts it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nova_swarm.broker.messages import HubMetrics, NodeMetrics
from nova_swarm.broker.topics import Topics
from nova_swarm.hub.metrics import LEDGER_TOTALS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nova-swarm.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "nova-swarm.yaml"
BRIDGE = DEPLOY / "mosquitto" / "bridge.conf"


def site_prefix() -> str:
    """Where the shipped bridge puts the swarm's topics on the central broker."""
    match = re.search(r'^topic swarm/main/metrics/# out \d "" (\S+)$', BRIDGE.read_text(), re.M)
    assert match, "the bridge forwards metrics"
    return match[1]


def test_every_panel_reads_a_published_topic_and_only_published_fields() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uid = re.search(r"^\s+uid: (\S+)$", DATASOURCE.read_text(), re.M)
    assert uid and "type: grafana-mqtt-datasource" in DATASOURCE.read_text()
    t = Topics("main")
    prefix = site_prefix()
    fan_in = {t.metrics_fan_in(name) for name in [*NodeMetrics.model_fields, "errors", *LEDGER_TOTALS]}
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["datasource"]["uid"] == uid[1]
        (target,) = panel["targets"]
        topic = target["topic"]
        assert topic.startswith(prefix), topic
        local = topic.removeprefix(prefix)
        assert "+" not in local and "#" not in local  # Grafana merges what a wildcard matches
        fields = [
            name
            for tr in panel.get("transformations", [])
            if tr["id"] == "filterFieldsByName"
            for name in tr["options"]["include"]["names"]
            if name != "Time"
        ]
        if local == t.metrics_hub():
            assert fields and set(fields) <= set(HubMetrics.model_fields), (panel["title"], fields)
        else:
            assert local in fan_in, (panel["title"], local)
            assert not fields  # a fan-in topic's fields are the node ids, whatever they are
    # The panels the README promises.
    assert {
        "Fleet",
        "Tokens/s per node",
        "Battery per node",
        "Temperature per node",
        "Latency",
        "Errors by code",
        "Joules per token per node",
    } <= titles
