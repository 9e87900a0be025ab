"""The supervisor: the small, never-updated process that runs the node and rolls back bad bundles.

``swarm-node run`` is this supervisor unless ``--no-updates`` is given. It starts the node as a
child process running the store's ``current`` bundle (or the installed code), and:

- when the child exits with ``RESTART_EXIT`` (it installed a new bundle), starts it again at once;
- while a new bundle is on trial, waits up to ``health_timeout_s`` for the child to write the
  health file (it does once it is online); a child that exits first, or stays silent, is stopped,
  the store rolls back to the previous version, and the failed version is never tried again;
- forwards SIGTERM and SIGINT, so stopping the supervisor drains the node as before.

It never imports bundle code itself: a broken bundle can break the child, never the supervisor.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from nova_swarm.broker.contract.messages import parse_version
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.private import private_dir

from .bundles import RESTART_EXIT, BundleStore

log = structlog.get_logger("nova_swarm.node.supervisor")

#: set in the child's environment: the child runs the node itself instead of another supervisor
CHILD_ENV = "NOVA_SWARM_SUPERVISED"
HEALTH_ENV = "NOVA_SWARM_HEALTH_FILE"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the supervisor is SIGKILLed, the node must not live on unsupervised (Linux and Android).
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    #: how long a new bundle has to come online before it is rolled back
    health_timeout_s: float = 120.0
    #: how long a stopping child may drain before it is killed
    stop_grace_s: float = 60.0


class Supervisor:
    def __init__(self, store: BundleStore, node_argv: Sequence[str], config: SupervisorConfig) -> None:
        self.store = store
        self.node_argv = list(node_argv)
        self.config = config
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        while True:
            rc = self._run_once()
            if self._stopping:
                return rc
            if rc == RESTART_EXIT:
                log.info("restarting the node into its new bundle")
                continue
            return rc

    def _code(self) -> tuple[str, str | None]:
        """Which version to start, and the PYTHONPATH entry that selects it (None: installed)."""
        current = self.store.current()
        if current is None or parse_version(current.version) <= parse_version(__version__):
            # A pip upgrade of the installed code outranks an older bundle.
            return __version__, None
        return current.version, str(current.path)

    def _run_once(self) -> int:
        version, path = self._code()
        trial = self.store.trial()
        on_trial = trial is not None and trial == version
        if trial is not None and not on_trial:
            self.store.roll_back(f"the supervisor started {version} instead")
        env = {**os.environ, CHILD_ENV: "1", HEALTH_ENV: str(self.store.health_file)}
        if path is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p)
        private_dir(self.store.root)
        self.store.health_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "nova_swarm.node", *self.node_argv]
        log.info("starting node", version=version, trial=on_trial)
        self._child = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)
        try:
            if on_trial:
                failure = self._await_health(self._child)
                if self._stopping:
                    return self._child.wait()  # stopped mid-trial: the next start resumes the trial
                if failure is not None:
                    failed = self.store.roll_back(failure)
                    log.error("bundle failed its trial; rolled back", version=failed, reason=failure)
                    return RESTART_EXIT  # start the previous version
                self.store.confirm()
                log.info("bundle came up healthy", version=version)
            return self._child.wait()
        finally:
            self._child = None

    def _await_health(self, child: subprocess.Popen[bytes]) -> str | None:
        """None once the child reports healthy; otherwise why the trial failed."""
        give_up = time.monotonic() + self.config.health_timeout_s
        while True:
            if self.store.health_file.exists():
                return None
            rc = child.poll()
            if rc is not None:
                return f"exited with status {rc} before coming online"
            if time.monotonic() > give_up:
                self._stop_child(child)
                return f"did not come online within {self.config.health_timeout_s:g} s"
            time.sleep(0.1)

    def _stop_child(self, child: subprocess.Popen[bytes]) -> None:
        child.terminate()
        try:
            child.wait(self.config.stop_grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _forward(self, signum: int, _frame: object) -> None:
        self._stopping = True
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)
