"""Phones on a real (virtual) LAN: network namespaces on a bridge (tests/lan.py), a hub on the
bridge address with TLS, and `swarm-node` in every phone namespace.

Needs root (CI runs as root); skipped with the reason otherwise. The phones run the fake engine:
these tests are about the network, enrolment and scheduling, not inference.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nova_swarm.broker.home import parse_join_token
from nova_swarm.broker.link.url import BrokerURL

from .lan import SUBNET, Host, Lan, LanUnavailable, check_available

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
PORT = 8883  # the namespaces have ports of their own: no clash with anything on the machine
HTTP_PORT = 8080
#: the interpreter this test run's venv was made from: the installer's venv is made from it too,
#: so the packages of our site-packages (NOVA_SWARM_DEPS_SITE) fit it
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


def _bin(name: str) -> str:
    return str(BIN / name)


def _lan(tmp_path: Path, phones: int) -> Lan:
    try:
        check_available()
    except LanUnavailable as exc:
        pytest.skip(str(exc))
    return Lan(phones, tmp_path)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    with _lan(tmp_path, 3) as lan:
        yield lan


def _python_in(host: Host, code: str) -> Any:
    """Run ``code`` (which prints JSON) with this interpreter inside the host's namespace."""
    return json.loads(host.run([sys.executable, "-c", code]).stdout)


# ---------------------------------------------------------------- addresses and names


def test_lan_addresses_here_are_never_loopback_or_link_local() -> None:
    from nova_swarm.broker.link import net

    found = net.lan_addresses()
    listed = subprocess.run(["ip", "-o", "addr", "show", "up"], capture_output=True, text=True, check=True).stdout
    for address in found:
        assert not address.startswith(("127.", "fe80:", "169.254.")) and address != "::1"
        assert f" {address}/" in listed, f"{address} is not an address of an interface that is up"


def test_lan_addresses_and_certificate_names_inside_the_lan(tmp_path: Path) -> None:
    with _lan(tmp_path, 1) as lan:
        phone = lan.phones[0]
        code = (
            "import json; from nova_swarm.broker.link import net; from nova_swarm.broker.server import tls; "
            "print(json.dumps([net.lan_addresses(), net.mdns_name(), tls.broker_names('0.0.0.0')]))"
        )
        hub_addresses, mdns, names = _python_in(lan.hub, code)
        assert hub_addresses == [lan.hub.address]  # the bridge, and not the machine's own eth0
        assert lan.hub.address in names and mdns in names and mdns.endswith(".local")
        addresses = [n for n in names if n[0].isdigit() or ":" in n]
        assert set(addresses) == {"127.0.0.1", "::1", lan.hub.address}  # nothing from outside the LAN
        assert _python_in(phone, code)[0] == [phone.address]

        # An interface that is down gives no address; with none left, enroll falls back to the
        # mDNS name (which the certificate names) rather than to a loopback address.
        phone.run(["ip", "link", "set", "eth0", "down"])
        none, mdns, names = _python_in(phone, code)
        assert none == [] and phone.address not in names
        code = "import json; from nova_swarm.hub.cli.admin import _lan_host; print(json.dumps(_lan_host()))"
        host = _python_in(phone, code)
        assert host == mdns


def test_certificate_is_reissued_for_a_new_address_with_the_same_ca_and_key(tmp_path: Path) -> None:
    from cryptography import x509

    from nova_swarm.broker.server import tls

    def san(files: tls.TLSFiles) -> set[str]:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(getattr(n, "value", n)) for n in names}

    first = tls.ensure(tmp_path, ["localhost", "10.213.9.1", "box.local"])
    ca, key, cert = first.ca.read_bytes(), first.key.read_bytes(), first.cert.read_bytes()
    assert tls.ensure(tmp_path, ["localhost", "10.213.9.1"]).cert.read_bytes() == cert  # covered: kept
    moved = tls.ensure(tmp_path, ["localhost", "10.213.7.1", "box.local"])  # the laptop changed networks
    assert "10.213.7.1" in san(moved) and moved.cert.read_bytes() != cert
    assert moved.ca.read_bytes() == ca and moved.key.read_bytes() == key  # pinned CA and key pin still hold


