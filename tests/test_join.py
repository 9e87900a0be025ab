"""The one-line join: `swarm-hub enroll` prints a line that fetches the installer and a wheel of the
hub's own nova-swarm from the hub's gateway, and installs, joins and starts the node.

Everything runs for real on loopback: `swarm-hub up` (broker, hub, gateway over HTTPS or HTTP),
the printed line run by `sh` with real curl, the real Linux and Termux installers (Termux with the
stand-in `pkg` of test_installers) and the real node with the bundled SmolLM2 answering a prompt.
Offline, the one override is NOVA_SWARM_DEPS_SITE: the installer's venv takes the third-party
packages from this test run's own site-packages instead of PyPI, and pip installs only the hub's
wheel (with --no-deps, from no index).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import SwarmHome
from nova_swarm.broker.link.net import free_port
from nova_swarm.hub import join

from .conftest import BIN, stop_process
from .test_installers import stand_ins

pytestmark = pytest.mark.timeout(600)

#: the interpreter this test run's venv was made from: the installer's venv is made from it too,
#: so the packages in our site-packages (NOVA_SWARM_DEPS_SITE) fit it
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


def deps_site(tmp_path: Path) -> Path:
    """Our site-packages minus nova-swarm itself (its editable install): what the installer's venv
    may take third-party packages from, so pip never sees another nova-swarm."""
    site = tmp_path / "deps-site"
    site.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("__editable__", "nova_swarm")):
            (site / entry.name).symlink_to(entry)
    return site


LINE = re.compile(
    r"curl -fsS (?:--pinnedpubkey '(?P<pin>sha256//[A-Za-z0-9+/]{43}=)' -k )?"
    r"-H 'Authorization: Bearer (?P<key>[a-z0-9_-]+\.[0-9a-f]{32})' "
    r"(?P<base>https?://127\.0\.0\.1:\d+)/join/install\.sh \| sh -s -- (?P<token>nova1\.[A-Za-z0-9_-]+)"
)


@dataclass
class Up:
    home: SwarmHome
    http_port: int
    tls: bool
    proc: subprocess.Popen[bytes]
    log: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "swarm-hub"), *args, "--config-dir", str(self.home.path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def enroll(self, node_id: str) -> str:
        out = self.run("enroll", node_id, "--host", "127.0.0.1")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60)


def pinned(up: Up, pin: str | None = None) -> list[str]:
    """curl's flags for the gateway: its public key pinned, as in the line (none without TLS)."""
    if not up.tls:
        return []
    return ["--pinnedpubkey", pin or join.public_key_pin((up.home.tls_dir / "server.pem").read_bytes()), "-k"]


def status_of(up: Up, path: str, *headers: str, pin: str | None = None) -> int:
    """The HTTP status of a GET on the gateway (curl, pinned like the line when TLS is on)."""
    scheme = "https" if up.tls else "http"
    args = pinned(up, pin) + ["-o", "/dev/null", "-w", "%{http_code}"]
    for header in headers:
        args += ["-H", header]
    out = curl(*args, f"{scheme}://127.0.0.1:{up.http_port}{path}")
    return int(out.stdout.decode() or 0)


@pytest.fixture(params=[True, False], ids=["tls", "plain"])
def up(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Up]:
    tls: bool = request.param
    home = SwarmHome(tmp_path / "hub-config")
    http_port = free_port()
    log = tmp_path / "up.log"
    argv = [str(BIN / "swarm-hub"), "up", "--port", str(free_port()), "--http", f"127.0.0.1:{http_port}"]
    argv += ["--no-node", "--config-dir", str(home.path), "--no-log-file"] + (["--tls"] if tls else [])
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    running = Up(home, http_port, tls, proc, log)
    try:
        give_up = time.monotonic() + 120
        while not (join.endpoint_file(home).exists() and status_of(running, "/health") == 200):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < give_up, log.read_text()
            time.sleep(0.5)
        yield running
    finally:
        stop_process(proc, sig=signal.SIGINT, grace=60)


def parse_line(line: str) -> re.Match[str]:
    shape = LINE.fullmatch(line)
    assert shape, line
    return shape


def test_the_printed_line_has_the_documented_shape(up: Up) -> None:
    shape = parse_line(up.enroll("phone1"))
    assert shape["base"] == f"{'https' if up.tls else 'http'}://127.0.0.1:{up.http_port}"
    enrolment = up.home.enrolments()["phone1"]
    assert shape["key"] == join.download_key(enrolment)
    if up.tls:
        # The pin is the served certificate's public key: what curl checks with no CA to go on.
        assert shape["pin"] == join.public_key_pin((up.home.tls_dir / "server.pem").read_bytes())
    else:
        assert shape["pin"] is None
        notes = up.run("enroll", "phone1", "--host", "127.0.0.1").stderr
        assert "crosses the LAN in clear" in notes


