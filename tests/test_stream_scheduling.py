"""How the hub schedules streamed, structured and cancelled requests, with scripted engines on a
real broker (the fakes stand in for inference only: test_streaming.py and the gateway tests use
the real llama-cpp engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from nova_swarm.broker.contract.errors import ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import (
    Answer,
    Cancel,
    ErrorReply,
    GenParams,
    JsonSchemaFormat,
    PromptRequest,
    ResponseFormat,
    StreamChunk,
    StreamEnd,
    Task,
    decode,
)
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import SwarmClient
from nova_swarm.hub.client import Stream
from nova_swarm.hub.retrieval import RetrievalConfig
from nova_swarm.node import FakeEngine
from nova_swarm.node.engine import STREAM

from .conftest import RunningBroker, hub_config, nodes_available, running_hub, running_node, within

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


def json_answer() -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(name="answer", schema=SCHEMA))


M = TypeVar("M", Cancel, Task)
T = Topics("main")


@asynccontextmanager
async def watch(
    broker: RunningBroker, node_id: str, kind: NodeTopic, model: type[M]
) -> AsyncIterator[asyncio.Queue[M]]:
    """What the hub sends ``node_id`` on its ``kind`` topic (task, cancel), seen from the side
    (the hub's login reads everything)."""
    seen: asyncio.Queue[M] = asyncio.Queue()
    async with Connection(broker.url(Role.HUB), client_id=f"watch-{kind}-{node_id}") as conn:
        await conn.subscribe(T.node(node_id, kind), qos=1)

        async def read() -> None:
            async for message in conn.messages():
                seen.put_nowait(decode(model, message.payload))

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def watch_cancels(broker: RunningBroker, node_id: str) -> AbstractAsyncContextManager[asyncio.Queue[Cancel]]:
    return watch(broker, node_id, NodeTopic.CANCEL, Cancel)


async def test_a_streamed_race_forwards_only_the_first_streamer_and_cancels_the_rest(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    words = " ".join(f"word{i}" for i in range(40))
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, FakeEngine(reply=words), "quick"),
        running_node(amqtt, FakeEngine(reply="the slow answer", delay_s=20.0), "slow"),
    ):
        await nodes_available(hub, 2)
        async with watch_cancels(amqtt, "slow") as cancels:
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                request = PromptRequest(prompt="go", fanout=2, params=GenParams(max_tokens=64))
                async with client.streaming(request, timeout=30) as stream:
                    chunks = [chunk async for chunk in stream]
                    answer = await stream.answer()
            assert answer.node_id == "quick" and answer.attempts == 2
            assert {c.node_id for c in chunks} == {"quick"}
            assert "".join(c.text for c in chunks) == answer.text == words
            assert stream.ended is not None and stream.ended.ok and stream.ended.usage is not None
            assert stream.duplicates == 0 and stream.gaps == 0
            cancel = await within(cancels.get(), 10)
            assert cancel.reason == "another node streamed first"


async def test_best_of_n_streams_the_ranked_winner_once_it_is_known(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, FakeEngine(reply="a fine and complete answer."), "good"),
        running_node(amqtt, FakeEngine(reply="meh"), "terse"),
    ):
        await nodes_available(hub, 2)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            request = PromptRequest(prompt="go", strategy="best_of_n", fanout=2)
            async with client.streaming(request, timeout=30) as stream:
                chunks = [chunk async for chunk in stream]
                answer = await stream.answer()
    assert len(answer.candidates) == 2
    assert [c.text for c in chunks] == [answer.text] and chunks[0].node_id == answer.node_id
    assert not chunks[0].restart


async def test_an_answer_that_breaks_the_schema_is_retried_on_another_node(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path, retries=2)) as hub,
        running_node(amqtt, FakeEngine(reply="sure! the answer is four"), "sloppy"),
        running_node(amqtt, FakeEngine(reply='{"answer": 4}'), "careful"),
    ):
        await nodes_available(hub, 2)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            retried = []
            for _ in range(8):  # until the scheduler has tried the sloppy node first at least once
                answer = await client.ask(PromptRequest(prompt="2+2?", response_format=json_answer()), timeout=30)
                assert answer.node_id == "careful" and json.loads(answer.text) == {"answer": 4}
                if answer.attempts == 2:
                    retried.append(answer)
                    break
            assert retried, "the sloppy node was never tried first"


async def test_when_every_node_breaks_the_schema_the_error_says_what_failed(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path, retries=1)) as hub,
        running_node(amqtt, FakeEngine(reply="four"), "sloppy"),
        running_node(amqtt, FakeEngine(reply='{"answer": "four"}'), "stringy"),
    ):
        await nodes_available(hub, 2)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            with pytest.raises(RequestFailed) as failed:
                await client.ask(PromptRequest(prompt="2+2?", response_format=json_answer()), timeout=30)
    assert failed.value.code is ErrorCode.INVALID_OUTPUT
    message = failed.value.message
    assert (
        "is not JSON" in message or "does not match the schema: at answer: 'four' is not of type 'integer'" in message
    )


