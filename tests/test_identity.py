"""Identity bound to logins, on both brokers: no login can silence the hub or a node by taking
its client id, read another login's replies by choosing a client id, or read, squat on, cancel
or redirect another login's requests."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from nova_swarm.broker.contract.messages import PromptRequest
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.identity import hub_client_id, node_client_id
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.hub.client import SwarmClient
from nova_swarm.node.fake import FakeEngine

from .conftest import BIN, RunningBroker, env_for, hub_config, nodes_available, running_hub, running_node
from .test_security import raw_client, received

T = Topics("main")


async def try_to_take(login: BrokerURL, client_id: str, hold_s: float) -> bool:
    """Connect as ``client_id`` with ``login`` and hold it; True if the broker let us in."""
    try:
        async with raw_client(login, client_id):
            await asyncio.sleep(hold_s)
    except aiomqtt.MqttError:
        return False
    return True


@pytest.mark.parametrize("target", ["hub", "node"])
async def test_taking_the_hubs_or_a_nodes_client_id_never_silences_it(
    broker: RunningBroker, tmp_path: Path, target: str
) -> None:
    async with (
        running_hub(broker, hub_config(tmp_path)) as hub,
        running_node(broker, FakeEngine(reply="still here"), "n1"),
    ):
        await nodes_available(hub, 1)
        alice = await broker.client_login("alice")
        intruders = [broker.url(Role.CLIENT), alice, await broker.enrolled("n2")]
        if target == "hub":
            real = hub_client_id("main", broker.url(Role.HUB).password)
            guesses = ["hub-main", "hub-main-0000000000000000"]  # the old id, and its shape
        else:
            real = node_client_id("n1", broker.node_url("n1").password)
            guesses = ["n1", "node-n1-000000000000"]  # node ids are public (announce)
        let_in: dict[tuple[str | None, str], bool] = {}
        for login in intruders:
            # The real id too, as if it had leaked: the worst an intruder can do.
            for client_id in [*guesses, real]:
                let_in[(login.username, client_id)] = await try_to_take(login, client_id, hold_s=1.0)
        if broker.engine == "amqtt":
            # The embedded broker refuses every other login in the hub's and the nodes' namespaces.
            assert not any(v for (_, cid), v in let_in.items() if cid.startswith(("hub-", "node-"))), let_in
        # Whatever the broker let happen, the hub answers, through the node under attack.
        async with SwarmClient(alice) as client:
            answer = await client.ask(PromptRequest(prompt="are you there?"), timeout=30)
        assert (answer.text, answer.node_id) == ("still here", "n1")


async def test_replies_are_private_to_the_login_whatever_client_id_one_picks(
    broker: RunningBroker, tmp_path: Path
) -> None:
    async with (
        running_hub(broker, hub_config(tmp_path)) as hub,
        running_node(broker, FakeEngine(reply="for alice only"), "n1"),
    ):
        await nodes_available(hub, 1)
        alice = await broker.client_login("alice")
        mallory = await broker.client_login("mallory")
        n2 = await broker.enrolled("n2")
        snoopers = [
            (broker.url(Role.CLIENT), "alice"),
            (mallory, "alice"),
            (n2, node_client_id("n2", n2.password)),
        ]
        if broker.engine == "mosquitto":
            snoopers.append((n2, "alice"))  # the embedded broker refuses a node any id but its own
        async with SwarmClient(alice) as client:
            # One at a time: two of them claim the same client id, and would take it from each other.
            for login, client_id in snoopers:
                async with raw_client(login, client_id) as watcher:
                    filters = (T.reply("alice"), "swarm/main/reply/alice/#", T.reply_filter(), "swarm/main/#")
                    for topic_filter in filters:
                        await watcher.subscribe(topic_filter, qos=1)  # amqtt refuses, Mosquitto never delivers
                    answer = await client.ask(PromptRequest(prompt="my secret"), timeout=30)
                    assert answer.text == "for alice only"
                    seen = [topic for topic, _ in await received(watcher, 0.5)]
                assert not [t for t in seen if t.startswith("swarm/main/reply/alice")], (login.username, seen)
                if login.username == "n2":
                    assert not [t for t in seen if "/reply/" in t], seen  # a node reads no replies at all


async def test_another_login_cannot_read_squat_on_cancel_or_redirect_a_request(
    broker: RunningBroker, tmp_path: Path
) -> None:
    counter = itertools.count(1)
    engine = FakeEngine(
        reply=lambda prompt: f"answer {next(counter)} to {prompt}",
        delay_s=lambda prompt: 1.5 if prompt == "slow" else 0.0,
    )
    async with running_hub(broker, hub_config(tmp_path)) as hub, running_node(broker, engine, "n1"):
        await nodes_available(hub, 1)
        alice_url = await broker.client_login("alice")
        mallory_url = await broker.client_login("mallory")
        async with (
            SwarmClient(alice_url) as alice,
            SwarmClient(mallory_url) as mallory,
            raw_client(alice_url, "alice-watch") as alice_inbox,
            raw_client(mallory_url, "mallory-raw") as mallory_raw,
        ):
            await alice_inbox.subscribe("swarm/main/reply/alice/#", qos=1)
            await mallory_raw.subscribe("swarm/main/reply/mallory/#", qos=1)
            await mallory_raw.subscribe(T.reply(), qos=1)

            # Squat: mallory takes an id first; alice's request with it is still hers.
            assert (await mallory.ask(PromptRequest(id="req-1", prompt="mallory's"), timeout=30)).text.endswith(
                "to mallory's"
            )
            assert (await alice.ask(PromptRequest(id="req-1", prompt="alice's"), timeout=30)).text.endswith(
                "to alice's"
            )

            # Read: re-sending alice's id and request is a new request of mallory's, answered
            # afresh, never alice's stored reply.
            mine = await alice.ask(PromptRequest(id="req-2", prompt="alice's secret"), timeout=30)
            theirs = await mallory.ask(PromptRequest(id="req-2", prompt="alice's secret"), timeout=30)
            assert mine.text != theirs.text and mine.text.startswith("answer ") and theirs.text.startswith("answer ")

            # Cancel: mallory's cancels of alice's id (her own scope, the shared one) stop nothing.
            slow = await alice.send(PromptRequest(id="req-3", prompt="slow"))
            await asyncio.sleep(0.3)
            for topic in (T.cancel("mallory"), T.cancel()):
                await mallory_raw.publish(topic, json.dumps({"id": "req-3"}), qos=1)
            assert (await asyncio.wait_for(slow, 30)).ok  # type: ignore[union-attr]

            # Redirect: a reply_to in alice's space is refused, to mallory's own topic.
            bad = {"id": "r-1", "prompt": "x", "reply_to": alice.reply_topic}
            await mallory_raw.publish(T.prompt("mallory"), json.dumps(bad), qos=1)
            await mallory_raw.publish(T.prompt(), json.dumps({**bad, "id": "r-2"}), qos=1)
            try:
                await mallory_raw.publish(T.prompt("alice"), json.dumps({**bad, "id": "r-3"}), qos=1)
            except aiomqtt.MqttError:
                pass  # refused outright is fine too
            refusals = {}
            for topic, payload in await received(mallory_raw, 3.0):
                reply = json.loads(payload)
                if reply["id"].startswith("r-"):  # mallory's own answers above came here too
                    refusals[reply["id"]] = (topic, reply["error"]["code"])
            assert refusals == {
                "r-1": (T.reply("mallory"), "bad_reply_to"),
                "r-2": (T.reply(), "bad_reply_to"),
            }

            # Alice got exactly one reply per request of hers, and nothing of mallory's.
            ids = [json.loads(p)["id"] for t, p in await received(alice_inbox, 0.5) if t == alice.reply_topic]
            assert sorted(ids) == ["req-1", "req-2", "req-3"]


def test_client_logins_share_the_node_namespace_and_come_from_the_cli(home: SwarmHome) -> None:
    def swarm_hub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "swarm-hub"), *args], env=env_for(home), capture_output=True, text=True, timeout=60
        )

    made = swarm_hub("enroll", "--client", "alice")
    assert made.returncode == 0, made.stderr
    url = BrokerURL.parse(made.stdout.strip())
    assert (url.username, url.password) == ("alice", home.client_logins()["alice"].password)
    assert "swarm/main/reply/alice" in made.stderr
    assert "alice" in home.password_file.read_text().splitlines()[0]  # the brokers learn it is a client
    # One namespace: a node cannot take a client's name, nor a client a node's or a reserved one.
    for args in (["enroll", "alice"], ["enroll", "--client", "hub"], ["enroll", "--client", "default"]):
        out = swarm_hub(*args)
        assert out.returncode != 0 and ("namespace" in out.stderr or "reserved" in out.stderr), out
    home.enroll("pixel7")
    out = swarm_hub("enroll", "--client", "pixel7")
    assert out.returncode != 0 and "namespace" in out.stderr, out.stderr
    # The gateway has a login of its own from the setup on.
    assert "gateway" in home.client_logins()
    gone = swarm_hub("revoke", "--client", "alice")
    assert gone.returncode == 0 and "alice" not in home.client_logins()
    assert swarm_hub("enroll").returncode != 0  # a node or --client: one of them


async def test_another_logins_persistent_session_is_never_handed_over(broker: RunningBroker) -> None:
    """Bob keeps a session (clean_session off) and a private reply is queued for it while he is
    away; Alice, connecting with Bob's client id and her own login, must not get it."""
    bob, alice = await broker.client_login("bob"), await broker.client_login("alice")
    hub = broker.url(Role.HUB)

    def persistent(url: BrokerURL) -> aiomqtt.Client:
        return aiomqtt.Client(
            url.host, url.port, username=url.username, password=url.password,
            identifier="bobs-session", clean_session=False, timeout=5,
        )  # fmt: skip

    async with persistent(bob) as client:
        await client.subscribe(T.reply("bob"), qos=1)
    async with raw_client(hub, "queue-for-bob") as client:
        await client.publish(T.reply("bob"), b"for bob only", qos=1)
    async with persistent(alice) as client:
        assert await received(client, 2.0) == []


