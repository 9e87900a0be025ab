"""LAN discovery: the TXT record and the key check on their own, then a real mDNS exchange
between network namespaces (tests/lan.py), where a phone joins with no address typed.

The namespace tests need root (CI runs as root) and are skipped with the reason otherwise. All
multicast stays on the test LAN's bridge: the hub announces only the addresses it listens on,
and inside its namespace those are the bridge's alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova_swarm.broker.contract.errors import DiscoveryError, ProtocolError
from nova_swarm.broker.contract.signing import PublicKey, SigningKey
from nova_swarm.broker.home import Joined, join_token, parse_join_token
from nova_swarm.broker.link import discovery
from nova_swarm.broker.link.discovery import Announcement, Found
from nova_swarm.broker.link.url import BrokerURL

from .lan import Host, Lan, LanUnavailable, check_available

BIN = Path(sys.executable).parent
PORT = 8883  # inside the namespaces: no clash with anything on the machine

KEY = SigningKey.generate().public
OTHER_KEY = SigningKey.generate().public


def _announcement(**changes: object) -> Announcement:
    base = Announcement(
        swarm="main", port=8883, tls=True, engine="amqtt", key_id=KEY.key_id, addresses=("10.1.2.3",), hostname="lab"
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _wire(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """The TXT record as zeroconf hands it to a browser: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def _found(**changes: object) -> Found:
    fields = discovery.decode_txt(_wire(discovery.encode_txt(_announcement())))
    found = Found(instance="main on lab", port=8883, addresses=("10.1.2.3",), **fields)  # type: ignore[arg-type]
    return replace(found, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the TXT record


@pytest.mark.parametrize("gateway_port", [None, 8080])
@pytest.mark.parametrize("tls", [True, False])
def test_txt_round_trip(tls: bool, gateway_port: int | None) -> None:
    announcement = _announcement(tls=tls, gateway_port=gateway_port, engine="mosquitto")
    txt = discovery.encode_txt(announcement)
    assert all(len(k) <= 9 for k in txt)  # DNS-SD's advice for keys
    assert discovery.decode_txt(_wire(txt)) == {
        "swarm": "main",
        "tls": tls,
        "engine": "mosquitto",
        "key_id": KEY.key_id,
        "gateway_port": gateway_port,
    }


def test_txt_ignores_unknown_keys_and_key_case() -> None:
    txt = _wire(discovery.encode_txt(_announcement()))
    txt[b"future"] = b"something"
    txt[b"flag"] = None  # a key with no value
    txt[b"SWARM"] = txt.pop(b"swarm")
    assert discovery.decode_txt(txt)["swarm"] == "main"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"txtvers": "2"}, "TXT version '2'"),
        ({"swarm": "Main Swarm"}, "swarm id"),
        ({"swarm": "main\n"}, "swarm id"),
        ({"tls": "yes"}, "tls='yes'"),
        ({"engine": "emqx"}, "engine='emqx'"),
        ({"key": "not-a-key-id"}, "key='not-a-key-id'"),
        ({"key": KEY.key_id.upper()}, "16-hex-digit"),
        ({"gw": "http"}, "gw='http'"),
        ({"gw": "70000"}, "gw='70000'"),
        ({"gw": "8²"}, "gw='8²'"),
    ],
)
def test_txt_rejects_damaged_records(change: dict[str, str], complaint: str) -> None:
    txt = {**discovery.encode_txt(_announcement()), **change}
    with pytest.raises(ProtocolError, match=re.escape(complaint)):
        discovery.decode_txt(_wire(txt))


def test_txt_names_what_is_missing_and_refuses_non_utf8() -> None:
    txt = discovery.encode_txt(_announcement())
    del txt["key"], txt["tls"]
    with pytest.raises(ProtocolError, match="lacks tls, key"):
        discovery.decode_txt(_wire(txt))
    with pytest.raises(ProtocolError, match="not UTF-8"):
        discovery.decode_txt({**_wire(discovery.encode_txt(_announcement())), b"swarm": b"\xff\xfe"})


_TXT_KEYS = st.sampled_from([b"txtvers", b"swarm", b"tls", b"engine", b"key", b"gw", b"other"]) | st.binary(max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_TXT_KEYS, st.none() | st.binary(max_size=40), max_size=8),
    st.booleans(),
)
def test_any_txt_record_parses_or_is_refused_clearly(txt: dict[bytes, bytes | None], ours: bool) -> None:
    """Whatever a device on the LAN announces, reading it never raises anything but ProtocolError."""
    if ours:  # start from a valid record, so the damage is in one field at a time
        txt = {**_wire(discovery.encode_txt(_announcement())), **txt}
    try:
        fields = discovery.decode_txt(txt)
    except ProtocolError:
        return
    assert isinstance(fields["swarm"], str) and isinstance(fields["tls"], bool)


