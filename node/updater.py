"""How a node follows the swarm's retained, signed pins: the model it serves and the code it runs.

Model pin (``swarm/{sid}/model``): the node checks the signature, finds the GGUF in its cache (or
pulls it from the pin's URL, verified by sha256), then switches between tasks: it stops taking
work (reported as ``paused``, so the hub sends it nothing), hands back what is queued, lets what is
running finish, swaps the engine and announces the new model. A pin that fails any check leaves
the old model serving. An empty retained message unpins: the node goes back to its own model.
A pin of several models (``ModelPin.more``) that apply to a node makes it serve them all: it
finds or pulls each, then, between tasks as for a switch, takes them as its set of models
(``model_set.py``).

Bundle (``swarm/{sid}/bundle``): the node checks the signature and version, collects the chunks,
checks the archive's sha256, installs it next to the running version, flips ``current`` and exits
with ``RESTART_EXIT``; its supervisor starts the new code and rolls back if it does not come up.

Every outcome is reported in the node's retained status (``bundle`` and ``model_pin``).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import structlog
from packaging.version import Version

from nova_swarm.broker.contract.errors import ConfigError, ConnectionLost, UpdateRefused
from nova_swarm.broker.contract.messages import BundleManifest, ModelPin, PinReport
from nova_swarm.broker.contract.signing import PublicKey
from nova_swarm.broker.contract.topics import Topics
from nova_swarm.broker.contract.version import __version__
from nova_swarm.broker.link.base import Link

from .bundles import BundleStore, assemble, check_bundle, claimed, verify_manifest
from .config import NodeConfig
from .engine import Engine
from .memory import RamPolicy
from .model_set import ModelSet, ModelSpec
from .models import CATALOGUE, ModelCache, pull

log = structlog.get_logger("nova_swarm.node.updates")

Outcome = Literal["fetching", "switching", "applied", "refused", "rolled_back", "unpinned"]


@dataclass(frozen=True, slots=True)
class UpdateSetup:
    """What a node needs to follow pins. The defaults follow none, and say so in the status."""

    #: the hub's public key; without it every pin is refused
    hub_key: PublicKey | None = None
    #: where bundles are installed; None: code updates are off (no supervisor to restart into them)
    bundles: BundleStore | None = None
    #: where pinned models are looked up and pulled to
    models: ModelCache | None = None
    #: builds an engine for a model (``model_set.model_spec``); None: this engine cannot switch models
    load_model: Callable[[ModelSpec], Engine] | None = None
    #: the node's own model, served when nothing (or nothing for this node) is pinned
    model_path: Path | None = None
    #: all its own models, when it was started with several (``model_path`` is the first)
    model_paths: tuple[Path, ...] = ()
    #: called once, when the node first comes online (the supervisor's health signal)
    on_online: Callable[[], None] | None = None
    #: how long collecting a bundle's chunks may take
    chunk_timeout_s: float = 60.0
    #: how long to wait for the right chunk after a wrong one arrived (stale or tampered)
    chunk_grace_s: float = 3.0
    #: how the node decides that a pinned model fits in RAM (``memory.py``)
    ram: RamPolicy = RamPolicy()


class Updated(Protocol):
    """What the updater needs of the node it updates (``agent.Node`` is one). A protocol, so
    ``agent`` imports this module and not the other way round."""

    config: NodeConfig
    topics: Topics
    model_path: Path | None
    models: ModelSet

    @property
    def swapping(self) -> bool: ...

    async def send_status(self) -> None: ...

    async def switch_engine(self, model_path: Path, reason: str) -> None: ...

    async def serve_models(self, paths: list[Path], reason: str) -> list[str]: ...

    async def restart_for_update(self, version: str) -> None: ...


class Updater:
    def __init__(self, node: Updated, setup: UpdateSetup) -> None:
        self.node = node
        self.setup = setup
        self.bundle_report: PinReport | None = None
        self.model_report: PinReport | None = None
        self._fetching: BundleManifest | None = None
        self._chunks: dict[int, bytes] = {}
        self._bad_chunks: dict[int, str] = {}
        self._chunk_arrived = asyncio.Event()
        self._switch: asyncio.Task[None] | None = None
        self._switch_to: str | None = None
        self._download_stop = threading.Event()
        self._pin_serial = 0
        # A node starts on its own model, so the engine already knows that file's hash.
        self._own_sha256: str | None = next(iter(node.models.specs.values())).info.sha256 if setup.model_path else None

    def cancel(self) -> None:
        """The node is stopping: a model still downloading is abandoned (the download resumes next
        time); an engine swap under way finishes, so the node never stops with no engine."""
        self._download_stop.set()
        if self._switch is not None and not self.node.swapping:
            self._switch.cancel()

    # ------------------------------------------------------------------ reporting

    async def _report(
        self, kind: Literal["bundle", "model"], wanted: str, outcome: Outcome, reason: str | None
    ) -> None:
        report = PinReport(
            wanted=wanted[:128], outcome=outcome, reason=reason[:1024] if reason else None, ts=time.time()
        )
        if kind == "bundle":
            self.bundle_report = report
        else:
            self.model_report = report
        level = log.warning if outcome in ("refused", "rolled_back") else log.info
        level(f"{kind} {outcome}", wanted=wanted, reason=reason)
        await self.node.send_status()

    # ------------------------------------------------------------------ bundles

    async def on_bundle(self, payload: bytes, conn: Link, tg: asyncio.TaskGroup) -> None:
        if not payload:
            self.bundle_report = None  # unpublished: nothing to follow
            return
        store = self.setup.bundles
        failed = store.failed() if store is not None else {}
        wanted = claimed(payload, "version")
        try:
            manifest: BundleManifest = verify_manifest(payload, self.setup.hub_key, BundleManifest)
            wanted = manifest.version
            check_bundle(manifest, swarm=self.node.config.swarm, running=__version__, failed=failed)
        except UpdateRefused as exc:
            await self._report("bundle", wanted, "rolled_back" if wanted in failed else "refused", str(exc))
            return
        if Version(manifest.version) == Version(__version__):
            await self._report("bundle", wanted, "applied", None)
            return
        if store is None:
            await self._report("bundle", wanted, "refused", "code updates are off on this node (--no-updates)")
            return
        if self._fetching is not None and self._fetching.sha256 == manifest.sha256:
            return  # the same manifest again (a reconnect); the fetch under way goes on
        tg.create_task(self._fetch_bundle(manifest, payload, conn, store))

    def on_chunk(self, index: int, payload: bytes) -> None:
        manifest = self._fetching
        if manifest is None or index >= len(manifest.chunks):
            return
        actual = hashlib.sha256(payload).hexdigest()
        if actual == manifest.chunks[index]:
            self._chunks[index] = payload
            self._bad_chunks.pop(index, None)
        else:
            self._bad_chunks[index] = actual
        self._chunk_arrived.set()

    async def _fetch_bundle(self, manifest: BundleManifest, envelope: bytes, conn: Link, store: BundleStore) -> None:
        version = manifest.version
        self._fetching, self._chunks, self._bad_chunks = manifest, {}, {}
        await self._report("bundle", version, "fetching", f"{len(manifest.chunks)} chunks, {manifest.size_bytes} bytes")
        try:
            await conn.subscribe(self.node.topics.bundle_chunks(), qos=1)
            try:
                chunks = await self._collect(manifest)
            finally:
                try:
                    await conn.unsubscribe(self.node.topics.bundle_chunks())
                except ConnectionLost:
                    pass
            archive = assemble(manifest, chunks)
            await asyncio.to_thread(store.install, manifest, envelope, archive)
            store.start_trial(version)
        except (UpdateRefused, OSError) as exc:  # OSError: a full or read-only disk
            await self._report("bundle", version, "refused", str(exc))
            return
        except ConnectionLost:
            return  # the retained manifest arrives again on the next connection
        finally:
            self._fetching = None
        await self._report("bundle", version, "switching", f"restarting into bundle {version}")
        await self.node.restart_for_update(version)

    async def _collect(self, manifest: BundleManifest) -> dict[int, bytes]:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.setup.chunk_timeout_s
        first_bad: float | None = None
        while len(self._chunks) < len(manifest.chunks):
            if self._bad_chunks and first_bad is None:
                first_bad = loop.time()
            deadline = give_up if first_bad is None else min(give_up, first_bad + self.setup.chunk_grace_s)
            if loop.time() >= deadline:
                if self._bad_chunks:
                    index, actual = next(iter(sorted(self._bad_chunks.items())))
                    raise UpdateRefused(
                        f"bundle {manifest.version} chunk {index} has sha256 {actual}, the signed manifest says "
                        f"{manifest.chunks[index]} (tampered, or left over from another bundle)"
                    )
                raise UpdateRefused(
                    f"bundle {manifest.version}: only {len(self._chunks)} of {len(manifest.chunks)} chunks"
                    f" arrived within {self.setup.chunk_timeout_s:g} s"
                )
            self._chunk_arrived.clear()
            try:
                async with asyncio.timeout(min(0.5, deadline - loop.time())):  # cancels cleanly, unlike wait_for
                    await self._chunk_arrived.wait()
            except TimeoutError:
                pass
        return dict(self._chunks)

    # ------------------------------------------------------------------ model pins

    async def on_model_pin(self, payload: bytes, tg: asyncio.TaskGroup) -> None:
        own = self.setup.model_path
        if not payload:
            if self.model_report is None:
                return  # nothing was ever pinned
            reason = "nothing is pinned: serving this node's own model"
            if len(self.setup.model_paths) > 1:
                await self._follow_own_set(tg, reason)
            else:
                await self._follow(None, own, tg, "unpinned", reason)
            return
        wanted = claimed(payload, "name")
        try:
            pin: ModelPin = verify_manifest(payload, self.setup.hub_key, ModelPin)
            wanted = pin.name
            if pin.swarm != self.node.config.swarm:
                raise UpdateRefused(f"pin is for swarm {pin.swarm!r}, this node is in {self.node.config.swarm!r}")
            if pin.serial < self._pin_serial:
                raise UpdateRefused(f"pin {pin.serial} is older than pin {self._pin_serial} already followed")
            if self.setup.load_model is None:
                raise UpdateRefused("this node's engine cannot switch models")
        except UpdateRefused as exc:
            await self._report("model", wanted, "refused", str(exc))
            return
        self._pin_serial = pin.serial
        following = pin.for_node(self.node.config.tags)
        if not following:
            tagged = sorted({t for e in pin.entries() for t in e.tags})
            reason = f"pinned for nodes tagged {', '.join(tagged)}: serving this node's own model"
            if len(self.setup.model_paths) > 1:
                await self._follow_own_set(tg, reason)
            else:
                await self._follow(None, own, tg, "unpinned", reason)
            return
        if len(following) == 1:
            await self._follow(pin.only(following[0]), None, tg, "applied", None)
            return
        await self._follow_set([pin.only(e) for e in following], tg)

    async def _follow(
        self, pin: ModelPin | None, own: Path | None, tg: asyncio.TaskGroup, outcome: Outcome, reason: str | None
    ) -> None:
        wanted = pin.name if pin is not None else (own.name.removesuffix(".gguf") if own else "own model")
        target = pin.sha256 if pin is not None else (str(own) if own else None)
        if not await self._supersede(target):
            return  # already on its way there
        serving = self._serving()
        own_served = own is None or serving == {self._own_sha256}
        if (pin is not None and serving == {pin.sha256}) or (pin is None and own_served):
            await self._report("model", wanted, outcome, reason)
            return
        self._switch_to = target
        self._switch = tg.create_task(self._switch_model(pin, own, wanted, outcome, reason))

    async def _supersede(self, target: str | None) -> bool:
        """Make way for a switch to ``target``: False when one to it is under way already."""
        if target == self._switch_to and self._switch is not None and not self._switch.done():
            return False
        if self._switch is not None and not self._switch.done():
            # A newer pin supersedes the one under way: stop its download, or let its swap end.
            self._download_stop.set()
            if not self.node.swapping:
                self._switch.cancel()
            await asyncio.gather(self._switch, return_exceptions=True)
            self._download_stop = threading.Event()
        return True

    def _serving(self) -> set[str]:
        """The sha256 of every model the node serves now."""
        return {spec.info.sha256 for spec in self.node.models.specs.values()}

    async def _follow_set(self, pins: list[ModelPin], tg: asyncio.TaskGroup) -> None:
        """Serve every model of ``pins`` (those of a pin that apply to this node)."""
        wanted = " + ".join(p.name for p in pins)
        target = ",".join(sorted(p.sha256 for p in pins))
        if not await self._supersede(target):
            return
        if self._serving() == {p.sha256 for p in pins}:
            await self._report("model", wanted, "applied", None)
            return
        self._switch_to = target
        self._switch = tg.create_task(self._switch_set(pins, [], wanted, "applied", None))

    async def _follow_own_set(self, tg: asyncio.TaskGroup, reason: str) -> None:
        """Back to the several models the node was started with."""
        own = list(self.setup.model_paths)
        target = ",".join(str(p) for p in own)
        if not await self._supersede(target):
            return
        wanted = " + ".join(p.name.removesuffix(".gguf") for p in own)
        if {spec.path for spec in self.node.models.specs.values()} == set(own):
            await self._report("model", wanted, "unpinned", reason)
            return
        self._switch_to = target
        self._switch = tg.create_task(self._switch_set([], own, wanted, "unpinned", reason))

    async def _switch_set(
        self, pins: list[ModelPin], own: list[Path], wanted: str, outcome: Outcome, reason: str | None
    ) -> None:
        try:
            paths = list(own)
            if pins:
                await self._report("model", wanted, "fetching", None)
                for pin in pins:
                    paths.append(await asyncio.to_thread(self._locate, pin))
            await self._report("model", wanted, "switching", f"taking {len(paths)} models once running tasks finish")
            unfit = await self.node.serve_models(paths, f"switching models to {wanted}")
        except (UpdateRefused, ConfigError, OSError) as exc:
            serving = ", ".join(self.node.models.specs)
            await self._report("model", wanted, "refused", f"{exc}; still serving {serving}")
            return
        if unfit:  # served, but announced as too big for this node
            reason = "; ".join([*([reason] if reason else []), *unfit])
        await self._report("model", wanted, outcome, reason)

    async def _switch_model(
        self, pin: ModelPin | None, own: Path | None, wanted: str, outcome: Outcome, reason: str | None
    ) -> None:
        try:
            if pin is not None:
                await self._report("model", wanted, "fetching", None)
                path = await asyncio.to_thread(self._locate, pin)
            else:
                assert own is not None
                path = own
            await asyncio.to_thread(self._check_fits, path, wanted)
            await self._report("model", wanted, "switching", f"loading {path.name} once running tasks finish")
            await self.node.switch_engine(path, f"switching model to {wanted}")
        except (UpdateRefused, ConfigError, OSError) as exc:  # a file gone or a full disk: refused, not a crash
            serving = ", ".join(self.node.models.specs)
            await self._report("model", wanted, "refused", f"{exc}; still serving {serving}")
            return
        await self._report("model", wanted, outcome, reason)

    def _locate(self, pin: ModelPin) -> Path:
        """A verified copy of the pinned file: the cache, this node's own model, or a download."""
        cache = self.setup.models or ModelCache()
        cached = cache.find_sha256(pin.sha256)
        if cached is not None:
            return cached.path
        own = self.setup.model_path
        if own is not None and own.is_file() and self._own_sha256 == pin.sha256:
            return own
        entry = next((e for e in CATALOGUE.values() if e.sha256 == pin.sha256), None)
        url = pin.url or (entry.url if entry else None)
        if url is None:
            raise UpdateRefused(f"no copy of {pin.name} (sha256 {pin.sha256[:16]}...) here, and the pin has no URL")
        size = pin.size_bytes or (entry.size_bytes if entry else None)
        if size is not None:
            self.setup.ram.check_size(size, pin.name, freed=self._serving_bytes())
            cache.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(cache.root).free
            if free < size:
                raise UpdateRefused(f"{pin.name} needs {size / 2**20:.0f} MB of disk, {free / 2**20:.0f} MB free")
        log.info("pulling pinned model", model=pin.name, url=url)
        return pull(url, cache=cache, sha256=pin.sha256, name=pin.name, stop=self._download_stop.is_set).path

    def _check_fits(self, path: Path, name: str) -> None:
        """ConfigError unless ``path`` fits once the served model is closed (reads two GGUF
        headers: off the loop)."""
        self.setup.ram.check(path, name=name, freed=self._serving_bytes())

    def _serving_bytes(self) -> int:
        """What the model served now takes: the node closes it before loading the next one."""
        path = self.node.model_path
        if path is None:
            return 0
        try:
            return self.setup.ram.needs(path).total
        except (ConfigError, OSError):
            return 0
