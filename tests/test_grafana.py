"""The shipped Grafana dashboard reads only what the hub publishes, where the bridge puts it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nova_swarm.broker.contract.messages import HubMetrics, NodeMetrics
from nova_swarm.broker.contract.topics import Topics
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


PROM_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nova-swarm-prometheus.json"
PROM_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "nova-swarm-prometheus.yaml"


def test_the_prometheus_dashboard_queries_only_exported_series_and_labels(tmp_path: Path) -> None:
    from .test_prometheus import full_exposition

    exported = full_exposition()  # every family the gateway's /metrics can expose, each with samples
    labels_of = {name: {label for key in samples for label, _ in key} for name, samples in exported.items()}
    dashboard = json.loads(PROM_DASHBOARD.read_text())
    source = PROM_DATASOURCE.read_text()
    uid = re.search(r"^\s+uid: (\S+)$", source, re.M)
    assert uid and "type: prometheus" in source
    used: set[str] = set()
    rules = []
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid[1]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bnova_swarm_[a-z_]+\b", expr))
            assert names and names <= set(exported), (panel["title"], names - set(exported))
            used |= names
            # a legend names only labels these series carry (aggregations keep what `by` keeps)
            kept = re.search(r"by \(([a-z_, ]+)\)", expr)
            available = (
                {label.strip() for label in kept[1].split(",")} if kept else set.union(*(labels_of[n] for n in names))
            )
            for label in re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", target["legendFormat"]):
                assert label in available, (panel["title"], label, available)
            rules.append({"record": f"nova_swarm:check_{len(rules)}", "expr": expr.replace("$__rate_interval", "1m")})
    # the hub's and the nodes' main figures each have a panel
    assert {
        "nova_swarm_nodes",
        "nova_swarm_requests_total",
        "nova_swarm_latency_seconds",
        "nova_swarm_errors_last_minute",
        "nova_swarm_node_tokens_per_second",
        "nova_swarm_node_busy",
        "nova_swarm_node_battery_percent",
        "nova_swarm_node_temperature_celsius",
        "nova_swarm_node_joules_per_token",
        "nova_swarm_node_win_rate",
    } <= used
    # and Prometheus's own parser takes every query (promtool ships with Debian's prometheus)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("this test checks the queries with the real promtool; missing: run `make test-deps`")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
