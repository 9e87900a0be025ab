"""The Termux and Linux installers: shellcheck-clean, idempotent, and undone by their uninstallers.

They run for real in a throwaway HOME: a real venv, real pip installing the wheel a hub serves
(hub/join.py), the real `swarm-node join`, and the node they start. Offline, the third-party
packages come from this test run's own site-packages (NOVA_SWARM_DEPS_SITE) instead of an index.
Only commands that do not exist off Android get stand-ins: `pkg` (which records what it was asked
for and provides the tools) and the Termux:API commands.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.home import Joined, SwarmHome, join_token
from nova_swarm.broker.link.net import free_port
from nova_swarm.broker.link.url import BrokerURL
from nova_swarm.hub import join

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "deploy").rglob("*.sh"))
#: the interpreter our venv was made from: the installers' venvs are made from it too
BASE_PYTHON = Path(sys.base_prefix) / "bin" / "python3"

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
    assert {p.name for p in SCRIPTS} >= {"install.sh", "uninstall.sh", "join.sh"} and len(SCRIPTS) == 5
    shellcheck(*SCRIPTS)


def test_the_served_installers_are_the_ones_in_deploy_and_render_clean(tmp_path: Path) -> None:
    for platform in ("termux", "linux"):
        for served, source in ((f"{platform}.sh", "install.sh"), (f"{platform}-uninstall.sh", "uninstall.sh")):
            assert join.installer(served) == (REPO / "deploy" / platform / source).read_text()
    rendered = join.render_bootstrap(
        join.installer("install.sh"),
        hub_url="https://10.0.0.1:8080",
        pin="sha256//" + "A" * 43 + "=",
        key="pixel7." + "0" * 32,
        wheel=join.wheel_name("0.1.0"),
    )
    assert not re.findall(r"@[A-Z_]+@", rendered)
    assert "KEY='pixel7." + "0" * 32 + "'" in rendered and "HUB_URL='https://10.0.0.1:8080'" in rendered
    (tmp_path / "install.sh").write_text(rendered)
    shellcheck(tmp_path / "install.sh")
    with pytest.raises(ValueError):
        join.render_bootstrap(join.installer("install.sh"), hub_url="http://x'; rm -rf ~", pin=None, key="k", wheel="w")


def termux_packages_in_installer() -> set[str]:
    text = (REPO / "deploy" / "termux" / "install.sh").read_text()
    found: set[str] = set()
    for name in ("TOOLS", "PYTHON_MODULES"):
        found.update(pair.split(":")[1] for pair in re.search(rf'^{name}="([^"]*)"', text, re.M)[1].split())
    for name in ("PYDANTIC_CORE", "RUST"):
        found.add(re.search(rf"^{name}=(\S+)", text, re.M)[1])
    return found


def test_termux_packages_are_the_ones_checked_in_packages_md() -> None:
    """Every Termux package the installer relies on is in PACKAGES.md's table (checked against
    termux-packages), and the table lists nothing the installer does not use."""
    table = (REPO / "deploy" / "termux" / "PACKAGES.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.M)
    assert len(rows) == len(set(rows))
    assert set(rows) == termux_packages_in_installer()
    # The pydantic pin the installer uses for Termux's pydantic-core is the one written down there.
    installer = (REPO / "deploy" / "termux" / "install.sh").read_text()
    core, pydantic = re.search(r"^    (\d+\.\d+\.\d+)\) echo \"pydantic==(\S+)\"", installer, re.M).groups()
    assert f"pydantic-core {core}" in table and f"pydantic {pydantic}" in table


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel a hub serves at /join/ (the installers get it from the join line)."""
    path = tmp_path_factory.mktemp("wheel") / join.wheel_name(__version__)
    path.write_bytes(join.build_wheel(__version__, requires=join.node_requirements()))
    return path


