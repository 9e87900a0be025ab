"""The config directory and the node's state are private whatever the umask: directories 0700,
files 0600 (issue: a prompt's text was found in a world-readable ``hub.sqlite-wal``).

The whole swarm runs for real under umask 000, the most permissive there is: a broker, ``swarm-hub
serve`` (journal, ledger, logs, gateway token) and ``swarm-node run`` (supervisor, state dir)
answering a prompt. The modes are checked while it runs (SQLite's WAL and SHM files exist only
then) and after it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nova_swarm.broker import logs
from nova_swarm.broker.contract.signing import SigningKey
from nova_swarm.broker.home import SwarmHome
from nova_swarm.broker.private import private_database, private_dir, write_private
from nova_swarm.hub.journal import Journal
from nova_swarm.hub.ledger import Ledger

from .conftest import Processes, start_broker, wait_online

SECRET = "the-private-prompt-7f3a"


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000 for this test and every process it starts (children inherit it)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every directory and file under ``root`` (and ``root`` itself): relative path -> mode bits."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        try:
            found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:  # a file renamed or removed while we walked (a .tmp, a WAL)
            continue
    return found


def not_private(root: Path) -> list[str]:
    """What under ``root`` another user could read, write or enter."""
    wrong = []
    for name, mode in modes(root).items():
        path = root / name
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{name}: {mode:04o}, not {want:04o}")
    return wrong


@pytest.mark.parametrize("engine", ["amqtt", "mosquitto"])
async def test_a_swarm_run_under_umask_000_leaves_only_private_files(
    open_umask: None, tmp_path: Path, engine: str
) -> None:
    home = SwarmHome(tmp_path / "config")
    home.ensure()
    state = tmp_path / "state"  # the node's XDG_STATE_HOME (conftest.env_for)
    broker = await start_broker(engine, home, tmp_path)
    procs = Processes(broker, tmp_path)
    try:
        procs.hub("--log-level", "debug")
        procs.node("n1", "--engine", "fake", "--log-level", "debug")
        await wait_online(procs, 1)
        asked = await asyncio.to_thread(procs.swarm_hub, "ask", SECRET, "--timeout", "60")
        assert asked.returncode == 0, asked.stderr
        running = modes(home.path)
        for expected in ("hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm", "ledger.sqlite", "logs/hub.log"):
            assert expected in running, f"{expected} was never made, so its mode was never checked: {sorted(running)}"
        assert not_private(home.path) == [], "while running"
        assert not_private(state) == [], "the node's state, while running"
    finally:
        procs.close()
        broker.stop()
    assert not_private(home.path) == [], "after the swarm stopped"
    assert not_private(state) == [], "the node's state, after it stopped"
    assert (state / "nova-swarm" / "n1" / "bundles").is_dir()


def test_an_older_looser_config_dir_is_made_private(open_umask: None, tmp_path: Path) -> None:
    """A config dir left 0755 by an older version, with a 0644 database, WAL and log: each file
    is tightened when it is next opened, and the next start tightens everything."""
    home = SwarmHome(tmp_path / "config")
    (home.path / "logs").mkdir(parents=True, mode=0o755)
    home.path.chmod(0o755)
    loose = ["hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm", "ledger.sqlite", "ledger.sqlite-wal", "logs/hub.log"]
    for name in loose:
        (home.path / name).write_bytes(b"")
        (home.path / name).chmod(0o644)
    Journal(home.db_file).close()
    Ledger(home.ledger_file, SigningKey.generate()).close()
    logs.configure(file=home.log_file("hub"))
    try:
        logging.getLogger("nova_swarm.test").warning("a line, so the log is written")
    finally:
        logs.configure()  # back to stderr only: the file handler is closed
    found = modes(home.path)
    assert {name: found[name] for name in loose if name in found} == {name: 0o600 for name in loose if name in found}
    assert "hub.sqlite" in found and "logs/hub.log" in found
    home.ensure()
    assert not_private(home.path) == []


def test_the_helpers_hold_under_any_umask(tmp_path: Path) -> None:
    for umask in (0o000, 0o022, 0o077, 0o277):
        old = os.umask(umask)
        try:
            base = tmp_path / f"u{umask:03o}"
            private_dir(base / "a" / "b")
            write_private(base / "c" / "secret", "x")
            private_database(base / "d" / "db.sqlite")
            log = base / "logs" / "x.log"
            logs.configure(file=log, max_bytes=200, backups=2)
            try:
                for i in range(20):  # past max_bytes: the handler rotates and opens new files
                    logging.getLogger("nova_swarm.test").warning("line %d of a log that rotates", i)
            finally:
                logs.configure()
            assert (base / "logs" / "x.log.2").exists()
        finally:
            os.umask(old)
        assert not_private(base) == [], f"umask {umask:03o}"