_HANDSHAKE = """
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)  # verifies the certificate names this address
try:
    with context.wrap_socket(socket.create_connection((host, port), timeout=3), server_hostname=host):
        print("verified")
except (OSError, ssl.SSLError) as exc:
    print(f"refused: {exc}")
"""


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
def test_the_certificate_follows_a_new_address_while_the_broker_runs(tmp_path: Path, engine: str) -> None:
    with _lan(tmp_path, 1) as lan:
        phone, log = lan.phones[0], tmp_path / "broker.log"
        broker = lan.hub.popen(
            [_bin("swarm-broker"), "--engine", engine, "--host", "0.0.0.0", "--port", str(PORT), "--tls"]
            + ["--tls-recheck", "0.5", "--log-json"],
            log=log,
        )
        _wait_for_line(log, broker, "broker listening")
        ca = str(lan.hub.config_dir / "tls" / "ca.pem")

        def handshake(address: str) -> str:
            return str(phone.run([sys.executable, "-c", _HANDSHAKE, address, str(PORT), ca]).stdout.strip())

        assert handshake(lan.hub.address) == "verified"
        lan.hub.run(["ip", "addr", "add", f"{SUBNET}.2/24", "dev", "br0"])  # the hub gets a second address
        give_up = time.monotonic() + 30
        while (answer := handshake(f"{SUBNET}.2")) != "verified":
            assert time.monotonic() < give_up, (
                f"the certificate never named the new address: {answer}\n{log.read_text()}"
            )
            time.sleep(0.3)
        assert broker.poll() is None and "broker certificate reissued" in log.read_text()  # no restart
        assert handshake(lan.hub.address) == "verified"  # and the old address still verifies


# ---------------------------------------------------------------- a swarm on the LAN


@dataclass
class Swarm:
    lan: Lan
    hub_log: Path
    hub: subprocess.Popen[bytes]
    nodes: dict[str, subprocess.Popen[bytes]]

    def hub_cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lan.hub.run([_bin("swarm-hub"), *args], timeout=timeout, check=check)

    def node_rows(self) -> list[dict[str, Any]]:
        out = self.hub_cli("nodes", "--json", "--wait", "2", check=False)
        return list(json.loads(out.stdout)["nodes"]) if out.returncode == 0 else []

    def until(self, check: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 90) -> None:
        give_up = time.monotonic() + timeout
        while True:
            rows = self.node_rows()
            if check(rows):
                return
            if time.monotonic() > give_up:
                raise AssertionError(f"never {what}: {rows}\n{self.hub_log.read_text()[-3000:]}")
            time.sleep(0.5)

    def online(self, rows: list[dict[str, Any]]) -> set[str]:
        return {r["node_id"] for r in rows if r["state"] == "online"}

    def ask_all(self, prompts: list[str], timeout: float = 90, max_tokens: int = 16) -> list[dict[str, Any]]:
        """Ask every prompt at once, each from its own `swarm-hub ask` in the hub's namespace."""
        answers: list[dict[str, Any] | str] = [""] * len(prompts)

        def ask(i: int) -> None:
            out = self.hub_cli(
                "ask",
                prompts[i],
                "--json",
                "--timeout",
                str(timeout),
                "--max-tokens",
                str(max_tokens),
                timeout=timeout + 30,
                check=False,
            )
            answers[i] = json.loads(out.stdout) if out.returncode == 0 else f"{out.stdout}\n{out.stderr}"

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lost = [(p, a) for p, a in zip(prompts, answers, strict=True) if not isinstance(a, dict)]
        assert not lost, f"prompts without an answer: {lost}\n{self.hub_log.read_text()[-3000:]}"
        return [a for a in answers if isinstance(a, dict)]

    def hub_events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.hub_log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event:
                    found.append(record)
        return found


def _wait_for_line(log: Path, proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > give_up:
            raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _token(enroll_output: str) -> str:
    match = re.search(r"nova1\.[A-Za-z0-9_-]+", enroll_output)
    assert match, f"no join token in enroll's output:\n{enroll_output}"
    return match.group(0)


def deps_site(tmp_path: Path) -> Path:
    """Our site-packages minus nova-swarm itself: where the installer's venv takes third-party
    packages from (NOVA_SWARM_DEPS_SITE), as the phones have no package index to reach."""
    site = tmp_path / "deps-site"
    site.mkdir(exist_ok=True)
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("__editable__", "nova_swarm")) and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    return site


