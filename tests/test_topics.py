"""topics.md and broker/contract/topics.py describe the same contract."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from nova_swarm.broker.contract.errors import ConfigError
from nova_swarm.broker.contract.topics import CATALOGUE, NodeTopic, Topics, is_concrete, matches

TOPICS_MD = Path(__file__).resolve().parent.parent / "topics.md"
ROW = re.compile(r"^\| `(swarm/[^`]+)` \| ([^|]+) \| ([^|]+) \| (\d) \| (yes|no) \|$")


def documented_rows() -> list[tuple[str, str, str, int, bool]]:
    rows = []
    for line in TOPICS_MD.read_text().splitlines():
        if m := ROW.match(line.strip()):
            rows.append((m[1], m[2].strip(), m[3].strip(), int(m[4]), m[5] == "yes"))
    return rows


def test_every_documented_topic_is_in_the_catalogue_and_back() -> None:
    documented = documented_rows()
    catalogue = [(s.pattern, s.publisher, s.subscriber, s.qos, s.retained) for s in CATALOGUE]
    assert documented == catalogue


def test_every_topic_has_its_own_section_with_examples() -> None:
    text = TOPICS_MD.read_text()
    for spec in CATALOGUE:
        heading = f"`{spec.pattern}`"
        sections = [s for s in text.split("\n## ") if s.startswith(heading) or heading in s.split("\n", 1)[0]]
        assert sections, f"topics.md has no section for {spec.pattern}"
        assert "mosquitto_sub" in sections[0], f"the section for {spec.pattern} has no mosquitto_sub example"


def builder_patterns() -> set[str]:
    """Render every public topic builder with placeholder ids and map back to patterns."""
    t = Topics("sidx")
    out = set()
    for name, member in inspect.getmembers(Topics, predicate=inspect.isfunction):
        skip = {
            "node",
            "all_nodes",
            "parse_node_topic",
            "is_reply_topic",
            "in_scope",
            "prompt_scope",
            "cancel_scope",
            "prompt_filter",
            "cancel_filter",
            "everything",
            "bundle_chunks",
            "metrics_all",
        }
        if name.startswith("_") or name in skip or name.startswith("parse_"):
            continue
        params = [p for p in inspect.signature(member).parameters if p != "self"]
        args: dict[str, object] = {
            "node_id": "nidx",
            "login": "loginx",
            "name": "namex",
            "index": 7,
            "metric": "metricx",
            "tag": "tagx",
            "reply_topic": t.reply("loginx"),
            "request_id": "ridx",
        }
        topic = getattr(t, name)(*[args[p] for p in params])
        if name == "reply_filter":
            continue
        topic = topic.replace("sidx", "{sid}").replace("nidx", "{node_id}").replace("namex", "{name}")
        topic = topic.replace("loginx", "{login}")
        topic = topic.replace("metricx", "{metric}").replace("tagx", "{tag}").replace("ridx", "{request_id}")
        out.add(topic.replace("/chunk/7", "/chunk/{index}"))
    out.add(t.reply("loginx").replace("sidx", "{sid}").replace("loginx", "{login}"))
    out.add(t.prompt().replace("sidx", "{sid}"))
    out.add(t.cancel().replace("sidx", "{sid}"))
    return out


def test_builders_produce_exactly_the_catalogue() -> None:
    assert builder_patterns() == {s.pattern for s in CATALOGUE}


def test_node_topic_round_trip() -> None:
    t = Topics("main")
    for kind in NodeTopic:
        assert t.parse_node_topic(t.node("pixel-7", kind)) == ("pixel-7", kind)
    assert t.parse_node_topic("swarm/other/node/x/status") is None
    assert t.parse_node_topic("swarm/main/node/x/unknown") is None
    assert t.parse_node_topic("swarm/main/node/X Y/status") is None


def test_bundle_chunk_round_trip() -> None:
    t = Topics("main")
    assert t.parse_bundle_chunk(t.bundle_chunk(12)) == 12
    for bad in ("swarm/main/bundle/chunk/", "swarm/main/bundle/chunk/x", "swarm/main/bundle/chunk/-1", t.bundle()):
        assert t.parse_bundle_chunk(bad) is None


@pytest.mark.parametrize("bad", ["", "UPPER", "with space", "a/b", "+", "#", "x" * 65])
def test_ids_are_checked(bad: str) -> None:
    with pytest.raises(ConfigError):
        Topics("main").node_task(bad)


def test_reply_topics_must_stay_under_reply() -> None:
    t = Topics("main")
    assert t.is_reply_topic("swarm/main/reply/alice")
    assert t.is_reply_topic("swarm/main/reply/alice/deep")
    assert not t.is_reply_topic("swarm/main/reply/")
    assert not t.is_reply_topic("swarm/main/node/x/task")
    assert not t.is_reply_topic("swarm/main/reply/+")
    assert not t.is_reply_topic("swarm/other/reply/x")


def test_scopes_come_from_the_topic_and_bound_reply_topics() -> None:
    t = Topics("main")
    assert t.prompt_scope(t.prompt("alice")) == "alice" and t.cancel_scope(t.cancel("alice")) == "alice"
    assert t.prompt_scope(t.prompt()) == "default" == t.cancel_scope(t.cancel())
    for bad in ("swarm/main/prompt/default", "swarm/main/prompt/a/b", "swarm/main/prompt/A", "swarm/main/promptx"):
        assert t.prompt_scope(bad) is None
    assert t.in_scope(t.reply("alice"), "alice") and t.in_scope(t.reply("alice", "c-1"), "alice")
    assert t.in_scope("swarm/main/reply/default/stream/x", "default")
    assert not t.in_scope(t.reply("bob"), "alice") and not t.in_scope("swarm/main/reply/alicex", "alice")
    assert not t.in_scope(t.reply(), "alice") and not t.in_scope(t.reply("alice"), "default")
    assert t.in_scope(t.reply("bob", "x"), "hub")  # the hub's login may address any reply topic
    assert not t.in_scope("swarm/main/hub/status", "hub")


def test_matching_and_concreteness() -> None:
    assert matches("swarm/main/node/+/status", "swarm/main/node/a/status")
    assert not matches("swarm/main/node/+/status", "swarm/main/node/a/b/status")
    assert matches("swarm/main/#", "swarm/main")
    assert matches("swarm/main/#", "swarm/main/a/b")
    assert not matches("#", "$SYS/broker")
    assert is_concrete("swarm/main/prompt")
    assert not is_concrete("swarm/+/prompt")
    assert not is_concrete("$SYS/x")