def test_downloads_need_the_nodes_own_key(up: Up) -> None:
    key = parse_line(up.enroll("phone1"))["key"]
    other = parse_line(up.enroll("phone2"))["key"]
    wheel = join.wheel_name(__version__)
    for name in ("install.sh", "linux.sh", "termux.sh", "linux-uninstall.sh", "termux-uninstall.sh", wheel):
        path = f"/join/{name}"
        assert status_of(up, path) == 401, name
        assert status_of(up, path, "Authorization: Bearer nope") == 403, name
        assert status_of(up, path, f"Authorization: Bearer {key[:-1]}0") == 403, name
        assert status_of(up, path, f"Authorization: Bearer {up.home.gateway_token()}") == 403, name
        assert status_of(up, path, f"Authorization: Bearer {key}") == 200, name
        assert status_of(up, path, f"Authorization: Bearer {other}") == 200, name
    assert status_of(up, "/join/passwd", f"Authorization: Bearer {key}") == 404
    # Revoked, or re-enrolled with a new password: the old key opens nothing.
    assert up.run("revoke", "phone2").returncode == 0
    assert status_of(up, "/join/install.sh", f"Authorization: Bearer {other}") == 403
    assert up.run("enroll", "phone1", "--rotate", "--host", "127.0.0.1").returncode == 0
    assert status_of(up, f"/join/{wheel}", f"Authorization: Bearer {key}") == 403
    if up.tls:
        # The wrong pin: curl refuses the hub before sending anything.
        wrong = "sha256//" + "A" * 43 + "="
        assert status_of(up, "/health", pin=wrong) == 0


def test_the_served_wheel_installs_into_a_fresh_venv(up: Up, tmp_path: Path) -> None:
    key = parse_line(up.enroll("phone1"))["key"]
    wheel = tmp_path / join.wheel_name(__version__)
    scheme = "https" if up.tls else "http"
    out = curl(
        "-f", *pinned(up), "-H", f"Authorization: Bearer {key}", "-o", str(wheel),
        f"{scheme}://127.0.0.1:{up.http_port}/join/{wheel.name}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "nova_swarm/node/agent.py" in names and "nova_swarm/broker/contract/topics.py" in names
    assert not [n for n in names if n.startswith("nova_swarm/hub/")]  # the node's code only
    meta = zipfile.ZipFile(wheel).read(f"nova_swarm-{__version__}.dist-info/METADATA").decode()
    assert "Requires-Dist: llama-cpp-python>=0.3.2" in meta and "amqtt" not in meta
    # Every file is the one its RECORD names (pip checks that too), and the wheel is built once per
    # version: a second download is the same bytes.
    with zipfile.ZipFile(wheel) as zf:
        record = zf.read(f"nova_swarm-{__version__}.dist-info/RECORD").decode()
        for name, digest, _size in csv.reader(io.StringIO(record)):
            if digest:
                raw = base64.urlsafe_b64encode(hashlib.sha256(zf.read(name)).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={raw}", name
    again = tmp_path / "again.whl"
    out = curl("-f", *pinned(up), "-H", f"Authorization: Bearer {key}", "-o", str(again),
               f"{scheme}://127.0.0.1:{up.http_port}/join/{wheel.name}")  # fmt: skip
    assert out.returncode == 0 and again.read_bytes() == wheel.read_bytes()

    venv = tmp_path / "fresh"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (venv / "bin" / "swarm-node").exists()
    probe = (
        "import importlib.metadata as m, importlib.util as u, json; "
        "print(json.dumps([m.version('nova-swarm'), "
        "u.find_spec('nova_swarm').submodule_search_locations[0] + '/node/cli.py', "
        "sorted(e.name for e in m.entry_points(group='console_scripts') if e.value.startswith('nova_swarm')), "
        "sorted(e.name for e in m.entry_points(group='nova_swarm.engines'))]))"
    )
    # (away from the checkout, whose nova_swarm.egg-info would be found on sys.path too)
    probed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert probed.returncode == 0, probed.stderr
    found = json.loads(probed.stdout)
    assert found[0] == __version__ and Path(found[1]).is_relative_to(venv) and Path(found[1]).is_file()
    assert found[2:] == [["swarm-node"], ["fake", "llama"]]


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not any(rel.startswith(s) for s in skip):
            files[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]} {oct(path.stat().st_mode & 0o777)}"
    return files


def wait_answered(up: Up, node_id: str, proc_alive: Path) -> str:
    """A prompt answered by ``node_id`` (the hub runs no node of its own)."""
    give_up = time.monotonic() + 240
    while True:
        asked = up.run("ask", "What is 2+2?", "--max-tokens", "16", "--timeout", "60")
        if asked.returncode == 0 and f"node {node_id}" in asked.stderr:
            return asked.stdout.strip()
        assert time.monotonic() < give_up, asked.stderr + "\n" + read_tail(proc_alive)
        time.sleep(2)


def read_tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"(no {path})"


@pytest.mark.llama
def test_the_printed_line_installs_joins_and_starts_a_node_and_a_second_run_changes_nothing(
    up: Up, tmp_path: Path
) -> None:
    line = up.enroll("laptop2")
    parse_line(line)
    device = tmp_path / "device"
    device.mkdir()
    env = {
        "HOME": str(device),
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NOVA_SWARM_PYTHON": BASE_PYTHON,
        "NOVA_SWARM_DEPS_SITE": str(deps_site(tmp_path)),
    }
    data = device / ".local" / "share" / "nova-swarm"
    pidfile = data / "run.pid"
    node_log = data / "logs" / "node.log"
    try:
        first = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env, timeout=400)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "runs in the background now" in first.stdout
        wait_answered(up, "laptop2", node_log)
        unit = device / ".config" / "systemd" / "user" / "nova-swarm-node.service"
        assert f"ExecStart={data}/venv/bin/swarm-node run --log-json" in unit.read_text()
        assert (device / ".config" / "nova-swarm" / "joined.json").stat().st_mode & 0o777 == 0o600
        # what a running node writes (its logs, its pid) may change; nothing else may
        skip = (".local/share/nova-swarm/venv", ".local/share/nova-swarm/logs", ".local/share/nova-swarm/run.pid")
        skip += (".config/nova-swarm/logs", ".local/state")
        before = snapshot(device, skip)
        first_pid = pidfile.read_text().strip()

        again = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env, timeout=400)
        assert again.returncode == 0, again.stdout + again.stderr
        assert snapshot(device, skip) == before
        # The node was restarted on the (re)installed code, and answers again.
        assert f"stopping the running node (pid {first_pid})" in again.stdout
        second_pid = pidfile.read_text().strip()
        assert second_pid != first_pid
        wait_answered(up, "laptop2", node_log)

        # The line left its uninstaller on the device: it stops the node and removes it all.
        gone = subprocess.run(["sh", str(data / "uninstall.sh")], capture_output=True, text=True, env=env, timeout=120)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert not data.exists() and not unit.exists() and not (device / ".config" / "nova-swarm").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(int(second_pid), 0)
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            with_pid_gone(pid)