def _start_swarm(
    lan: Lan,
    tmp_path: Path,
    *,
    delay_s: float = 0.0,
    enroll_host: dict[str, str] | None = None,
    one_line: bool = False,
) -> Swarm:
    """`swarm-hub up --host <bridge> --tls` in the hub namespace, and each phone enrolled and
    running a node in its own namespace: with ``one_line``, by running exactly the line `enroll`
    printed (the installer and nova-swarm's wheel come from the hub; the node runs the bundled
    model), else by `swarm-node join TOKEN` and `swarm-node run` with a fake engine."""
    hub_log = tmp_path / "hub.log"
    http = ["--http", f"{lan.hub.address}:{HTTP_PORT}"] if one_line else ["--no-http"]
    hub = lan.hub.popen(
        [_bin("swarm-hub"), "up", "--host", lan.hub.address, "--port", str(PORT), "--tls", "--no-node", *http]
        # debug: which node each task went to ("dispatched") is logged per request, at debug
        + ["--log-json", "--log-level", "debug"],
        log=hub_log,
    )
    _wait_for_line(hub_log, hub, "swarm up:")
    swarm = Swarm(lan, hub_log, hub, {})
    for phone in lan.phones:
        host = enroll_host.get(phone.name) if enroll_host else None
        enrolled = swarm.hub_cli("enroll", phone.name, *(["--host", host] if host else []))
        url = BrokerURL.parse(parse_join_token(_token(enrolled.stdout)).url)
        assert url.tls and url.host == (host or lan.hub.address), url.redacted()
        if one_line:
            line = enrolled.stdout.strip()
            assert "\n" not in line and f"https://{host or lan.hub.address}:{HTTP_PORT}/join/" in line, line
            installer_env = {
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "NOVA_SWARM_PYTHON": BASE_PYTHON,
                "NOVA_SWARM_DEPS_SITE": str(deps_site(tmp_path)),
            }
            installed = phone.run(["sh", "-c", line], env=installer_env, timeout=400, check=False)
            assert installed.returncode == 0, f"{phone.name}: {line}\n{installed.stdout}\n{installed.stderr}"
        else:
            joined = phone.run([_bin("swarm-node"), "join", _token(enrolled.stdout)])
            assert phone.name in joined.stdout
            swarm.nodes[phone.name] = phone.popen(
                [_bin("swarm-node"), "run", "--engine", "fake", "--engine-option", f"delay_s={delay_s}"]
                + ["--no-guard", "--log-json", "--drain", "1"],
                log=tmp_path / f"{phone.name}.log",
            )
    names = {p.name for p in lan.phones}
    swarm.until(lambda rows: names <= swarm.online(rows), f"all phones online ({sorted(names)})", timeout=240)
    return swarm