async def test_a_connected_client_id_cannot_be_taken_by_another_login(broker: RunningBroker) -> None:
    """Client logins pick their own ids. On the embedded broker, Bob cannot close Alice's
    connection by connecting under her id; Alice herself can take it over (a reconnect)."""
    if broker.engine != "amqtt":
        pytest.skip("Mosquitto lets any login take over a connected client id (README, Security)")
    alice, bob = await broker.client_login("alice"), await broker.client_login("bob")
    async with raw_client(alice, "alices-laptop") as first:
        await first.subscribe(T.reply("alice"), qos=1)
        with pytest.raises(aiomqtt.MqttError):
            async with raw_client(bob, "alices-laptop"):
                pass
        # Alice's first connection is still up and still gets her replies.
        async with raw_client(broker.url(Role.HUB), "hub-side") as hub:
            await hub.publish(T.reply("alice"), b"still yours", qos=1)
        assert await received(first, 2.0) == [(T.reply("alice"), b"still yours")]
    async with raw_client(alice, "alices-laptop"):
        assert await try_to_take(alice, "alices-laptop", hold_s=0.2)  # her own login takes it over


def test_a_node_login_with_a_non_ascii_client_id_is_refused_not_an_error() -> None:
    # A client id is any UTF-8 a peer sends; hmac.compare_digest refuses non-ASCII str outright.
    from nova_swarm.broker.identity import client_id_allowed

    assert not client_id_allowed(Role.NODE, username="n1", password="pw", client_id="node-n1-\u00e9t\u00e9")
    assert client_id_allowed(Role.NODE, username="n1", password="pw", client_id=node_client_id("n1", "pw"))
