"""The gateway's ``/metrics`` and ``/healthz``: the Prometheus text format, read back by the real
Prometheus (Debian's ``prometheus``) scraping a real gateway in front of a real broker, hub and node."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nova_swarm.broker.contract.errors import ProtocolError
from nova_swarm.broker.contract.messages import HubMetrics, HubStatus, NodeMetrics, NodeRow, NodeState, NodeTable
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import GATEWAY_LOGIN, SwarmHome
from nova_swarm.broker.link.net import free_port
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.hub.gateway import Gateway
from nova_swarm.hub.gateway_config import GatewayConfig
from nova_swarm.hub.prometheus import MetricsBoard, SwarmCollector, SwarmView
from nova_swarm.node.fake import FakeEngine

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, stop_process

T = Topics("main")

HUB = HubMetrics(
    nodes_online=2,
    nodes_paused=1,
    nodes_offline=0,
    inflight=3,
    queue_depth=1,
    requests_per_s=0.4,
    answered_per_s=0.383,
    errors_per_min=1,
    latency_p50_ms=812.4,
    latency_p95_ms=-1,
    answered_total=20,
    failed_total=2,
)


def node(**changes: Any) -> NodeMetrics:
    values: dict[str, Any] = {
        "online": 1,
        "paused": 0,
        "battery_pct": 81.0,
        "charging": 1,
        "temp_c": 33.5,
        "tokens_per_s": 41.2,
        "busy": 1,
        "queue_depth": 0,
        "tasks_done": 42,
        "tasks_failed": 1,
        "pauses": 2,
        "joules_per_token": 0.0412,
    }
    return NodeMetrics(**{**values, **changes})


def status(state: str = "online") -> HubStatus:
    return HubStatus(hub_id="hub-1", state=state, version="0.1.0", answered=20, failed=2, cancelled=1, max_tokens=512)  # type: ignore[arg-type]


def table(*rows: tuple[str, str]) -> NodeTable:
    return NodeTable(
        ts=0.0,
        nodes=[
            NodeRow(
                node_id=node_id,
                state=NodeState.ONLINE,
                model=model,
                tokens_per_s=None,
                battery_pct=None,
                charging=None,
                temp_c=None,
                busy=0,
                last_seen=None,
                agent_version=None,
                tags=[],
            )
            for node_id, model in rows
        ],
    )


def full_round(board: MetricsBoard, nodes: dict[str, NodeMetrics]) -> None:
    """What the hub publishes every metrics interval, in its order (``Hub._publish_metrics``)."""
    board.feed(T.metrics_hub(), HUB.encode())
    for node_id, m in nodes.items():
        board.feed(T.metrics_node(node_id), m.encode())
        board.feed(T.metrics_fan_in("tokens_per_s"), json.dumps({node_id: m.tokens_per_s}).encode())
    board.feed(T.metrics_fan_in("errors"), json.dumps({"node_busy": 2, "bad_json": 0}).encode())
    board.feed(T.metrics_win_rate("all"), json.dumps({n: 0.5 for n in nodes}).encode())
    board.feed(T.metrics_win_rate("code"), json.dumps({**{n: 0.75 for n in nodes}, "model:gemma": 0.6}).encode())
    for name in ("credits", "tokens_total", "tasks_total", "wins_total"):
        board.feed(T.metrics_fan_in(name), json.dumps({n: 7 for n in nodes}).encode())


def scrape(view: SwarmView) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The exposition as Prometheus would parse it: {sample name: {sorted labels: value}}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwarmCollector(lambda: view))
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def full_exposition() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every family, each with a sample: what the Grafana test checks its queries against."""
    board = MetricsBoard(T)
    full_round(board, {"pixel7": node(), "s20": node(battery_pct=-1, charging=-1)})
    return scrape(SwarmView(linked=True, hub=status(), fleet=table(("pixel7", "SmolLM2")), board=board))


# ---------------------------------------------------------------- the exposition, no I/O