def test_phones_answer_over_tls_and_plaintext_is_refused(lan: Lan, tmp_path: Path) -> None:
    # The last phone joins by the hub's mDNS name: its resolver has the name (mDNS itself is
    # discovery's business), and the certificate must name it for TLS to verify.
    mdns = _python_in(
        lan.hub, "import json; from nova_swarm.broker.link import net; print(json.dumps(net.mdns_name()))"
    )
    by_name = lan.phones[-1]
    lan.resolve(by_name, mdns, lan.hub.address)
    swarm = _start_swarm(lan, tmp_path, enroll_host={by_name.name: mdns}, one_line=True)

    # Every answer comes from a phone, and every phone answers. The hub spreads concurrent
    # prompts, but a phone slowed down by a busy machine may miss a round: up to four rounds.
    phones, answered_by = {p.name for p in lan.phones}, set()
    for n in range(4):
        answers = swarm.ask_all([f"Say the number {n * 6 + i}." for i in range(6)], max_tokens=8)
        answered_by |= {a["node_id"] for a in answers}
        assert answered_by <= phones, answered_by
        if answered_by == phones:
            break
    dispatched = [(e["node_id"], e.get("timestamp")) for e in swarm.hub_events("dispatched")]
    assert answered_by == phones, f"only {answered_by} answered; dispatched: {dispatched}"
    for phone in lan.phones:  # the node the installer set up, from the hub's wheel, in the phone's home
        venv = phone.home / ".local" / "share" / "nova-swarm" / "venv"
        assert list(venv.glob("lib/python*/site-packages/nova_swarm/node/agent.py")), f"{phone.name}: no wheel install"

    # The same login over plaintext is refused: the broker speaks only TLS.
    phone = lan.phones[0]
    url = BrokerURL.parse(parse_join_token(_token(swarm.hub_cli("enroll", "plain").stdout)).url)
    code = (
        "import sys\n"
        "import paho.mqtt.client as mqtt\n"
        "c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id='plain', protocol=mqtt.MQTTv311)\n"
        f"c.username_pw_set({url.username!r}, {url.password!r})\n"
        "try:\n"
        f"    c.connect({url.host!r}, {url.port}, keepalive=5)\n"
        "    for _ in range(50):\n"
        "        c.loop(0.1)\n"
        "        if c.is_connected(): print('CONNECTED'); sys.exit(0)\n"
        "except OSError as exc:\n"
        "    print('refused', exc); sys.exit(1)\n"
        "print('no CONNACK'); sys.exit(1)\n"
    )
    plain = phone.run([sys.executable, "-c", code], check=False)
    assert plain.returncode == 1 and "CONNECTED" not in plain.stdout, plain.stdout + plain.stderr
    if shutil.which("mosquitto_pub"):
        pub = phone.run(
            ["mosquitto_pub", "-h", url.host, "-p", str(url.port), "-u", url.username or "", "-P", url.password or ""]
            + ["-V", "mqttv311", "-i", "plain", "-t", "swarm/x", "-m", "hi"],
            timeout=30,
            check=False,
        )
        assert pub.returncode != 0, pub.stdout + pub.stderr


def _utc(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_a_busy_phone_drops_off_the_lan_and_comes_back(lan: Lan, tmp_path: Path) -> None:
    swarm = _start_swarm(lan, tmp_path, delay_s=5.0)  # `swarm-node join`: a slow fake engine
    answers: list[dict[str, Any]] = []
    tasks = [f"task {i}" for i in range(3)]
    asking = threading.Thread(target=lambda: answers.extend(swarm.ask_all(tasks, timeout=120)))
    asking.start()
    try:
        # Every task handed out (the scheduler may queue two on one phone: it draws, it does not
        # deal); then a phone with a task walks out of Wi-Fi range.
        give_up = time.monotonic() + 60
        while len(swarm.hub_events("dispatched")) < len(tasks):
            assert time.monotonic() < give_up, f"the tasks were not all sent:\n{swarm.hub_log.read_text()[-3000:]}"
            time.sleep(0.05)
        busy = swarm.hub_events("dispatched")[0]["node_id"]
        lost = next(phone for phone in lan.phones if phone.name == busy)
        before = len(swarm.hub_events("dispatched"))
        lan.link_down(lost)
        down_at = time.time()
        asking.join(180)
    finally:
        asking.join(200)
    assert len(answers) == 3, "a prompt was lost"
    assert lost.name not in {a["node_id"] for a in answers}
    redispatched = [e for e in swarm.hub_events("dispatched")[before:] if e["node_id"] != lost.name]
    assert redispatched, f"the lost phone's task was never sent elsewhere:\n{swarm.hub_log.read_text()[-3000:]}"
    took = _utc(redispatched[0]["timestamp"]) - down_at
    print(f"\nlink down -> task re-dispatched to {redispatched[0]['node_id']} in {took:.2f} s")
    assert took < 15, f"re-dispatch took {took:.1f} s after the link went down"

    # Back in range: the same node process reconnects by itself and answers again.
    lan.link_up(lost)
    swarm.until(lambda rows: lost.name in swarm.online(rows), f"{lost.name} back online", timeout=120)
    assert swarm.nodes[lost.name].poll() is None, "the node process died instead of reconnecting"
    give_up = time.monotonic() + 120
    while lost.name not in {a["node_id"] for a in swarm.ask_all([f"again {i}" for i in range(3)])}:
        assert time.monotonic() < give_up, f"{lost.name} is online but never answered again"