def with_pid_gone(pid: int) -> None:
    """SIGTERM (the node drains), then SIGKILL if it is still there after a while."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def test_the_wheel_is_deterministic_and_names_the_nodes_dependencies(tmp_path: Path) -> None:
    requires = join.node_requirements()
    assert "llama-cpp-python>=0.3.2" in requires and not [r for r in requires if r.startswith(("amqtt", "uvicorn"))]
    one = join.build_wheel("0.1.0", requires=requires)
    assert one == join.build_wheel("0.1.0", requires=requires)
    record = zipfile.ZipFile(io.BytesIO(one)).read("nova_swarm-0.1.0.dist-info/RECORD").decode()
    assert "nova_swarm/node/cli.py,sha256=" in record


@pytest.mark.llama
@pytest.mark.parametrize("up", [True], indirect=True, ids=["tls"])
def test_the_printed_line_on_termux_installs_and_starts_a_phone_node(up: Up, tmp_path: Path) -> None:
    """The same line in Termux (a stand-in ``pkg``, as in test_installers) takes the Termux installer,
    and the phone node it starts answers."""
    line = up.enroll("pixel7")
    device = tmp_path / "phone"
    (device / ".termux" / "boot").mkdir(parents=True)
    prefix = tmp_path / "data" / "data" / "com.termux" / "files" / "usr"
    stand_ins(prefix / "bin", tmp_path / "pkg-calls")
    env = {
        "HOME": str(device),
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "PREFIX": str(prefix),
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "NOVA_SWARM_DEPS_SITE": str(deps_site(tmp_path)),
    }
    node_dir = device / ".nova-swarm"
    pidfile = node_dir / "run-node.pid"
    try:
        out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "fetching the termux installer" in out.stdout and "installed and started" in out.stdout
        assert (device / ".termux" / "boot" / "nova-swarm-node").exists()
        assert "pkg install -y" in (tmp_path / "pkg-calls").read_text()
        wait_answered(up, "pixel7", node_dir / "logs" / "node.log")
        loop = int(pidfile.read_text())
        gone = subprocess.run(["sh", str(node_dir / "uninstall.sh")], capture_output=True, text=True, env=env)
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert not node_dir.exists() and not (device / ".termux" / "boot" / "nova-swarm-node").exists()
        with pytest.raises(ProcessLookupError):  # the run loop drained its node and ended
            os.kill(loop, 0)
    finally:
        if pidfile.exists():
            with_pid_gone(int(pidfile.read_text()))