def test_the_exposition_carries_the_hub_and_node_figures_with_labels() -> None:
    got = full_exposition()
    assert got["nova_swarm_broker_up"] == {(): 1.0} and got["nova_swarm_hub_up"] == {(): 1.0}
    assert got["nova_swarm_hub_info"] == {(("hub_id", "hub-1"), ("version", "0.1.0")): 1.0}
    assert got["nova_swarm_requests_total"] == {
        (("outcome", "answered"),): 20.0,
        (("outcome", "failed"),): 2.0,
        (("outcome", "cancelled"),): 1.0,
    }
    assert got["nova_swarm_nodes"][(("state", "paused"),)] == 1.0
    assert got["nova_swarm_inflight_requests"] == {(): 3.0} and got["nova_swarm_queued_requests"] == {(): 1.0}
    # milliseconds on the wire, seconds for Prometheus; an unknown p95 is no sample, not -1
    assert got["nova_swarm_latency_seconds"] == {(("quantile", "0.5"),): pytest.approx(0.8124)}
    pixel7 = (("model", "SmolLM2"), ("node", "pixel7"))
    s20 = (("model", ""), ("node", "s20"))  # not in the node table (yet): no model
    assert got["nova_swarm_node_online"] == {pixel7: 1.0, s20: 1.0}
    assert got["nova_swarm_node_busy"][pixel7] == 1.0
    assert got["nova_swarm_node_temperature_celsius"][pixel7] == 33.5
    assert got["nova_swarm_node_tokens_per_second"][pixel7] == pytest.approx(41.2)
    assert got["nova_swarm_node_joules_per_token"][pixel7] == pytest.approx(0.0412)
    assert got["nova_swarm_node_tasks_done_total"][pixel7] == 42.0
    # a reading the device cannot take (-1 on the wire) has no sample at all
    assert got["nova_swarm_node_battery_percent"] == {pixel7: 81.0}
    assert s20 not in got["nova_swarm_node_charging"]
    assert got["nova_swarm_errors_last_minute"] == {(("code", "bad_json"),): 0.0, (("code", "node_busy"),): 2.0}
    assert got["nova_swarm_node_win_rate"][(("node", "pixel7"), ("tag", "code"))] == 0.75
    assert got["nova_swarm_node_win_rate"][(("node", "s20"), ("tag", "all"))] == 0.5
    # A model's rate is a model's, not a node called "model:gemma".
    assert got["nova_swarm_model_win_rate"] == {(("model", "gemma"), ("tag", "code")): 0.6}
    assert all(dict(labels)["node"] in ("pixel7", "s20") for labels in got["nova_swarm_node_win_rate"])
    assert got["nova_swarm_node_credits"] == {(("node", "pixel7"),): 7.0, (("node", "s20"),): 7.0}
    assert got["nova_swarm_node_wins_total"][(("node", "s20"),)] == 7.0
    assert got["nova_swarm_metrics_age_seconds"][()] >= 0


def test_a_node_missing_from_a_whole_round_drops_out() -> None:
    board = MetricsBoard(T)
    full_round(board, {"pixel7": node(), "s20": node()})
    view = SwarmView(linked=True, hub=status(), fleet=None, board=board)
    full_round(board, {"pixel7": node(busy=0)})  # s20 not reported: it still counts mid-round...
    assert {dict(k)["node"] for k in scrape(view)["nova_swarm_node_online"]} == {"pixel7", "s20"}
    board.feed(T.metrics_hub(), HUB.encode())  # ...but not once a round without it is complete
    got = scrape(view)
    assert {dict(k)["node"] for k in got["nova_swarm_node_online"]} == {"pixel7"}
    assert got["nova_swarm_node_busy"] == {(("model", ""), ("node", "pixel7")): 0.0}


def test_no_swarm_figures_while_the_hub_or_the_link_is_down() -> None:
    board = MetricsBoard(T)
    full_round(board, {"pixel7": node()})
    for view in (
        SwarmView(linked=True, hub=status("offline"), fleet=None, board=board),
        SwarmView(linked=True, hub=None, fleet=None, board=board),
        SwarmView(linked=False, hub=None, fleet=None, board=board),
    ):
        got = scrape(view)
        assert set(got) == {"nova_swarm_broker_up", "nova_swarm_hub_up"}
        assert got["nova_swarm_hub_up"] == {(): 0.0}
        assert got["nova_swarm_broker_up"] == {(): float(view.linked)}


def test_the_board_refuses_what_a_topic_does_not_carry() -> None:
    board = MetricsBoard(T)
    with pytest.raises(ProtocolError, match="HubMetrics"):
        board.feed(T.metrics_hub(), b'{"nodes_online": "three"}')
    with pytest.raises(ProtocolError, match="fan-in"):
        board.feed(T.metrics_win_rate("all"), b'{"pixel7": "high"}')
    board.feed(T.reply("default"), b"not a metric")  # another topic: not ours to read
    board.feed(T.metrics_fan_in("tokens_per_s"), b"{}")  # a node reading's fan-in: metrics/node has it
    assert board.hub is None and not board.nodes and not board.win_rates and board.errors is None


def test_parse_metrics_names_each_topic_kind() -> None:
    assert T.parse_metrics(T.metrics_hub()) == ("hub", "")
    assert T.parse_metrics(T.metrics_node("pixel7")) == ("node", "pixel7")
    assert T.parse_metrics(T.metrics_win_rate("Code.py")) == ("win_rate", "Code.py")
    assert T.parse_metrics(T.metrics_fan_in("errors")) == ("fan_in", "errors")
    for topic in ("swarm/main/metrics/node/Bad", "swarm/main/metrics/a/b", "swarm/other/metrics/hub", "swarm/main/x"):
        assert T.parse_metrics(topic) is None, topic


# ---------------------------------------------------------------- the real gateway and Prometheus


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def aget(url: str, token: str | None = None) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, url, token)