def test_instance_names_fit_a_dns_label() -> None:
    long = _announcement(swarm="s" * 64, hostname="h" * 40)
    assert len(long.instance.encode()) == 63 and long.instance.startswith("s" * 63)
    assert _announcement().instance == "main on lab" and _announcement().server == "lab.local."


# ---------------------------------------------------------------- the key check


def test_the_right_swarm_passes() -> None:
    discovery.check(_found(), swarm="main", key=KEY)


def test_a_swarm_of_the_same_name_with_another_key_is_refused() -> None:
    with pytest.raises(DiscoveryError, match=f"hub key {KEY.key_id}, but your token's is {OTHER_KEY.key_id}"):
        discovery.check(_found(), swarm="main", key=OTHER_KEY)


def test_another_swarm_or_no_address_is_refused() -> None:
    with pytest.raises(DiscoveryError, match="announces swarm 'main', not 'lab'"):
        discovery.check(_found(), swarm="lab", key=KEY)
    with pytest.raises(DiscoveryError, match="no IPv4 address"):
        discovery.check(_found(addresses=()), swarm="main", key=KEY)


async def test_a_token_without_a_hub_key_cannot_discover() -> None:
    url = BrokerURL("10.1.2.3", 8883, "phone", "secret", tls=True)
    joined = Joined(url=str(url), swarm="main", node_id="phone", discover=True)
    with pytest.raises(DiscoveryError, match="no hub key"):
        await discovery.locate(joined)


def test_join_tokens_carry_the_discover_flag() -> None:
    url = str(BrokerURL("10.1.2.3", 8883, "phone", "secret", tls=True))
    assert parse_join_token(join_token(Joined(url=url, swarm="main", node_id="phone", discover=True))).discover
    # A token from before discovery existed has no such field: it joins by its address.
    assert not parse_join_token(join_token(Joined(url=url, swarm="main", node_id="phone"))).discover


# ---------------------------------------------------------------- what the hub announces


def test_loopback_brokers_are_not_announced() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert discovery.announce_addresses(host) == [], host
    assert discovery.announce_addresses("10.1.2.3") == ["10.1.2.3"]


def test_the_hub_announces_only_beyond_loopback_and_unless_told_not_to(tmp_path: Path) -> None:
    from argparse import Namespace

    from nova_swarm.broker.home import LocalSwarm, SwarmHome
    from nova_swarm.hub.cli.serve import _announcer

    home = SwarmHome(tmp_path)
    home.ensure()
    on = Namespace(no_discovery=False)
    assert _announcer(on, home, LocalSwarm(host="127.0.0.1"), None) is None
    assert _announcer(Namespace(no_discovery=True), home, LocalSwarm(host="10.1.2.3"), None) is None
    # On every interface, even with none up yet: the announcer waits for one.
    assert _announcer(on, home, LocalSwarm(host="0.0.0.0"), None) is not None
    announcer = _announcer(on, home, LocalSwarm(swarm="lab", host="10.1.2.3", port=8883, tls=True), None)
    assert announcer is not None and announcer.listen_host == "10.1.2.3"
    announced = announcer.announcement
    assert (announced.swarm, announced.port, announced.tls, announced.gateway_port) == ("lab", 8883, True, None)
    assert announced.key_id == home.signing_key().public.key_id


async def test_nothing_is_announced_without_an_address() -> None:
    with pytest.raises(DiscoveryError, match="no LAN address to announce"):
        async with discovery.announced(_announcement(addresses=())):
            pass


# ---------------------------------------------------------------- on a real (virtual) LAN


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    try:
        check_available()
    except LanUnavailable as exc:
        pytest.skip(str(exc))
    with Lan(2, tmp_path) as lan:
        yield lan


def _bin(name: str) -> str:
    return str(BIN / name)


