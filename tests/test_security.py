"""No one let in: per-node logins, revocation, private replies, TLS-only brokers, no leaked secrets.

Every test runs against the embedded amqtt broker and Mosquitto mode. Where a test checks what
the broker refuses, it uses a raw aiomqtt client, so our own client's filtering cannot hide a
broker that lets too much through.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest

from nova_swarm.broker.contract.errors import ConnectionLost
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.identity import node_client_id
from nova_swarm.broker.link.connection import Connection
from nova_swarm.broker.link.url import BrokerURL

from .conftest import BIN, Processes, RunningBroker, env_for, start_broker, wait_online

T = Topics("main")


def raw_client(url: BrokerURL, client_id: str, *, timeout: float = 5.0) -> aiomqtt.Client:
    tls = None
    if url.tls:
        tls = aiomqtt.TLSParameters(ca_certs=str(url.ca_file) if url.ca_file else None)
    return aiomqtt.Client(
        url.host,
        url.port,
        username=url.username,
        password=url.password,
        identifier=client_id,
        tls_params=tls,
        timeout=timeout,
    )


async def received(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                got.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]
    except TimeoutError:
        pass
    return got


async def test_wrong_password_is_refused(broker: RunningBroker) -> None:
    n1 = await broker.enrolled("n1")
    for url in (n1.with_login("n1", "not-the-password"), broker.url(Role.CLIENT).with_login("client", "guess")):
        with pytest.raises(ConnectionLost, match="refused|Not authorized|not authori"):
            async with Connection(url, client_id=url.username, timeout=5):
                pass


async def test_a_node_cannot_impersonate_another_node(broker: RunningBroker) -> None:
    n1 = await broker.enrolled("n1")
    await broker.enrolled("n2")
    async with raw_client(broker.url(Role.HUB), "observer") as hub:
        await hub.subscribe(T.everything())
        # n1's login claiming n2's client id: amqtt refuses the CONNECT (it would otherwise knock
        # n2 off); Mosquitto lets it in, but the ACL follows the login, so it can do nothing as n2.
        try:
            async with raw_client(n1, "n2") as forger:
                for topic in (T.node_status("n2"), T.node_result("n2"), T.node_announce("n2")):
                    await forger.publish(topic, b"forged", qos=1)
                await forger.subscribe(T.node_task("n2"))
                await hub.publish(T.node_task("n2"), b"for n2 only", qos=1)
                assert await received(forger, 1.0) == []
        except aiomqtt.MqttError:
            assert broker.engine == "amqtt", "Mosquitto admits the login; only the ACL stops it"
        seen = [topic for topic, _ in await received(hub, 1.0)]
    assert T.node_status("n2") not in seen and T.node_result("n2") not in seen, seen


async def test_a_revoked_node_is_cut_off_and_the_rest_are_not(broker: RunningBroker) -> None:
    n1, n2 = await broker.enrolled("n1"), await broker.enrolled("n2")
    n1_id, n2_id = node_client_id("n1", n1.password), node_client_id("n2", n2.password)
    async with raw_client(n1, n1_id) as node1, raw_client(n2, n2_id) as node2:
        await node1.subscribe(T.node_task("n1"))
        await node2.subscribe(T.node_task("n2"))
        assert broker.home.revoke("n1")
        started = time.monotonic()
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(10):
                async for _ in node1.messages:
                    pass
        dropped_after = time.monotonic() - started
        async with raw_client(broker.url(Role.HUB), "hub-test") as hub:
            await hub.publish(T.node_task("n2"), b"still welcome", qos=1)
        assert await received(node2, 1.5) == [(T.node_task("n2"), b"still welcome")]
    assert dropped_after < 5, dropped_after
    with pytest.raises(aiomqtt.MqttError):  # and it cannot come back
        async with raw_client(n1, n1_id):
            pass


async def test_a_client_cannot_read_another_clients_replies(broker: RunningBroker) -> None:
    alice_login, bob_login = await broker.client_login("alice"), await broker.client_login("bob")
    async with raw_client(alice_login, "alice") as alice, raw_client(bob_login, "bob") as bob:
        for topic_filter in (T.reply("bob"), T.reply_filter(), "swarm/main/reply/+", "swarm/main/#"):
            try:
                await alice.subscribe(topic_filter, qos=1)  # amqtt refuses, Mosquitto never delivers
            except aiomqtt.MqttError:
                pass
        await alice.subscribe(T.reply("alice"), qos=1)
        await bob.subscribe(T.reply("bob"), qos=1)
        async with raw_client(broker.url(Role.HUB), "hub-test") as hub:
            await hub.publish(T.reply("bob"), b"for bob", qos=1)
            await hub.publish(T.reply("alice"), b"for alice", qos=1)
        assert await received(alice, 1.5) == [(T.reply("alice"), b"for alice")]
        assert await received(bob, 0.5) == [(T.reply("bob"), b"for bob")]


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
async def test_tls_only_broker_refuses_plaintext_and_unpinned_clients(
    engine: str, home: SwarmHome, tmp_path: Path
) -> None:
    running = await start_broker(engine, home, tmp_path, tls=True)
    try:
        url = BrokerURL("127.0.0.1", running.port, *_login(home, Role.CLIENT), tls=True, ca_file=home.ca_file)
        async with Connection(url, client_id="c-tls") as conn:  # the pinned CA: works
            await conn.subscribe(T.reply("c-tls"))
        with pytest.raises(ConnectionLost):  # plaintext to a TLS-only port
            async with Connection(BrokerURL("127.0.0.1", running.port, *_login(home, Role.CLIENT)), timeout=3):
                pass
        with pytest.raises(ConnectionLost, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            async with Connection(BrokerURL("127.0.0.1", running.port, *_login(home, Role.CLIENT), tls=True)):
                pass  # the system's trust store does not know the swarm's CA
        # The real mosquitto_pub: refused in plaintext, accepted with --cafile.
        user, password = _login(home, Role.CLIENT)
        flags = ["-h", "127.0.0.1", "-p", str(running.port), "-u", user, "-P", password, "-t", T.prompt(), "-m", "x"]
        plain = subprocess.run(["mosquitto_pub", *flags], capture_output=True, timeout=20)
        assert plain.returncode != 0
        pinned = subprocess.run(
            ["mosquitto_pub", *flags, "--cafile", str(home.ca_file)], capture_output=True, timeout=20
        )
        assert pinned.returncode == 0, pinned.stderr
    finally:
        running.stop()


def _login(home: SwarmHome, role: Role) -> tuple[str, str]:
    login = home.logins()[role]
    return login.username, login.password


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
async def test_enroll_join_and_revoke_a_node_over_tls(engine: str, home: SwarmHome, tmp_path: Path) -> None:
    """The path a phone owner takes: enroll on the hub, paste the one-line command, later revoke."""
    running = await start_broker(engine, home, tmp_path, tls=True)
    procs = Processes(running, tmp_path)
    try:
        procs.hub()
        out = procs.run(
            [str(BIN / "swarm-hub"), "enroll", "phone1", "--host", "127.0.0.1", "--config-dir", str(home.path)]
        )
        assert out.returncode == 0, out.stderr
        command = out.stdout.strip()
        # No gateway ran from this config dir, so nothing serves the installer: the line is the join alone
        # (the one-line install that the gateway serves is tested in test_join.py and test_lan.py).
        assert command.startswith("swarm-node join nova1.") and command.endswith(" && swarm-node run")
        token = re.search(r"join (nova1\.\S+)", command).group(1)  # type: ignore[union-attr]
        phone_home = tmp_path / "phone"  # the phone has none of the hub's config
        joined = subprocess.run(
            [str(BIN / "swarm-node"), "join", token, "--config-dir", str(phone_home)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env_for(SwarmHome(phone_home)),
        )
        assert joined.returncode == 0, joined.stderr
        assert "CA pinned" in joined.stdout
        procs.spawn(
            "node-phone1",
            [
                str(BIN / "swarm-node"),
                "run",
                "--config-dir",
                str(phone_home),
                "--engine",
                "fake",
                "--heartbeat",
                "1",
                "--log-level",
                "debug",
            ],
        )
        online = await wait_online(procs, 1, timeout=60)
        assert [n["node_id"] for n in online] == ["phone1"]
        answer = procs.swarm_hub("ask", "hello over TLS", "--json", "--timeout", "60")
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["node_id"] == "phone1"

        revoked = procs.run([str(BIN / "swarm-hub"), "revoke", "phone1", "--config-dir", str(home.path)])
        assert revoked.returncode == 0, revoked.stderr
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        while True:
            nodes = procs.swarm_hub("nodes", "--json", "--wait", "2")
            states = {n["node_id"]: n["state"] for n in json.loads(nodes.stdout)["nodes"]}
            if states.get("phone1") == "offline":
                break
            assert loop.time() < give_up, states
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        assert re.search(r"refused|Not authorized|not authori", procs.log("node-phone1"))
    finally:
        procs.close()
        running.stop()


async def test_no_secret_in_retained_messages_or_logs(broker: RunningBroker, procs: Processes, tmp_path: Path) -> None:
    procs.hub()
    procs.node("n1", "--engine", "fake")
    await wait_online(procs, 1)
    assert procs.swarm_hub("ask", "anything", "--timeout", "60").returncode == 0
    secrets = [login.password for login in broker.home.logins().values()]
    secrets += [e.password for e in broker.home.enrolments().values()]
    assert len(secrets) == 3
    retained: list[bytes] = []
    async with raw_client(broker.url(Role.HUB), "auditor") as hub:
        await hub.subscribe(T.everything())
        retained = [payload for _, payload in await received(hub, 1.5)]
    assert retained, "the hub and node publish retained state"
    logs = [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
    assert logs
    for secret in secrets:
        assert not any(secret.encode() in payload for payload in retained)
        assert not any(secret in text for text in logs)
