"""The Termux and Linux installers: shellcheck-clean, idempotent, and undone by their uninstallers.

They run for real in a throwaway HOME: a real venv, real pip (from pip's wheel cache), the real
`swarm-node join`. Only commands that do not exist off Android get stand-ins: `pkg` (which
records what it was asked for and provides the tools) and the Termux:API commands.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nova_swarm.broker.home import Joined, SwarmHome, join_token
from nova_swarm.broker.url import BrokerURL

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "deploy").rglob("*.sh"))

pytestmark = pytest.mark.timeout(900)


def require_shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found is None:
        pytest.fail("these tests run shellcheck: apt-get install shellcheck (make test-deps does)")
    return found


def shellcheck(*paths: Path) -> None:
    out = subprocess.run([require_shellcheck(), "--shell=sh", *map(str, paths)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_every_script_passes_shellcheck() -> None:
    assert {p.name for p in SCRIPTS} >= {"install.sh", "uninstall.sh"} and len(SCRIPTS) == 4
    shellcheck(*SCRIPTS)


def token(tmp_path: Path, node_id: str) -> str:
    hub = SwarmHome(tmp_path / "hub-config")
    enrolment = hub.enroll(node_id)
    url = BrokerURL("192.0.2.10", 1883, node_id, enrolment.password)
    return join_token(Joined(url=str(url), swarm="main", node_id=node_id))


def pip_cache() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    return out.stdout.strip()


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``) with its content hash and mode."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not any(rel.startswith(s) for s in skip):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            files[rel] = f"{digest} {oct(path.stat().st_mode & 0o777)}"
    return files


def run(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["sh", str(script), *args], capture_output=True, text=True, env=env, timeout=800)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def base_env(home: Path, path: str) -> dict[str, str]:
    return {
        "HOME": str(home),
        "PATH": path,
        "PIP_CACHE_DIR": pip_cache(),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }


def stand_ins(bin_dir: Path, calls: Path) -> None:
    """``pkg`` provides the tools it is asked for as stubs; python is the real one."""
    bin_dir.mkdir(parents=True)
    python = Path(sys.base_prefix) / "bin" / "python3"
    (bin_dir / "python").symlink_to(python)
    provides = {"clang": "clang", "cmake": "cmake", "ninja": "ninja", "termux-api": "termux-battery-status"}
    lines = ["#!/bin/sh", f'echo "pkg $*" >> "{calls}"', 'shift 2  # "install -y"', 'for p in "$@"; do', "  case $p in"]
    for package, tool in provides.items():
        lines.append(
            f'    {package}) printf "#!/bin/sh\\nexit 0\\n" > "{bin_dir}/{tool}"; chmod +x "{bin_dir}/{tool}" ;;'
        )
    lines += ["  esac", "done"]
    (bin_dir / "pkg").write_text("\n".join(lines) + "\n")
    (bin_dir / "pkg").chmod(0o755)
    wake = bin_dir / "termux-wake-lock"
    wake.write_text("#!/bin/sh\nexit 0\n")
    wake.chmod(0o755)


def test_termux_installer_twice_then_uninstall(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".termux" / "boot").mkdir(parents=True)
    (home / ".termux" / "boot" / "other-app").write_text("#!/bin/sh\n")  # not ours: must survive
    prefix = tmp_path / "data" / "data" / "com.termux" / "files" / "usr"
    calls = tmp_path / "pkg-calls"
    stand_ins(prefix / "bin", calls)
    env = {
        **base_env(home, f"{prefix / 'bin'}:/usr/bin:/bin"),
        "PREFIX": str(prefix),
        "NOVA_SWARM_SOURCE": f"{REPO}[node]",
    }
    script = REPO / "deploy" / "termux" / "install.sh"
    tok = token(tmp_path, "pixel7")

    run(script, tok, env=env)
    skip = (".nova-swarm/venv", ".cache")
    first = snapshot(home, skip)
    tools = {"clang": "clang", "cmake": "cmake", "ninja": "ninja", "termux-battery-status": "termux-api"}
    absent = [pkg for tool, pkg in tools.items() if shutil.which(tool, path="/usr/bin:/bin") is None]
    assert "termux-api" in absent  # never on a Debian machine
    expected = [f"pkg install -y {' '.join(absent)}"]
    if subprocess.run([str(prefix / "bin" / "python"), "-c", "import cryptography"]).returncode != 0:
        expected.append("pkg install -y python-cryptography")  # pip then installs it from PyPI here
    assert calls.read_text().splitlines() == expected
    boot = home / ".termux" / "boot" / "nova-swarm-node"
    assert boot.read_text().splitlines()[2] == "termux-wake-lock"
    assert (home / ".nova-swarm" / "config" / "joined.json").stat().st_mode & 0o777 == 0o600
    freeze = subprocess.run(
        [str(home / ".nova-swarm" / "venv" / "bin" / "pip"), "freeze"], capture_output=True, text=True
    ).stdout
    shellcheck(home / ".nova-swarm" / "run-node.sh", boot)

    run(script, tok, env=env)  # again: nothing changes
    assert snapshot(home, skip) == first
    assert calls.read_text().splitlines() == expected  # no package was missing the second time
    assert (
        subprocess.run(
            [str(home / ".nova-swarm" / "venv" / "bin" / "pip"), "freeze"], capture_output=True, text=True
        ).stdout
        == freeze
    )

    out = run(REPO / "deploy" / "termux" / "uninstall.sh", env=env)
    assert f"installed: {' '.join(absent)}" in out.stdout  # named, not removed
    assert not (home / ".nova-swarm").exists() and not boot.exists()
    assert sorted(p.name for p in (home / ".termux" / "boot").iterdir()) == ["other-app"]


def test_termux_run_script_restarts_with_backoff_and_rotates_its_log(tmp_path: Path) -> None:
    script = (REPO / "deploy" / "termux" / "install.sh").read_text()
    body = script.split("<<'RUN'\n", 1)[1].split("\nRUN\n", 1)[0]
    node_dir = tmp_path / "node"
    (node_dir / "venv" / "bin").mkdir(parents=True)
    (node_dir / "logs").mkdir()
    (node_dir / "run-node.sh").write_text(body + "\n")
    fake = node_dir / "venv" / "bin" / "swarm-node"
    fake.write_text('#!/bin/sh\necho "started with: $*"\nexit 3\n')
    fake.chmod(0o755)
    (node_dir / "logs" / "node.log").write_text("x" * 1_100_000)  # over the 1 MB rotation size
    env = {"PATH": "/usr/bin:/bin", "NOVA_SWARM_MAX_RUNS": "3", "NOVA_SWARM_RESTART_DELAY": "1"}
    out = subprocess.run(["sh", str(node_dir / "run-node.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    log = (node_dir / "logs" / "node.log").read_text()
    assert log.count("started with: run --device phone --log-json") == 3
    assert [line.split('"restart_in_s": ')[1].rstrip("}") for line in log.splitlines() if "restart_in_s" in line] == [
        "1",
        "2",
        "4",
    ]
    assert (node_dir / "logs" / "node.log.1").stat().st_size == 1_100_000


def test_linux_installer_twice_then_uninstall(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**base_env(home, "/usr/bin:/bin"), "NOVA_SWARM_SOURCE": f"{REPO}[node]"}
    script = REPO / "deploy" / "linux" / "install.sh"
    tok = token(tmp_path, "laptop2")
    run(script, "node", tok, env=env)
    skip = (".local/share/nova-swarm/venv", ".cache")
    first = snapshot(home, skip)
    unit = home / ".config" / "systemd" / "user" / "nova-swarm-node.service"
    text = unit.read_text()
    assert "swarm-node run --log-json" in text and "KillSignal=SIGTERM" in text and "Restart=always" in text
    assert (home / ".config" / "nova-swarm" / "joined.json").exists()
    run(script, "node", tok, env=env)
    assert snapshot(home, skip) == first
    run(REPO / "deploy" / "linux" / "uninstall.sh", env=env)
    assert not unit.exists()
    assert not (home / ".local" / "share" / "nova-swarm").exists() and not (home / ".config" / "nova-swarm").exists()
    assert os.listdir(home / ".config" / "systemd" / "user") == []
