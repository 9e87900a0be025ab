"""Streaming, embeddings and structured output through MQTT, as mosquitto users and
``swarm-hub`` see them: real `swarm-hub serve` and `swarm-node run` processes with the real
llama-cpp engine on the bundled SmolLM2, and the real mosquitto_pub / mosquitto_sub, on both
brokers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from pathlib import Path

import jsonschema
import pytest

from nova_swarm.broker.contract.topics import Topics

from .conftest import Processes, require_mosquitto, wait_online

pytestmark = pytest.mark.llama
T = Topics("main")


def read_lines(procs: Processes, topic: str, count: int) -> subprocess.Popen[str]:
    """mosquitto_sub printing ``topic payload`` lines, until ``count`` messages came."""
    require_mosquitto()
    argv = ["mosquitto_sub", *procs.broker.mosquitto_flags(), "-t", topic, "-v", "-C", str(count), "-W", "120"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def publish(procs: Processes, payload: dict[str, object]) -> None:
    # mosquitto_sub prints nothing when its SUBSCRIBE is acknowledged; give it a moment.
    await asyncio.sleep(0.7)
    pub = procs.run(["mosquitto_pub", *procs.broker.mosquitto_flags(), "-t", T.prompt(), "-m", json.dumps(payload)])
    assert pub.returncode == 0, pub.stderr


async def test_a_stream_read_with_mosquitto_sub_adds_up_to_the_answer(procs: Processes) -> None:
    procs.hub()
    procs.node("alpha")
    await wait_online(procs, 1)
    rid = "story-1"
    stream_topic = T.stream(T.reply(), rid)
    reader = read_lines(procs, stream_topic, count=500)
    replies = read_lines(procs, T.reply(), count=1)
    await publish(
        procs,
        {"id": rid, "prompt": "Write two sentences about the sea.", "stream": True, "params": {"max_tokens": 48}},
    )
    reply_out, err = await asyncio.to_thread(replies.communicate, timeout=120)
    answer = json.loads(reply_out.split(" ", 1)[1])
    assert answer["ok"] is True, answer
    await asyncio.sleep(1.0)  # the stream's end went out before the reply; let the reader drain
    reader.terminate()
    out, _ = await asyncio.to_thread(reader.communicate, timeout=30)
    parts = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith(stream_topic + " ")]
    assert [p["seq"] for p in parts] == list(range(len(parts))), "chunks arrive in order, no gaps or duplicates"
    *chunks, end = parts
    assert end["done"] is True and end["ok"] is True
    assert end["finish_reason"] in ("stop", "length")
    assert end["usage"]["completion_tokens"] > 0 and end["timings"]["tokens_per_s"] > 0
    assert len(chunks) >= 3, "tokens come as they are generated, not in one piece"
    assert all(c["node_id"] == "alpha" and not c["restart"] for c in chunks)
    assert "".join(c["text"] for c in chunks) == answer["text"]
    assert answer["text"].strip()


async def test_embeddings_and_a_json_schema_answer_over_mqtt(procs: Processes) -> None:
    procs.hub()
    procs.node("alpha")
    await wait_online(procs, 1)
    replies = read_lines(procs, T.reply(), count=2)
    await publish(procs, {"id": "emb-1", "kind": "embed", "input": ["the cat sat", "stock prices fell"]})
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    await publish(
        procs,
        {
            "id": "json-1",
            "prompt": "Make up a person.",
            "params": {"max_tokens": 64},
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        },
    )
    out, _ = await asyncio.to_thread(replies.communicate, timeout=120)
    got = {r["id"]: r for r in (json.loads(line.split(" ", 1)[1]) for line in out.splitlines())}

    emb = got["emb-1"]
    assert emb["ok"] is True, emb
    vectors = emb["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 16
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    assert vectors[0] != vectors[1]

    person = got["json-1"]
    assert person["ok"] is True, person
    jsonschema.validate(json.loads(person["text"]), schema)


async def test_swarm_hub_ask_stream_prints_tokens_and_embed_prints_vectors(procs: Processes, tmp_path: Path) -> None:
    procs.hub()
    procs.node("alpha")
    await wait_online(procs, 1)
    streamed = await asyncio.to_thread(
        procs.swarm_hub, "ask", "Name three colours.", "--stream", "--max-tokens", "24", "--seed", "1"
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() and "node alpha" in streamed.stderr

    schema = tmp_path / "colour.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]})
    )
    shaped = await asyncio.to_thread(
        procs.swarm_hub, "ask", "Name a colour.", "--schema", str(schema), "--max-tokens", "32", "--json"
    )
    assert shaped.returncode == 0, shaped.stderr
    assert "colour" in json.loads(json.loads(shaped.stdout)["text"])

    embedded = await asyncio.to_thread(procs.swarm_hub, "embed", "hello", "world")
    assert embedded.returncode == 0, embedded.stderr
    lines = [json.loads(line) for line in embedded.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["hello", "world"]
    assert all(len(line["embedding"]) > 16 for line in lines)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "objekt"}))
    refused = await asyncio.to_thread(procs.swarm_hub, "ask", "hi", "--schema", str(bad))
    assert refused.returncode == 1
    assert "invalid_request" in refused.stderr and "not a valid JSON Schema" in refused.stderr


async def test_retrieval_ranks_a_folder_with_the_nodes_embeddings(procs: Processes, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "garden.md").write_text("Tomatoes need six hours of sun and deep watering twice a week.")
    (docs / "bikes.txt").write_text("Inflate road bike tyres to about 80 psi before every long ride.")
    procs.hub("--retrieval", str(docs), "--retrieval-top-k", "1")
    procs.node("alpha")
    await wait_online(procs, 1)
    asked = await asyncio.to_thread(
        procs.swarm_hub, "ask", "How much sun do tomatoes need?", "--max-tokens", "32", "--json"
    )
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["text"].strip()
    # The hub indexed the folder with embeddings from the node, and gave the prompt context.
    hub_log = procs.log("hub")
    indexed = [line for line in hub_log.splitlines() if "indexed documents" in line]
    assert indexed and "embeddings" in indexed[0], hub_log[-3000:]
    assert "retrieved context" in hub_log
