"""Sustained overload: the hub sheds what it cannot take (``hub_busy``), answers everything it
accepts, and its memory does not grow with the offered load."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from nova_swarm.broker.contract.errors import ErrorCode
from nova_swarm.broker.contract.messages import Answer, PromptRequest, decode_reply
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection

from .conftest import Processes, RunningBroker, wait_online

T = Topics()


@pytest.mark.timeout(240)
async def test_hub_memory_stays_flat_and_every_prompt_is_answered_under_overload(
    amqtt: RunningBroker, tmp_path: Path
) -> None:
    procs = Processes(amqtt, tmp_path)
    try:
        hub = procs.hub("--max-inflight", "40", "--max-queued", "20", "--rate-limit", "1000000")
        procs.node("slow", "--engine", "fake", "--engine-option", "delay_s=0.05", "--slots", "1")
        await wait_online(procs, 1)
        rss = psutil.Process(hub.pid)
        replies: Counter[str] = Counter()
        by_id: dict[str, int] = Counter()
        samples: list[tuple[float, float, int]] = []
        sent = 0
        async with Connection(amqtt.url(Role.CLIENT), client_id="flood") as conn:
            await conn.subscribe(T.reply("default", "flood"))

            async def read() -> None:
                async for message in conn.messages():
                    reply = decode_reply(message.payload)
                    by_id[reply.id or ""] += 1
                    replies["answer" if isinstance(reply, Answer) else reply.error.code.value] += 1

            reader = asyncio.create_task(read())
            started = time.monotonic()
            duration = 24.0
            next_sample = started
            while (now := time.monotonic()) - started < duration:
                # Far more than one slow node can serve: ~20 prompts per answer it can give.
                for _ in range(20):
                    body = PromptRequest(id=f"o{sent}", prompt="work", reply_to=T.reply("default", "flood"))
                    await conn.publish(T.prompt(), body.encode())
                    sent += 1
                if now >= next_sample:
                    samples.append((now - started, rss.memory_info().rss / 2**20, sent))
                    next_sample += 2.0
                await asyncio.sleep(0.02)
            give_up = time.monotonic() + 60
            while len(by_id) < sent and time.monotonic() < give_up:
                await asyncio.sleep(0.2)
            reader.cancel()
        print(f"\noverload: {sent} prompts in {duration:.0f} s; replies {dict(replies)}")
        print("hub RSS (MB) over time: " + ", ".join(f"{t:.0f}s={mb:.1f}" for t, mb, _ in samples))
        assert len(by_id) == sent, f"{sent - len(by_id)} prompts got no reply"
        assert max(by_id.values()) == 1, "a prompt got two replies"
        assert replies["answer"] > 0 and replies[ErrorCode.HUB_BUSY.value] > sent / 2
        assert set(replies) <= {"answer", ErrorCode.HUB_BUSY.value}
        # Flat: after warming up, the hub's memory does not follow the ever-growing prompt count.
        warm = [mb for t, mb, _ in samples if t >= duration / 3]
        assert max(warm) - min(warm) < 25, samples
    finally:
        procs.close()