@contextmanager
def prometheus(tmp_path: Path, gateway_port: int, token: str) -> Iterator[str]:
    """Debian's Prometheus scraping the gateway every second, twice: with the token (job
    ``swarm``) and without (job ``anonymous``); yields the base URL of its HTTP API."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("this test runs the real Prometheus; missing `prometheus`: run `make test-deps`")
    port = free_port()
    credentials = tmp_path / "prometheus-token"
    credentials.write_text(token)
    credentials.chmod(0o600)
    config = tmp_path / "prometheus.yml"
    target = {"static_configs": [{"targets": [f"127.0.0.1:{gateway_port}"]}]}
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "swarm", "authorization": {"credentials_file": str(credentials)}, **target},
                    {"job_name": "anonymous", **target},
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, grace=15)


async def query(api: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus answers for ``promql`` (empty while it is not up yet)."""
    url = f"{api}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        code, body = await aget(url)
    except (urllib.error.URLError, ConnectionError):
        return []
    if code != 200:
        return []
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def series(api: str, promql: str, *, want: float, timeout: float = 60.0) -> dict[str, str]:
    """Wait (bounded) until ``promql`` gives one series valued ``want``; its labels."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    seen: list[dict[str, Any]] = []
    while loop.time() < give_up:
        seen = await query(api, promql)
        if len(seen) == 1 and float(seen[0]["value"][1]) == want:
            labels: dict[str, str] = seen[0]["metric"]
            return labels
        await asyncio.sleep(0.5)
    raise AssertionError(f"Prometheus never gave {promql} = {want}; last: {seen}")


@asynccontextmanager
async def gateway(url: BrokerURL, token: str, **changes: Any) -> AsyncIterator[Gateway]:
    async with Gateway(GatewayConfig(token=token, port=0, **changes), url) as running:
        yield running


async def test_prometheus_scrapes_the_swarm_through_the_gateway(
    broker: RunningBroker, home: SwarmHome, tmp_path: Path
) -> None:
    token = home.gateway_token()
    # The gateway's own login, as `swarm-hub gateway` uses it: both brokers' ACL let it read the metrics.
    url = home.client_url(GATEWAY_LOGIN, port=broker.port)
    engine = FakeEngine(name="fake-model", reply="Four.", delay_s=3.0)
    async with gateway(url, token) as gw:
        # secure by default: no token, no figures
        assert (await aget(f"{gw.base_url}/metrics"))[0] == 401
        async with (
            running_hub(broker, hub_config(tmp_path, metrics_interval_s=0.5)) as hub,
            running_node(broker, engine, "alpha"),
        ):
            await nodes_available(hub, 1)
            with prometheus(tmp_path, gw.port, token) as api:
                labels = await series(api, 'nova_swarm_node_online{job="swarm",node="alpha"}', want=1)
                assert labels["model"] == "fake-model" and labels["instance"] == f"127.0.0.1:{gw.port}"
                await series(api, 'nova_swarm_hub_up{job="swarm"}', want=1)
                await series(api, 'up{job="anonymous"}', want=0)  # Prometheus without the token: 401
                assert await query(api, 'nova_swarm_hub_up{job="anonymous"}') == []

                status, body = await asyncio.to_thread(chat, gw.base_url, token)
                assert status == 200, body
                assert json.loads(body)["choices"][0]["message"]["content"] == "Four."
                await series(api, 'nova_swarm_requests_total{job="swarm",outcome="answered"}', want=1)
                # busy for the 3 s of its answer: a heartbeat, a metrics round and a scrape saw it
                await series(api, 'max_over_time(nova_swarm_node_busy{job="swarm",node="alpha"}[5m])', want=1)
                await series(api, 'nova_swarm_node_tasks_done_total{job="swarm",node="alpha"}', want=1)
                await series(api, 'count(nova_swarm_node_win_rate{job="swarm",node="alpha",tag="all"})', want=1)

            code, body = await aget(f"{gw.base_url}/healthz")
            assert code == 200 and json.loads(body) == {"status": "ok", "broker": "up", "hub": "online"}
        # the hub stopped (its status says offline): not ready, and no swarm figures any more
        await until_status(f"{gw.base_url}/healthz", 503)
        code, body = await aget(f"{gw.base_url}/healthz")
        assert json.loads(body) == {"status": "unavailable", "broker": "up", "hub": "offline"}
        code, text = await aget(f"{gw.base_url}/metrics", token)
        names = {f.name for f in text_string_to_metric_families(text.decode())}
        assert code == 200 and names == {"nova_swarm_broker_up", "nova_swarm_hub_up"}


async def test_public_metrics_and_healthz_without_a_broker(tmp_path: Path) -> None:
    nowhere = BrokerURL("127.0.0.1", free_port(), "gateway", "x" * 24)
    async with gateway(nowhere, "t" * 32, metrics_public=True, connect_wait_s=0.1) as gw:
        code, text = await aget(f"{gw.base_url}/metrics")  # no token needed when made public
        assert code == 200
        got = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
        assert got == {"nova_swarm_broker_up": 0.0, "nova_swarm_hub_up": 0.0}
        code, body = await aget(f"{gw.base_url}/healthz")
        assert code == 503 and json.loads(body) == {"status": "unavailable", "broker": "down", "hub": "unknown"}


async def until_status(url: str, want: int, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while (await aget(url))[0] != want:
        assert loop.time() < give_up, f"{url} never answered {want}"
        await asyncio.sleep(0.1)


def chat(base: str, token: str) -> tuple[int, bytes]:
    body = json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8}).encode()
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
