"""Nothing lost: retries by request id, backpressure, rate limits, and a hub that crashes mid-load.

Fake engines stand in for inference (these tests are about the hub's bookkeeping); the broker,
the hub process and SQLite are real.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import defaultdict
from pathlib import Path

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Answer, ErrorReply, PromptRequest, decode_reply
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import Limits
from nova_swarm.node import FakeEngine

from .conftest import Processes, RunningBroker, hub_config, nodes_available, running_hub, running_node, until

T = Topics()


class Inbox:
    """Every reply on one client's reply topic, by request id, raw bytes kept."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.topic = T.reply("default", name)  # the bare prompt's scope, which every client reads
        self.by_id: dict[str, list[bytes]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Inbox:
        await self.conn.subscribe(self.topic)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _read(self) -> None:
        async for message in self.conn.messages():
            self.by_id[decode_reply(message.payload).id or ""].append(message.payload)

    async def send(self, rid: str, prompt: str = "hello", **fields: object) -> None:
        body = PromptRequest(id=rid, prompt=prompt, reply_to=self.topic, **fields)  # type: ignore[arg-type]
        await self.conn.publish(T.prompt(), body.encode())

    def reply(self, rid: str) -> Answer | ErrorReply:
        return decode_reply(self.by_id[rid][-1])


async def test_a_retried_id_gets_the_same_reply_and_never_a_second_answer(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path)) as hub,
        running_node(amqtt, FakeEngine(reply=lambda p: f"answer to {p}", delay_s=0.3), "n1"),
    ):
        await nodes_available(hub, 1)
        async with Connection(amqtt.url(Role.CLIENT), client_id="retrier") as conn, Inbox(conn, "retrier") as inbox:
            await inbox.send("q1", "first")
            await inbox.send("q1", "first")  # a retry while the first is in flight: ignored
            await until(lambda: "q1" in inbox.by_id, what="q1's answer")
            await inbox.send("q1", "first")  # a retry after: the stored reply, byte for byte
            await until(lambda: len(inbox.by_id["q1"]) == 2, what="q1's repeated reply")
            assert inbox.by_id["q1"][0] == inbox.by_id["q1"][1]
            assert isinstance(inbox.reply("q1"), Answer) and inbox.reply("q1").text == "answer to first"
            await inbox.send("q1", "something else")  # the same id for a different request
            await until(lambda: len(inbox.by_id["q1"]) == 3, what="the conflict error")
            conflict = inbox.reply("q1")
            assert isinstance(conflict, ErrorReply) and conflict.error.code is ErrorCode.INVALID_REQUEST
            assert "different request" in conflict.error.message
            await asyncio.sleep(0.5)
            assert len(inbox.by_id["q1"]) == 3


async def test_past_the_queue_bound_prompts_get_hub_busy_and_none_is_lost(amqtt: RunningBroker, tmp_path: Path) -> None:
    limits = Limits(max_inflight=6, max_queued=3)
    async with (
        running_hub(amqtt, hub_config(tmp_path, limits=limits)) as hub,
        running_node(amqtt, FakeEngine(delay_s=0.2), "slow", slots=1, queue_max=1),
    ):
        await nodes_available(hub, 1)
        async with Connection(amqtt.url(Role.CLIENT), client_id="flood") as conn, Inbox(conn, "flood") as inbox:
            ids = [f"f{i}" for i in range(40)]
            for rid in ids:
                await inbox.send(rid)
            await until(lambda: all(rid in inbox.by_id for rid in ids), timeout=60, what="a reply to every prompt")
            await asyncio.sleep(0.5)
            assert all(len(inbox.by_id[rid]) == 1 for rid in ids)
            codes = [r.error.code if isinstance(r, ErrorReply) else "answer" for r in map(inbox.reply, ids)]
            assert "answer" in codes and ErrorCode.HUB_BUSY in codes, codes
            assert set(codes) <= {"answer", ErrorCode.HUB_BUSY}, codes
            busy = next(r for r in map(inbox.reply, ids) if isinstance(r, ErrorReply))
            assert busy.error.retry_after_s and "full" in busy.error.message
            # Backpressure keeps the hub's own state bounded, whatever the offered load.
            assert len(hub.requests.runs) <= limits.max_inflight


async def test_requests_per_client_per_minute_are_capped(amqtt: RunningBroker, tmp_path: Path) -> None:
    async with (
        running_hub(amqtt, hub_config(tmp_path, limits=Limits(requests_per_minute=3))) as hub,
        running_node(amqtt, FakeEngine(), "n1"),
    ):
        await nodes_available(hub, 1)
        async with Connection(amqtt.url(Role.CLIENT), client_id="eager") as conn, Inbox(conn, "eager") as inbox:
            for i in range(5):
                await inbox.send(f"r{i}")
            await until(lambda: len(inbox.by_id) == 5, what="five replies")
            limited = [inbox.reply(f"r{i}") for i in (3, 4)]
            assert all(isinstance(r, ErrorReply) and r.error.code is ErrorCode.RATE_LIMITED for r in limited)
            assert all(r.error.retry_after_s and r.error.retry_after_s > 0 for r in limited)  # type: ignore[union-attr]
            assert all(isinstance(inbox.reply(f"r{i}"), Answer) for i in range(3))


async def test_a_hub_killed_mid_load_answers_every_accepted_prompt_after_restart(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        hub = procs.hub()
        async with (
            running_node(amqtt, FakeEngine(reply=lambda p: f"done {p}", delay_s=0.5), "n1", slots=2),
            running_node(amqtt, FakeEngine(reply=lambda p: f"done {p}", delay_s=0.5), "n2", slots=2),
        ):
            async with Connection(amqtt.url(Role.CLIENT), client_id="c1") as conn, Inbox(conn, "c1") as inbox:
                # A prompt sent before the hub subscribes reaches no one: retry it (same id) until served.
                for _ in range(60):
                    await inbox.send("probe")
                    await asyncio.sleep(0.5)
                    if "probe" in inbox.by_id:
                        break
                assert isinstance(inbox.reply("probe"), Answer)
                ids = [f"k{i}" for i in range(30)]
                for rid in ids:
                    await inbox.send(rid, rid)
                await asyncio.sleep(0.8)  # some answered, some in flight, some queued
                hub.send_signal(signal.SIGKILL)
                hub.wait()
                answered_before = sum(rid in inbox.by_id for rid in ids)
                procs.hub()
                await until(
                    lambda: all(rid in inbox.by_id for rid in ids),
                    timeout=60,
                    what="a reply to every prompt accepted before the crash",
                )
                await asyncio.sleep(1.0)
                assert answered_before < len(ids), "the crash came too late to test anything"
                for rid in ids:
                    replies = inbox.by_id[rid]
                    assert len(set(replies)) == 1, (rid, replies)  # never two different replies
                    reply = decode_reply(replies[0])
                    assert isinstance(reply, Answer) and reply.text == f"done {rid}", reply
                assert re.search(r"journal loaded +unfinished=[1-9]", procs.log("hub"))  # the crash left work to resume
    finally:
        procs.close()
