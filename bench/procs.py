"""Child processes of a benchmark: started in their own session, logged to a file, always stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
PYTHON = sys.executable


class Procs:
    """Every process a section starts; ``close`` stops what is still running, newest first."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, name: str, argv: Sequence[str], *, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        # Its own session: a Ctrl-C on the benchmark reaches only the benchmark, which then stops
        # its children in order, and a SIGKILL in the recovery section hits only that node.
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.env, **(extra_env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def stop(self, proc: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
        await asyncio.to_thread(stop_process, proc, grace=grace)
        if proc in self._procs:
            self._procs.remove(proc)

    async def close(self) -> None:
        for proc in reversed(list(self._procs)):
            await self.stop(proc)


def _die_with_parent() -> None:
    """In the child, before exec: have Linux SIGTERM it when the benchmark dies, however it dies
    (Ctrl-C mid-run, SIGKILL), so no broker, hub or node outlives a run and holds its port."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace``; the process's whole session goes with it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
    else:
        _kill_group(proc)  # a dead leader may leave children (mosquitto under swarm-broker)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def rss_mb(pid: int, *, children: bool = False) -> float | None:
    """Resident memory of a process (and, with ``children``, of its descendants too), in MiB."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        if children:
            total += sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return None
    return total / 2**20


def child_pid(pid: int, name: str) -> int | None:
    """The pid of the descendant whose executable is ``name`` (mosquitto under swarm-broker)."""
    import psutil

    try:
        for child in psutil.Process(pid).children(recursive=True):
            if child.name() == name:
                return int(child.pid)
    except psutil.Error:
        return None
    return None
