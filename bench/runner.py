"""Runs the sections, one swarm per broker, then Celery and the memory swarms; reports them all.

Per broker one ``Stack`` (broker + ``swarm-hub serve``) serves sections 1-5 in turn; each section
brings and removes its own nodes. A part that fails is reported as an error in its section and
the run goes on, so every section always prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from . import celery_baseline, dispatch, ensemble, linkdown, memory, overhead, plots, race, recovery, report, scaling
from .config import SECTIONS, BenchConfig
from .load import LoadResult
from .section import SectionResult
from .stack import Stack, StackConfig

T = TypeVar("T")
NODE_IDS = tuple(f"n{i:03d}" for i in range(128)) + recovery.NODES + ("llama-a", "llama-b")


def _progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.raw: dict[str, dict[str, Any]] = {k: {} for k in SECTIONS}
        self.errors: dict[str, dict[str, str]] = {k: {} for k in SECTIONS}
        #: every part gets at most this long, so a hung part cannot hang the run
        self.part_timeout = 120.0 if cfg.quick else 420.0

    def wants(self, section: str) -> bool:
        return section in self.cfg.sections

    async def part(self, section: str, who: str, make: Callable[[], Awaitable[T]]) -> T | None:
        _progress(f"{section} on {who}")
        try:
            async with asyncio.timeout(self.part_timeout):
                return await make()
        except Exception as exc:  # one failed part must not cost the other sections their figures
            self.errors[section][who] = f"{type(exc).__name__}: {exc}"
            _progress(f"{section} on {who} failed: {exc}\n{traceback.format_exc(limit=4)}")
            return None

    async def run(self) -> list[SectionResult]:
        direct = await asyncio.to_thread(overhead.Direct, self.cfg) if self.wants("overhead") else None
        for broker in self.cfg.brokers:
            if any(self.wants(s) for s in ("overhead", "dispatch", "scaling", "race", "recovery")):
                await self.on_broker(broker, direct)
        if self.wants("linkdown"):
            for broker in self.cfg.brokers:
                got = await self.part("linkdown", broker, lambda b=broker: linkdown.measure(  # type: ignore[misc]
                    self.cfg, b, self.workdir / f"linkdown-{b}"))  # fmt: skip
                if got is not None:
                    self.raw["linkdown"][broker] = got
        if self.wants("ensemble"):
            # Real models, so once: on the last broker of the run.
            broker = self.cfg.brokers[-1]
            got = await self.part("ensemble", broker, lambda: ensemble.measure(
                self.cfg, broker, self.workdir / "ensemble"))  # fmt: skip
            if got is not None:
                self.raw["ensemble"][broker] = got
        if self.wants("dispatch"):
            why = celery_baseline.missing()
            if why is not None:
                self.errors["dispatch"]["celery"] = why
            else:
                points = await self.part("dispatch", "celery", lambda: self._celery())
                if points is not None:
                    self.raw["dispatch"]["celery"] = {"points": [p.to_json() for p in points]}
        if self.wants("memory"):
            brokers: dict[str, Any] = {}
            for broker in self.cfg.brokers:
                got = await self.part("memory", broker, lambda b=broker: memory.hub_and_broker(  # type: ignore[misc]
                    b, self.cfg, self.workdir / f"memory-{b}"))  # fmt: skip
                if got is not None:
                    brokers[broker] = got
            self.raw["memory"]["brokers"] = brokers
        return self.sections()

    def _celery(self) -> Awaitable[list[LoadResult]]:
        return celery_baseline.run(
            self.workdir / "celery", self.cfg.concurrencies, seconds=self.cfg.dispatch_seconds,
            warmup_s=self.cfg.dispatch_warmup_s,
        )  # fmt: skip

    def llama_brokers(self) -> tuple[str, ...]:
        """Where the parts with real llama nodes run: as configured, or else (``--brokers`` left
        none of those) on the last broker, so those figures are never missing altogether."""
        chosen = tuple(b for b in self.cfg.brokers if b in self.cfg.llama_brokers)
        return chosen or self.cfg.brokers[-1:]

    async def on_broker(self, broker: str, direct: overhead.Direct | None) -> None:
        cfg = self.cfg
        config = StackConfig(broker=broker, heartbeat_timeout_s=cfg.heartbeat_timeout_s, node_ids=NODE_IDS)
        try:
            stack = await Stack(config, self.workdir / broker).__aenter__()
        except Exception as exc:
            for s in ("overhead", "dispatch", "scaling", "race", "recovery"):
                if self.wants(s):
                    self.errors[s][broker] = f"the swarm did not start: {type(exc).__name__}: {exc}"
            return
        try:
            if broker in self.llama_brokers() and any(self.wants(s) for s in ("overhead", "scaling", "memory")):
                await self.part("overhead", broker, lambda: self._with_llama(stack, broker, direct))
            if self.wants("dispatch"):
                got = await self.part("dispatch", broker, lambda: dispatch.measure(stack, cfg))
                if got is not None:
                    self.raw["dispatch"][broker] = got
            if self.wants("scaling"):
                got = await self.part("scaling", broker, lambda: scaling.measure_fake(stack, cfg))
                if got is not None:
                    self.raw["scaling"].setdefault(broker, {})["fake"] = got
            if self.wants("race"):
                got = await self.part("race", broker, lambda: race.measure(stack, cfg))
                if got is not None:
                    self.raw["race"][broker] = got
            if self.wants("recovery"):
                got = await self.part("recovery", broker, lambda: recovery.measure(stack, cfg))
                if got is not None:
                    self.raw["recovery"][broker] = got
        finally:
            await stack.close()

    async def _with_llama(self, stack: Stack, broker: str, direct: overhead.Direct | None) -> None:
        """The parts that need real llama nodes: overhead, node memory, real-node scaling."""
        cfg = self.cfg
        async with AsyncExitStack() as nodes:
            pid = await nodes.enter_async_context(overhead.llama_node(stack, "llama-a", cfg))
            if self.wants("overhead") and direct is not None:
                got = await self.part("overhead", broker, lambda: overhead.measure(stack, cfg, direct))
                if got is not None:
                    self.raw["overhead"][broker] = got
            if self.wants("memory") and "node" not in self.raw["memory"]:
                got = await self.part("memory", "node", lambda: memory.node_overhead(stack, pid, cfg))
                if got is not None:
                    self.raw["memory"]["node"] = got
            if self.wants("scaling"):
                real: dict[str, Any] = {}
                real["one"] = await self.part("scaling", f"{broker} real", lambda: scaling.measure_real(
                    stack, cfg, nodes=1))  # fmt: skip
                await nodes.enter_async_context(overhead.llama_node(stack, "llama-b", cfg))
                real["two"] = await self.part("scaling", f"{broker} real", lambda: scaling.measure_real(
                    stack, cfg, nodes=2))  # fmt: skip
                if real["one"] and real["two"]:
                    self.raw["scaling"].setdefault(broker, {})["real"] = real
        await stack.watch.nodes_online(0, exactly=True, timeout=60)

    def sections(self) -> list[SectionResult]:
        build = {
            "overhead": overhead.section,
            "dispatch": dispatch.section,
            "scaling": scaling.section,
            "race": race.section,
            "recovery": recovery.section,
            "linkdown": linkdown.section,
            "memory": memory.section,
            "ensemble": ensemble.section,
        }
        out = []
        for key in SECTIONS:
            if not self.wants(key):
                continue
            try:
                out.append(build[key](self.raw[key], self.errors[key], self.cfg))
            except Exception as exc:  # figures too incomplete to tabulate: still print the section
                errors = {**self.errors[key], "report": f"{type(exc).__name__}: {exc}"}
                out.append(SectionResult(key, _TITLES[key], self.raw[key], errors=errors))
        return out


_TITLES = {
    "overhead": "1. Overhead: direct llama-cpp call vs the swarm path",
    "dispatch": "2. Dispatch capacity: the swarm vs Celery + Redis",
    "scaling": "3. Scaling with N nodes",
    "race": "4. Race: tail latency with fanout",
    "recovery": "5. Recovery after SIGKILL",
    "linkdown": linkdown.TITLE,
    "memory": "6. Memory",
    "ensemble": ensemble.TITLE,
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB RAM, {platform.system()} {platform.release()}"


def _version(argv: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(1) if found else None


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("nova-swarm", "llama_cpp_python", "amqtt", "aiomqtt", "celery", "redis", "kombu", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    out["mosquitto"] = _version([mosquitto, "-h"], r"mosquitto version (\S+)") if mosquitto else None
    redis = celery_baseline.redis_binary()
    out["redis-server"] = _version([redis, "--version"], r"v=(\S+)") if redis else None
    return out


def host_name() -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-") or "host"


def main(cfg: BenchConfig, command: str) -> int:
    started = time.monotonic()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nova-bench-") as tmp:
        sections = asyncio.run(Run(cfg, Path(tmp)).run())
    now = datetime.now(UTC)
    stem = f"{now:%Y-%m-%d}-{host_name()}"
    meta = {
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "host": host_name(),
        "machine": machine(),
        "quick": cfg.quick,
        "duration_s": round(time.monotonic() - started, 1),
        "versions": versions(),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "processes": (
            "broker = `python -m nova_swarm.broker` (amqtt in-process, or Mosquitto as its child); hub = "
            "`swarm-hub serve`; fake nodes = Node agents in one fleet process; llama and recovery nodes = "
            "`swarm-node run` processes; load generators, SwarmClient and the direct llama-cpp calls = the "
            "benchmark process; Celery = redis-server + a prefork worker process."
        ),
    }
    for s in sections:
        report.print_section(s, sys.stdout)
    targets = [t for s in sections for t in s.targets]
    report.print_summary(targets, sys.stdout)
    json_path = cfg.out_dir / f"{stem}.json"
    report.write_json(json_path, meta, sections)
    (cfg.out_dir / f"{stem}.md").write_text(report.markdown(meta, sections))
    pngs = plots.draw(sections, cfg.out_dir, stem, f"nova-swarm `{command}` · {meta['date']} · {meta['machine']}")
    print(f"\nwrote {json_path}, {cfg.out_dir / (stem + '.md')} and {len(pngs)} plots "
          f"({', '.join(p.name for p in pngs)}) in {meta['duration_s']} s")  # fmt: skip
    return 0
