"""The commands as a newcomer runs them: `swarm-hub up`, then `ask`, `nodes`, `status` and
`creds` with no flags, on one machine."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nova_swarm.broker.home import Role, SwarmHome
from nova_swarm.broker.link.net import free_port

from .conftest import BIN, require_mosquitto

pytestmark = pytest.mark.llama


def run(home: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "NOVA_SWARM_HOME": str(home), "HOME": str(home.parent)}
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(("engine", "tls"), [("amqtt", False), ("mosquitto", False), ("amqtt", True)])
def test_up_then_ask_nodes_status_and_creds_with_no_flags(tmp_path: Path, engine: str, tls: bool) -> None:
    if engine == "mosquitto":
        require_mosquitto()
    home = tmp_path / "config"
    port = free_port()
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "NOVA_SWARM_HOME": str(home), "HOME": str(tmp_path)}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [str(BIN / "swarm-hub"), "up", "--port", str(port), "--broker-engine", engine, "--heartbeat-interval", "1"]
        + (["--tls"] if tls else []),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        give_up = time.monotonic() + 240  # generous: CI machines are shared and noisy
        while True:
            asked = run(home, "swarm-hub", "ask", "What is 2+2?", "--max-tokens", "24", "--timeout", "90")
            if asked.returncode == 0:
                break
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < give_up, asked.stderr
            time.sleep(1)
        assert asked.stdout.strip()
        assert "node " in asked.stderr and "tok/s" in asked.stderr

        nodes = run(home, "swarm-hub", "nodes")
        assert nodes.returncode == 0, nodes.stderr
        assert "online" in nodes.stdout and "SmolLM2-135M-Instruct.Q4_1" in nodes.stdout

        status = run(home, "swarm-hub", "status", "--json")
        assert json.loads(status.stdout)["nodes_online"] == 1

        # `mosquitto_pub $(swarm-hub creds) ...` just works.
        require_mosquitto()
        creds = run(home, "swarm-hub", "creds").stdout.strip()
        password = SwarmHome(home).logins()[Role.CLIENT].password
        cafile = f" --cafile {home / 'tls' / 'ca.pem'}" if tls else ""
        assert creds == f"-h 127.0.0.1 -p {port} -u client -P {password}{cafile}"
        if tls:  # TLS only: the same command without the CA is refused
            plain = subprocess.run(["mosquitto_pub", *shlex.split(creds)[:8], "-t", "swarm/main/prompt", "-m", "x"])
            assert plain.returncode != 0
        reader = subprocess.Popen(
            ["mosquitto_sub", *shlex.split(creds), "-t", "swarm/main/reply/default", "-C", "1", "-W", "60"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.7)
        pub = subprocess.run(["mosquitto_pub", *shlex.split(creds), "-t", "swarm/main/prompt", "-m", "Hello!"])
        assert pub.returncode == 0
        out, _ = reader.communicate(timeout=70)
        assert json.loads(out)["ok"] is True
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rc = up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert rc == 0, (tmp_path / "up.log").read_text()
    assert not port_open(port)  # the broker went down with it
    text = (tmp_path / "up.log").read_text()
    assert "hub stopped" in text and "node stopped" in text


def test_creds_prints_mosquitto_flags_for_each_role(tmp_path: Path) -> None:
    home = SwarmHome(tmp_path / "config")
    logins = home.ensure()
    for role, login in logins.items():
        out = run(home.path, "swarm-hub", "creds", "--role", role.value, "--port", "1999")
        assert out.stdout.split() == ["-h", "127.0.0.1", "-p", "1999", "-u", login.username, "-P", login.password]
    url = run(home.path, "swarm-hub", "creds", "--url").stdout.strip()
    assert url.startswith("mqtt://client:") and url.endswith("@127.0.0.1:1883")


def test_clear_errors_instead_of_tracebacks(tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    out = run(empty, "swarm-hub", "ask", "hi")
    assert out.returncode == 2 and "no credentials" in out.stderr and "Traceback" not in out.stderr
    out = run(empty, "swarm-node", "run", "--broker", "http://nope")
    assert out.returncode == 2 and "mqtt://" in out.stderr and "Traceback" not in out.stderr
    out = run(empty, "swarm-node", "run", "--broker", "mqtt://a:b@127.0.0.1:1", "--model", str(tmp_path / "x.gguf"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    home = SwarmHome(tmp_path / "config")
    home.ensure()
    out = run(home.path, "swarm-hub", "ask", "hi", "--port", str(free_port()), "--timeout", "3")
    assert out.returncode == 3 and "cannot connect" in out.stderr and "Traceback" not in out.stderr


def test_python_dash_m_entry_points_exist() -> None:
    for module in ("nova_swarm.broker", "nova_swarm.hub", "nova_swarm.node"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout
