"""A virtual LAN of phones, made of Linux network namespaces, for the benchmark and the tests.

It lives in the benchmark package because `swarm-bench` is installed and cannot import
``tests/``; ``tests/lan.py`` re-exports it.

::

    root namespace: nothing of ours but the namespace names
    ┌──────── <prefix>-hub ────────┐       ┌── <prefix>-p0 ──┐
    │ br0 10.213.0.1/24            │ veth  │ eth0 10.213.0.10│  HOME, NOVA_SWARM_HOME of its own
    │   ├── v0 ────────────────────┼───────┼─                │
    │   ├── v1 ───────── ...       │       └─────────────────┘
    │ the hub runs here            │       ... one namespace per phone
    └──────────────────────────────┘

The bridge lives in a "hub" namespace rather than the root one, so nothing the tests run (and
no mDNS announcement) ever reaches the machine's real network, and two runs at once never
clash: each run's interfaces and addresses live inside its own namespaces, and only the
namespace names (``nslan-<pid>-...``) are global.

A phone losing Wi-Fi is its port on the bridge going down (``link_down``): the phone's TCP
connection goes half-open, with no RST either way, as when a phone walks out of range.
``link_up`` is the phone coming back (roaming).

Everything made here is removed by ``close()``, also after a failure; a run killed before
it could clean up leaves namespaces that the next run sweeps (``sweep()``), by their prefix
and the dead pid in their name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PREFIX = "nslan"
#: a private range nothing else here uses; it exists only inside the namespaces
SUBNET = "10.213.0"
HUB_ADDRESS = f"{SUBNET}.1"
#: per-namespace files `ip netns exec` mounts over /etc (see ``Lan.resolve``)
NETNS_ETC = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}-(\d+)-")


_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
"""


class LanUnavailable(RuntimeError):
    """This machine cannot build the LAN (not root, no iproute2, no namespaces)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _kill_namespace_processes(ns: str) -> None:
    """Stop whatever still runs in ``ns`` (only our own namespaces reach here), so it can go."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        give_up = time.monotonic() + 5
        while pids and time.monotonic() < give_up:
            if not _ip("netns", "pids", ns, check=False).stdout.split():
                return
            time.sleep(0.05)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    # Deleting the namespace takes its veth ends and the bridge with it.
    _ip("netns", "del", ns, check=False)


