"""One distribution, three parts, clean boundaries between them."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports_of(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_node_and_hub_never_import_each_other_and_the_contract_imports_neither() -> None:
    assert not {m for m in imports_of("node") if m.startswith("nova_swarm.hub")}
    assert not {m for m in imports_of("hub") if m.startswith("nova_swarm.node")}
    assert not {m for m in imports_of("broker") if m.startswith(("nova_swarm.hub", "nova_swarm.node"))}
    # the benchmark drives hub and node together, so nothing of the product imports it
    for part in ("broker", "hub", "node"):
        assert not {m for m in imports_of(part) if m.startswith("nova_swarm.bench")}, part


def test_the_contract_and_the_link_never_import_the_server() -> None:
    for part in ("broker/contract", "broker/link"):
        assert not {m for m in imports_of(part) if m.startswith("nova_swarm.broker.server")}, part
    # the contract stands alone: the link builds on it, never the other way round
    assert not {m for m in imports_of("broker/contract") if m.startswith("nova_swarm.broker.link")}
    # imports within broker/ are spelled out, so the checks above see every one of them
    for path in (ROOT / "broker").rglob("*.py"):
        relative = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, path


def test_a_node_bundle_carries_no_server_code_and_a_node_runs_from_it(tmp_path: Path) -> None:
    from nova_swarm.hub.pins import pack_bundle, source_root
    from nova_swarm.node.bundles import unpack

    archive = pack_bundle(source_root(), "9.9.9")
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert "nova_swarm/broker/contract/topics.py" in names and "nova_swarm/broker/link/connection.py" in names
    assert not [n for n in names if n.startswith("nova_swarm/broker/server/")]
    unpack(archive, tmp_path)
    # Every node module loads from the bundle alone, and none of them reaches for the server.
    code = (
        "import importlib, pkgutil, sys, nova_swarm.broker, nova_swarm.node as node\n"
        f"assert nova_swarm.broker.__file__.startswith({str(tmp_path)!r}), nova_swarm.broker.__file__\n"
        "for m in pkgutil.iter_modules(node.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('nova_swarm.node.' + m.name)\n"
        "mods = {n: getattr(m, '__file__', None) for n, m in sys.modules.items() if n.startswith('nova_swarm.')}\n"
        f"elsewhere = [n for n, f in mods.items() if f and not f.startswith({str(tmp_path)!r})]\n"
        "assert not elsewhere, elsewhere\n"
        "assert not [m for m in sys.modules if m.startswith('nova_swarm.broker.server')]\n"
        "from nova_swarm.broker.contract.version import __version__\n"
        "assert __version__ == '9.9.9', __version__\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)


def test_loading_every_hub_module_loads_no_node_code() -> None:
    code = (
        "import importlib, pkgutil, sys, nova_swarm.hub as hub\n"
        "for m in pkgutil.iter_modules(hub.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('nova_swarm.hub.' + m.name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('nova_swarm.node', 'nova_swarm.bench')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_node_does_not_load_the_brokers_dependencies() -> None:
    code = "import sys, nova_swarm.node.agent, nova_swarm.node.cli; assert 'amqtt' not in sys.modules, 'amqtt'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_wheel_and_sdist_build_with_all_three_parts(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(tmp_path.glob("nova_swarm-*.whl"))
    assert next(tmp_path.glob("nova_swarm-*.tar.gz"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in (
        "broker/contract/topics.py",
        "broker/server/cli.py",
        "broker/py.typed",
        "hub/hub.py",
        "node/agent.py",
        "node/llama.py",
    ):
        assert f"nova_swarm/{part}" in names
    meta = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(meta).decode()
    for script in ("swarm-broker", "swarm-hub", "swarm-node"):
        assert script in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for extra in ("node", "hub", "broker"):
        assert f"Provides-Extra: {extra}" in metadata
    assert 'llama-cpp-python>=0.3.2; extra == "node"' in metadata


def test_a_client_of_the_swarm_does_not_load_the_hub() -> None:
    code = (
        "import sys, nova_swarm.hub.client\n"
        "loaded = sorted(m for m in ('nova_swarm.hub.hub', 'jsonschema', 'amqtt') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "from nova_swarm.hub import Hub, SwarmClient\n"  # the package's names still load on use
        "assert Hub.__module__ == 'nova_swarm.hub.hub' and SwarmClient.__module__ == 'nova_swarm.hub.client'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def module_graph(package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` (subpackages too, dotted) each of its modules imports,
    type-only imports included."""
    root = ROOT / package
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__"): path
        for path in root.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" and name else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                stem = [*base, *(node.module.split(".") if node.module else [])]
            elif (node.module or "").startswith(f"nova_swarm.{package}."):
                stem = (node.module or "").split(".")[2:]
            else:
                continue
            for alias in node.names:  # `from . import x` names modules; `from .x import y` names x
                for candidate in (".".join([*stem, alias.name]), ".".join(stem)):
                    if candidate in modules and candidate != name:
                        deps.add(candidate)
                        break
        graph[name] = deps
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for dep in sorted(graph[module]):
            found = walk(dep, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := walk(m, []))), None)


def test_no_two_modules_of_a_part_import_each_other_even_for_types() -> None:
    # agent.py and updater.py once did; the updater now asks for a protocol (updater.Updated)
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    for part in ("broker", "hub", "node", "bench"):
        assert a_cycle(module_graph(part)) is None, part