def _wait_for(log: Path, proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> str:
    give_up = time.monotonic() + timeout
    while text not in (content := log.read_text(errors="replace")):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{content[-3000:]}")
        if time.monotonic() > give_up:
            raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{content[-3000:]}")
        time.sleep(0.1)
    return content


def _events(log: Path, event: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _announced(log: Path, proc: subprocess.Popen[bytes], *, after: int = 0, timeout: float = 60) -> dict[str, Any]:
    """The hub's next "announced on the LAN" log event past the first ``after``."""
    give_up = time.monotonic() + timeout
    while len(events := _events(log, "announced on the LAN")) <= after:
        if proc.poll() is not None or time.monotonic() > give_up:
            raise AssertionError(f"no announcement #{after + 1}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return events[after]


def _token(out: str) -> str:
    match = re.search(r"nova1\.[A-Za-z0-9_-]+", out)
    assert match, f"no join token in:\n{out}"
    return match.group(0)


def _wait_answered_by(hub: Host, node_id: str, timeout: float = 90) -> dict[str, object]:
    give_up = time.monotonic() + timeout
    while True:
        out = hub.run([_bin("swarm-hub"), "nodes", "--json", "--wait", "2"], check=False)
        if out.returncode == 0 and any(
            n["node_id"] == node_id and n["state"] == "online" for n in json.loads(out.stdout)["nodes"]
        ):
            break
        assert time.monotonic() < give_up, f"{node_id} never came online: {out.stdout}{out.stderr}"
        time.sleep(0.5)
    answer = hub.run([_bin("swarm-hub"), "ask", "found you?", "--json", "--timeout", "60"], timeout=90)
    reply: dict[str, object] = json.loads(answer.stdout)
    return reply


# A second swarm that is also called "main" (another household's hub on the same Wi-Fi): same
# name, its own key. It announces from the second phone's namespace until killed.
_DECOY = """
import asyncio, sys
from nova_swarm.broker.link import discovery

async def main():
    decoy = discovery.Announcement(swarm="main", port=8883, tls=True, engine="amqtt",
                                   key_id=sys.argv[1], addresses=(sys.argv[2],), hostname="decoy")
    async with discovery.announced(decoy) as name:
        print("decoy announced", name, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_phone_joins_with_no_address_typed(lan: Lan, tmp_path: Path) -> None:
    """The node asks from an ephemeral port and joins no multicast group, so the answers that
    reach it here came by unicast: what a phone without a Wi-Fi multicast lock receives."""
    phone, neighbour = lan.phones
    decoy_log = tmp_path / "decoy.log"
    decoy = neighbour.popen([sys.executable, "-c", _DECOY, OTHER_KEY.key_id, neighbour.address], log=decoy_log)
    _wait_for(decoy_log, decoy, "decoy announced")

    # The hub's machine has a second network the phones cannot reach (as Docker or a VPN makes).
    hidden = "10.214.9.1"
    lan.hub.run(["ip", "link", "add", "hidden0", "type", "veth", "peer", "name", "hidden1"])
    lan.hub.run(["ip", "addr", "add", f"{hidden}/24", "dev", "hidden0"])
    for link in ("hidden0", "hidden1"):
        lan.hub.run(["ip", "link", "set", link, "up"])

    hub_log = tmp_path / "hub.log"
    hub = lan.hub.popen(
        [_bin("swarm-hub"), "up", "--host", "0.0.0.0", "--port", str(PORT), "--tls", "--no-node", "--no-http"]
        + ["--log-json"],
        log=hub_log,
    )
    _wait_for(hub_log, hub, "swarm up:")
    # On every interface means every LAN address of the hub's namespace (not the machine's own).
    announced = _announced(hub_log, hub)
    assert set(announced["addresses"].split(",")) == {lan.hub.address, hidden}, announced

    enrolled = lan.hub.run([_bin("swarm-hub"), "enroll", phone.name, "--discover"])
    token = _token(enrolled.stdout)
    assert parse_join_token(token).discover

    joined = phone.run([_bin("swarm-node"), "join", token])
    assert "found by mDNS" in joined.stdout, joined.stdout
    saved = json.loads((phone.config_dir / "joined.json").read_text())
    url = BrokerURL.parse(saved["url"])
    # The hub's address on the phones' LAN: not the decoy's (it has the name but not the key),
    # nor the hub's other network.
    assert (url.host, url.port, url.tls, saved["discover"]) == (lan.hub.address, PORT, True, True)

    node_log = tmp_path / "node.log"
    node_argv = [_bin("swarm-node"), "run", "--engine", "fake", "--no-guard", "--log-json"]
    node = phone.popen(node_argv, log=node_log)
    assert _wait_answered_by(lan.hub, phone.name)["node_id"] == phone.name

    # The hub's machine got a new address while the phone was off: the saved one no longer
    # answers, so the node looks again at start, connects, and saves where the hub is now.
    phone.stop(node)
    saved["url"] = str(replace(url, host=f"{lan.hub.address.rsplit('.', 1)[0]}.250"))  # nobody there
    (phone.config_dir / "joined.json").write_text(json.dumps(saved))
    node = phone.popen(node_argv, log=node_log)
    assert _wait_answered_by(lan.hub, phone.name)["node_id"] == phone.name
    assert BrokerURL.parse(json.loads((phone.config_dir / "joined.json").read_text())["url"]).host == lan.hub.address
    assert "hub found at a new address" in node_log.read_text()


def test_a_hub_with_no_discovery_is_not_found(lan: Lan, tmp_path: Path) -> None:
    """With --no-discovery the hub stays silent: joining by discovery sees only the decoy, which
    has the name but not the key, so it fails, says what it saw, and saves nothing."""
    phone, neighbour = lan.phones
    decoy_log = tmp_path / "decoy.log"
    decoy = neighbour.popen([sys.executable, "-c", _DECOY, OTHER_KEY.key_id, neighbour.address], log=decoy_log)
    _wait_for(decoy_log, decoy, "decoy announced")
    hub_log = tmp_path / "hub.log"
    hub = lan.hub.popen(
        [_bin("swarm-hub"), "up", "--host", "0.0.0.0", "--port", str(PORT), "--tls", "--no-node", "--no-http"]
        + ["--no-discovery", "--log-json"],
        log=hub_log,
    )
    _wait_for(hub_log, hub, "swarm up:")
    token = _token(lan.hub.run([_bin("swarm-hub"), "enroll", phone.name, "--discover"]).stdout)
    hub_key = parse_join_token(token).hub_key
    assert hub_key is not None
    key_id = PublicKey.parse(hub_key).key_id

    joined = phone.run([_bin("swarm-node"), "join", token, "--discover-timeout", "3"], check=False)
    assert joined.returncode == 1, joined.stdout + joined.stderr
    assert f"no swarm 'main' with hub key {key_id} answered on the LAN within 3 s" in joined.stderr
    assert f"'main on decoy' announces swarm 'main' with hub key {OTHER_KEY.key_id}" in joined.stderr
    assert not (phone.config_dir / "joined.json").exists()
    assert not _events(hub_log, "announced on the LAN") and not _events(hub_log, "not announced on the LAN yet")


_FIND = """
import asyncio, json, sys
from nova_swarm.broker.link import discovery
from nova_swarm.broker.contract.signing import PublicKey

found = asyncio.run(discovery.find("main", PublicKey.parse(sys.argv[1]), timeout=10))
print(json.dumps(sorted(found.addresses)))
"""


def test_the_hub_announces_once_the_network_is_up_and_again_when_its_address_changes(lan: Lan, tmp_path: Path) -> None:
    """A hub that starts before the Wi-Fi is up is announced once it is; a new address (a new
    DHCP lease) is announced within seconds, and a phone that looks then finds it."""
    phone = lan.phones[0]
    lan.hub.run(["ip", "link", "set", "br0", "down"])  # the hub's machine has no network yet
    hub_log = tmp_path / "hub.log"
    hub = lan.hub.popen(
        [_bin("swarm-hub"), "up", "--host", "0.0.0.0", "--port", str(PORT), "--no-node", "--no-http", "--log-json"],
        log=hub_log,
    )
    _wait_for(hub_log, hub, "not announced on the LAN yet")
    assert not _events(hub_log, "announced on the LAN")

    lan.hub.run(["ip", "link", "set", "br0", "up"])
    assert _announced(hub_log, hub)["addresses"] == lan.hub.address
    lan.wait_reachable(phone)
    key = lan.hub.run([_bin("swarm-hub"), "key"]).stdout.strip()
    assert json.loads(phone.run([sys.executable, "-c", _FIND, key]).stdout) == [lan.hub.address]

    moved = f"{lan.hub.address.rsplit('.', 1)[0]}.3"
    lan.hub.run(["ip", "addr", "add", f"{moved}/24", "dev", "br0"])
    assert set(_announced(hub_log, hub, after=1)["addresses"].split(",")) == {lan.hub.address, moved}
    assert _events(hub_log, "LAN addresses changed; announcing again")
    assert json.loads(phone.run([sys.executable, "-c", _FIND, key]).stdout) == sorted([lan.hub.address, moved])