@pytest.fixture(scope="module")
def deps_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our site-packages minus nova-swarm itself, for NOVA_SWARM_DEPS_SITE."""
    site = tmp_path_factory.mktemp("deps-site")
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("__editable__", "nova_swarm")):
            (site / entry.name).symlink_to(entry)
    return site


def stop_pid(pidfile: Path) -> None:
    """Clean-up after a failed test: the node an installer started, drained, then killed."""
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
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


def token(tmp_path: Path, node_id: str) -> str:
    hub = SwarmHome(tmp_path / "hub-config")
    enrolment = hub.enroll(node_id)
    # A loopback port nothing listens on: the node the installers start retries there, offline.
    url = BrokerURL("127.0.0.1", free_port(), node_id, enrolment.password)
    return join_token(Joined(url=str(url), swarm="main", node_id=node_id))


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
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }


#: the Termux Python packages, by the module the installer checks for
PYTHON_PACKAGES = {
    "python-pip": "pip",
    "python-cryptography": "cryptography",
    "python-psutil": "psutil",
    "python-numpy": "numpy",
    "python-pydantic-core": "pydantic_core",
}


def stand_ins(bin_dir: Path, calls: Path) -> None:
    """``pkg`` provides the tools it is asked for as stubs, and the Python packages as empty
    modules that Termux's ``python`` (the real one, with those modules on its path) can import;
    it says every package exists."""
    bin_dir.mkdir(parents=True)
    site = bin_dir.parent / "stub-site"
    site.mkdir()
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{BASE_PYTHON}" "$@"\n')
    python.chmod(0o755)
    provides = {"clang": "clang", "cmake": "cmake", "ninja": "ninja", "termux-api": "termux-battery-status"}
    lines = ["#!/bin/sh", f'echo "pkg $*" >> "{calls}"', '[ "$1" = show ] && exit 0']
    lines += ['shift 2  # "install -y"', 'for p in "$@"; do', "  case $p in"]
    for package, tool in provides.items():
        lines.append(
            f'    {package}) printf "#!/bin/sh\\nexit 0\\n" > "{bin_dir}/{tool}"; chmod +x "{bin_dir}/{tool}" ;;'
        )
    for package, module in PYTHON_PACKAGES.items():
        lines.append(f'    {package}) echo "# stand-in for Termux\'s {package}" > "{site}/{module}.py" ;;')
    lines += ["  esac", "done"]
    (bin_dir / "pkg").write_text("\n".join(lines) + "\n")
    (bin_dir / "pkg").chmod(0o755)
    wake = bin_dir / "termux-wake-lock"
    wake.write_text("#!/bin/sh\nexit 0\n")
    wake.chmod(0o755)


def test_termux_installer_twice_then_uninstall(tmp_path: Path, wheel: Path, deps_site: Path) -> None:
    home = tmp_path / "home"
    (home / ".termux" / "boot").mkdir(parents=True)
    (home / ".termux" / "boot" / "other-app").write_text("#!/bin/sh\n")  # not ours: must survive
    prefix = tmp_path / "data" / "data" / "com.termux" / "files" / "usr"
    calls = tmp_path / "pkg-calls"
    stand_ins(prefix / "bin", calls)
    env = {
        **base_env(home, f"{prefix / 'bin'}:/usr/bin:/bin"),
        "PREFIX": str(prefix),
        "NOVA_SWARM_SOURCE": str(wheel),
        "NOVA_SWARM_DEPS_SITE": str(deps_site),
    }
    script = REPO / "deploy" / "termux" / "install.sh"
    tok = token(tmp_path, "pixel7")
    node_dir = home / ".nova-swarm"
    pidfile = node_dir / "run-node.pid"
    try:
        out = run(script, tok, env=env)
        assert "installed and started" in out.stdout
        # What a running node writes (its logs, its pid) may change between runs; nothing else may.
        skip = (".nova-swarm/venv", ".nova-swarm/logs", ".nova-swarm/run-node.pid", ".nova-swarm/config/logs")
        skip += (".cache", ".local/state")
        first = snapshot(home, skip)
        tools = {"clang": "clang", "cmake": "cmake", "ninja": "ninja", "termux-battery-status": "termux-api"}
        absent = [pkg for tool, pkg in tools.items() if shutil.which(tool, path="/usr/bin:/bin") is None]
        assert "termux-api" in absent  # never on a Debian machine
        expected = [f"pkg install -y {' '.join(absent)}"]
        lacking = [p for p, mod in PYTHON_PACKAGES.items() if p != "python-pydantic-core" and not importable(mod)]
        if not importable("pydantic_core"):
            expected.append("pkg show python-pydantic-core")
            lacking.append("python-pydantic-core")
        if lacking:
            expected.append(f"pkg install -y {' '.join(lacking)}")
        assert calls.read_text().splitlines() == expected
        boot = home / ".termux" / "boot" / "nova-swarm-node"
        assert boot.read_text().splitlines()[2] == "termux-wake-lock"
        assert (node_dir / "config" / "joined.json").stat().st_mode & 0o777 == 0o600
        # It started the node: the run loop is up, and the node in it.
        until_file(node_dir / "logs" / "node.log")
        first_pid = pidfile.read_text().strip()
        os.kill(int(first_pid), 0)
        freeze = pip_freeze(node_dir / "venv")
        assert f"nova-swarm @ file://{wheel}" in freeze or f"nova-swarm=={__version__}" in freeze
        shellcheck(node_dir / "run-node.sh", boot)

        out = run(script, tok, env=env)  # again: nothing changes, and the node is restarted
        assert f"stopping the running node (pid {first_pid})" in out.stdout
        assert snapshot(home, skip) == first
        assert calls.read_text().splitlines() == expected  # no package was missing the second time
        assert pip_freeze(node_dir / "venv") == freeze

        out = run(REPO / "deploy" / "termux" / "uninstall.sh", env=env)
        assert f"installed: {' '.join(absent)}" in out.stdout  # named, not removed
        assert not node_dir.exists() and not boot.exists()
        assert sorted(p.name for p in (home / ".termux" / "boot").iterdir()) == ["other-app"]
    finally:
        stop_pid(pidfile)


def importable(module: str) -> bool:
    return subprocess.run([str(BASE_PYTHON), "-c", f"import {module}"], capture_output=True).returncode == 0


def pip_freeze(venv: Path) -> str:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120
    ).stdout


def until_file(path: Path, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < give_up, f"no {path}"
        time.sleep(0.2)


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


def test_linux_installer_twice_then_uninstall(tmp_path: Path, wheel: Path, deps_site: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **base_env(home, "/usr/bin:/bin"),
        "NOVA_SWARM_SOURCE": str(wheel),
        "NOVA_SWARM_DEPS_SITE": str(deps_site),
        "NOVA_SWARM_PYTHON": str(BASE_PYTHON),
    }
    script = REPO / "deploy" / "linux" / "install.sh"
    tok = token(tmp_path, "laptop2")
    data = home / ".local" / "share" / "nova-swarm"
    pidfile = data / "run.pid"
    try:
        out = run(script, "node", tok, env=env)
        assert "runs in the background now" in out.stdout  # no systemd user session here
        skip = (".local/share/nova-swarm/venv", ".local/share/nova-swarm/logs", ".local/share/nova-swarm/run.pid")
        skip += (".config/nova-swarm/logs", ".local/state", ".cache")
        first = snapshot(home, skip)
        unit = home / ".config" / "systemd" / "user" / "nova-swarm-node.service"
        text = unit.read_text()
        assert "swarm-node run --log-json" in text and "KillSignal=SIGTERM" in text and "Restart=always" in text
        assert (home / ".config" / "nova-swarm" / "joined.json").exists()
        first_pid = pidfile.read_text().strip()
        os.kill(int(first_pid), 0)
        out = run(script, "node", tok, env=env)
        assert f"stopping the running node (pid {first_pid})" in out.stdout
        assert snapshot(home, skip) == first
        run(REPO / "deploy" / "linux" / "uninstall.sh", env=env)
        assert not unit.exists()
        assert not data.exists() and not (home / ".config" / "nova-swarm").exists()
        assert os.listdir(home / ".config" / "systemd" / "user") == []
    finally:
        stop_pid(pidfile)


def test_linux_installer_refuses_a_python_older_than_3_11_and_a_missing_source(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    old = tmp_path / "old-python"
    old.write_text("#!/bin/sh\nexit 1\n")  # says no to `sys.version_info >= (3, 11)`
    old.chmod(0o755)
    # Only an old python3 on the PATH (and no python3.1x): the check runs before anything else is needed.
    env = {**base_env(home, str(tmp_path)), "NOVA_SWARM_SOURCE": "x.whl", "NOVA_SWARM_PYTHON": ""}
    (tmp_path / "python3").symlink_to(old)
    out = subprocess.run(["/bin/sh", str(REPO / "deploy" / "linux" / "install.sh"), "node", "t"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode == 1 and "needs Python 3.11 or newer" in out.stderr, out.stderr
    assert not (home / ".local").exists()
    script = tmp_path / "elsewhere" / "install.sh"
    script.parent.mkdir()
    shutil.copy(REPO / "deploy" / "termux" / "install.sh", script)
    termux = {**base_env(home, "/usr/bin:/bin"), "PREFIX": "/data/data/com.termux/files/usr"}
    out = subprocess.run(["sh", str(script), "t"], capture_output=True, text=True, env=termux, timeout=60)
    assert out.returncode == 1 and "nova-swarm is not on PyPI" in out.stderr