async def test_a_client_cancel_stops_the_node(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, FakeEngine(reply="never", delay_s=60.0), "busy") as node,
    ):
        await nodes_available(hub, 1)
        async with watch_cancels(amqtt, "busy") as cancels:
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                # By id, as any MQTT client can:
                reply = await client.send(PromptRequest(id="long-1", prompt="take your time"))
                await asyncio.sleep(0.5)
                await client.cancel("long-1", "changed my mind")
                got = await within(reply, 10)
                assert isinstance(got, ErrorReply) and got.error.code is ErrorCode.CANCELLED
                assert "changed my mind" in got.error.message
                assert (await within(cancels.get(), 10)).task_id
                # By walking away from a stream:
                async with client.streaming(PromptRequest(prompt="take your time again"), timeout=30):
                    await asyncio.sleep(0.5)
                assert (await within(cancels.get(), 10)).reason.endswith("the client stopped reading the stream")
            await within(_idle(node), 10)


async def _idle(node: object) -> None:
    while getattr(node, "_running", None) or getattr(node, "_queued", None):
        await asyncio.sleep(0.05)


async def test_embeddings_go_only_to_nodes_that_can_make_them(amqtt: RunningBroker, tmp_path: Path) -> None:
    chat_only = FakeEngine(reply="hi", capabilities=frozenset({STREAM}))
    async with running_hub(amqtt, hub_config(tmp_path)) as hub, running_node(amqtt, chat_only, "chatty"):
        await nodes_available(hub, 1)
        async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
            with pytest.raises(RequestFailed) as refused:
                await client.ask(PromptRequest(kind="embed", input=["x"]), timeout=30)
            assert refused.value.code is ErrorCode.UNSUPPORTED and "embed" in refused.value.message
            async with running_node(amqtt, FakeEngine(name="fake"), "embedder"):
                await nodes_available(hub, 2)
                answer = await client.ask(PromptRequest(kind="embed", input=["x", "y"]), timeout=30)
    assert answer.node_id == "embedder" and answer.embeddings is not None and len(answer.embeddings) == 2


async def test_retrieval_adds_the_best_snippets_of_a_folder_as_context(amqtt: RunningBroker, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "garden.md").write_text("Tomatoes need six hours of sun and deep watering twice a week.")
    (docs / "bikes.txt").write_text("Inflate road bike tyres to about 80 psi before every long ride.")
    (docs / "tea.md").write_text("Green tea brews best at 80 degrees for two minutes.")
    config = hub_config(tmp_path, retrieval=RetrievalConfig(docs, top_k=1))
    # A node that cannot embed: the hub ranks with TF-IDF.
    chat_only = FakeEngine(reply="ok", capabilities=frozenset({STREAM}))
    async with running_hub(amqtt, config) as hub, running_node(amqtt, chat_only, "n1"):
        await nodes_available(hub, 1)
        async with watch(amqtt, "n1", NodeTopic.TASK, Task) as tasks:
            async with SwarmClient(amqtt.url(Role.CLIENT)) as client:
                await client.ask(PromptRequest(prompt="How much sun do my tomatoes need?"), timeout=30)
                task = await within(tasks.get(), 10)
                system, user = task.messages
                assert system.role == "system" and "source: garden.md" in system.content
                assert "six hours of sun" in system.content and "psi" not in system.content
                assert user.content == "How much sun do my tomatoes need?"

                await client.ask(PromptRequest(prompt="Tyre pressure?", retrieval=False), timeout=30)
                assert [m.role for m in (await within(tasks.get(), 10)).messages] == ["user"]
    index = hub._context.index if hub._context is not None else None
    assert index is not None and index.mode == "tfidf"


async def test_a_stream_reader_drops_duplicates_waits_for_gaps_and_follows_a_restart() -> None:
    reply: asyncio.Future[Answer | ErrorReply] = asyncio.get_running_loop().create_future()
    stream = Stream("r1", reply)

    def piece(seq: int, text: str, *, restart: bool = False) -> StreamChunk:
        return StreamChunk(id="r1", seq=seq, node_id="n", text=text, restart=restart)

    stream._deliver(piece(0, "a"))
    stream._deliver(piece(0, "a"))  # QoS 1 delivered it twice
    stream._deliver(piece(2, "c"))  # early: 1 is still on its way
    stream._deliver(piece(1, "b"))
    # the hub restarted and resumed the request: a new start numbered far ahead
    stream._deliver(piece(5_000, "X", restart=True))
    stream._deliver(piece(3, "stale"))  # from before the restart, late: dropped
    stream._deliver(piece(5_001, "Y"))
    stream._deliver(StreamEnd(id="r1", seq=5_002, ok=True, node_id="n"))
    got = [(c.text, c.restart) async for c in stream]
    assert got == [("a", False), ("b", False), ("c", False), ("X", True), ("Y", False)]
    assert stream.duplicates == 2 and stream.ended is not None