def sweep() -> list[str]:
    """Remove namespaces left by runs that died before cleaning up (their pid is gone)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # that run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _delete_namespace(name)
        removed.append(name)
    for etc in NETNS_ETC.glob(f"{PREFIX}-*") if NETNS_ETC.is_dir() else []:
        match = _NAME.match(etc.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(etc, ignore_errors=True)
    return removed


def check_available() -> None:
    """Raise ``LanUnavailable`` with the reason when namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise LanUnavailable("the virtual LAN needs root (network namespaces, veth, bridge)")
    if shutil.which("ip") is None:
        raise LanUnavailable("the virtual LAN needs iproute2's `ip`")
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise LanUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@dataclass
class Host:
    """One machine on the LAN: a namespace with its own address and home directory."""

    name: str
    ns: str
    address: str
    home: Path
    #: the hub's end of this phone's cable (None for the hub itself)
    port: str | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def config_dir(self) -> Path:
        return self.home / ".config" / "nova-swarm"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This host's environment: its own HOME and config, state and cache dirs."""
        # Nothing of this machine's session: no config, no systemd user bus, no D-Bus.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVA_SWARM_", "XDG_", "DBUS_"))}
        env.update(
            HOME=str(self.home),
            NOVA_SWARM_HOME=str(self.config_dir),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_STATE_HOME=str(self.home / ".local" / "state"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra or {})
        return env

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 120, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's namespace and wait for it."""
        done = subprocess.run(
            self.argv(argv), capture_output=True, text=True, env=self.env(env), timeout=timeout, cwd=self.home
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(argv)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def popen(self, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command in this host's namespace, its output to ``log``.

        Its own session, so stopping it reaches every process it started."""
        out: IO[bytes] = log.open("ab")
        proc = subprocess.Popen(
            self.argv(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env(env),
            cwd=self.home,
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], *, grace: float = 20.0) -> int:
        """SIGTERM its session, SIGKILL after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.wait(10)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, grace=10.0)
        self.procs.clear()


class Lan:
    """A hub namespace with a bridge, and ``phones`` phone namespaces cabled to it.

    Use as a context manager; ``close()`` undoes everything, whatever happened."""

    def __init__(self, phones: int, root: Path, *, tag: str | None = None) -> None:
        if not 1 <= phones <= 200:
            raise ValueError(f"phones must be 1..200, not {phones}")
        self.root = root
        #: ``tag``: the names of a LAN another process built (``attach``); None makes a new one
        self.tag = tag or f"{PREFIX}-{os.getpid()}"
        self.hub = Host("hub", f"{self.tag}-hub", HUB_ADDRESS, root / "hub")
        self.phones = [
            Host(f"phone{i}", f"{self.tag}-p{i}", f"{SUBNET}.{10 + i}", root / f"phone{i}", port=f"v{i}")
            for i in range(phones)
        ]
        self._made: list[str] = []

    @classmethod
    def attach(cls, tag: str, phones: int, root: Path) -> Lan:
        """The LAN another process built and owns (a child running inside its hub namespace):
        its hosts, to run commands and drop links; ``close`` here removes nothing."""
        return cls(phones, root, tag=tag)

    def __enter__(self) -> Lan:
        check_available()
        sweep()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hosts(self) -> list[Host]:
        return [self.hub, *self.phones]

    def _add_namespace(self, host: Host) -> None:
        _ip("netns", "add", host.ns)
        self._made.append(host.ns)
        _ip("-n", host.ns, "link", "set", "lo", "up")
        host.home.mkdir(parents=True, exist_ok=True)

    def _build(self) -> None:
        self._add_namespace(self.hub)
        hub = self.hub.ns
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.hub.address}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for phone in self.phones:
            assert phone.port is not None
            self._add_namespace(phone)
            # Made inside the hub namespace with its far end put straight into the phone's:
            # no interface of ours ever appears in the root namespace.
            _ip("-n", hub, "link", "add", phone.port, "type", "veth", "peer", "name", "eth0", "netns", phone.ns)
            _ip("-n", hub, "link", "set", phone.port, "master", "br0")
            _ip("-n", hub, "link", "set", phone.port, "up")
            _ip("-n", phone.ns, "addr", "add", f"{phone.address}/24", "dev", "eth0")
            _ip("-n", phone.ns, "link", "set", "eth0", "up")
        for phone in self.phones:
            self.wait_reachable(phone)

    def wait_reachable(self, phone: Host, timeout: float = 15.0) -> None:
        """Return once ``phone`` reaches the hub (the bridge port forwards).

        No ping here (not every machine has it): a TCP connect to a closed port of the hub's
        comes back refused at once when the link works, and times out when it does not."""
        give_up = time.monotonic() + timeout
        while True:
            probed = subprocess.run(phone.argv([sys.executable, "-c", _PROBE, self.hub.address]), timeout=10)
            if probed.returncode == 0:
                return
            if time.monotonic() > give_up:
                raise LanUnavailable(f"{phone.name} cannot reach the hub at {self.hub.address}")
            time.sleep(0.1)

    def phone(self, name: str) -> Host:
        for phone in self.phones:
            if phone.name == name:
                return phone
        raise KeyError(name)

    def link_down(self, phone: Host) -> None:
        """The phone drops off Wi-Fi: its cable goes dead with no RST on either side."""
        assert phone.port is not None, "the hub has no link of its own to drop"
        _ip("-n", self.hub.ns, "link", "set", phone.port, "down")

    def link_up(self, phone: Host) -> None:
        """The phone is back in range."""
        assert phone.port is not None
        _ip("-n", self.hub.ns, "link", "set", phone.port, "up")

    def resolve(self, host: Host, name: str, address: str) -> None:
        """Let ``host`` resolve ``name`` to ``address``, as mDNS would: `ip netns exec` mounts
        /etc/netns/<ns>/hosts over /etc/hosts for whatever runs in that namespace."""
        etc = NETNS_ETC / host.ns
        etc.mkdir(parents=True, exist_ok=True)
        hosts = etc / "hosts"
        base = hosts.read_text() if hosts.exists() else Path("/etc/hosts").read_text()
        hosts.write_text(f"{base.rstrip()}\n{address} {name}\n")

    def close(self) -> None:
        """Stop every process, then remove every namespace (and so every veth and the bridge)."""
        for host in self.hosts:
            try:
                host.stop_all()
            except (OSError, subprocess.SubprocessError):
                pass  # whatever survives is killed with its namespace below
        for ns in reversed(self._made):
            _delete_namespace(ns)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self._made.clear()
