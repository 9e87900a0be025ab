"""Several models on one node, within its RAM budget.

    models = ModelSet([spec_a, spec_b], load=load_model, policy=ram)
    await models.start()                     # loads the first model that fits
    async with models.use("gemma-3-270m-q4_k_m", deadline=d) as lease:
        result = run(lease.engine)           # loaded first if need be, evicting the least
                                             # recently used idle model to make room

A node serves a set of GGUFs (``swarm-node run --model A --model B``). It loads a model when a
task needs it and, when the budget is reached, evicts the least recently used model that is not
generating. It never evicts a model in use: a task that needs room held by a busy model waits
for it, up to its deadline. A model that cannot fit even alone is announced (the hub can then
say so, with the numbers) but never loaded: a task for it is refused with ``model_too_large``.

``Shelf`` holds the rules (what is loaded, what to evict, what must wait) with no I/O, and is
tested directly; ``ModelSet`` does the loading and closing, in worker threads (llama-cpp
blocks).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import ModelInfo

from .engine import Engine, EngineInfo
from .memory import Needs, RamPolicy, mb
from .models import model_name, sha256_file

log = structlog.get_logger("nova_swarm.node")


# ---------------------------------------------------------------- the rules (no I/O)


@dataclass(frozen=True, slots=True)
class Ready:
    """In memory: use it."""


@dataclass(frozen=True, slots=True)
class Load:
    """Load it, after evicting these (least recently used first)."""

    evict: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Busy:
    """It would fit, but only once models in use now are done: wait."""


@dataclass(frozen=True, slots=True)
class TooLarge:
    """It needs more than the node may ever give its models."""

    needs: int
    room: int


Plan = Ready | Load | Busy | TooLarge


@dataclass
class _Held:
    bytes: int
    #: tasks using it now (a model being loaded counts as used: it cannot be evicted)
    users: int = 0
    #: when it was last used, on the shelf's own counter: the least recent goes first
    used_at: int = 0


@dataclass
class Shelf:
    """Which models are in memory, and what it takes to bring in another."""

    #: bytes each model takes once loaded, by name
    needs: dict[str, int]
    held: dict[str, _Held] = field(default_factory=dict)
    _clock: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def used(self) -> int:
        return sum(h.bytes for h in self.held.values())

    def plan(self, name: str, room: int | None) -> Plan:
        """What serving ``name`` takes, when the node's models may use ``room`` bytes in all
        (None: no limit is known)."""
        if name in self.held:
            return Ready()
        need = self.needs[name]
        if room is None:
            return Load()
        if need > room:
            return TooLarge(need, room)
        used, evict = self.used, []
        for other, held in sorted(self.held.items(), key=lambda kv: kv[1].used_at):
            if used + need <= room:
                break
            if held.users == 0:
                evict.append(other)
                used -= held.bytes
        if used + need > room:
            return Busy()
        return Load(tuple(evict))

    def loading(self, name: str, evicted: Sequence[str]) -> None:
        """``name`` is being loaded (and counts, in use) in place of ``evicted``."""
        for other in evicted:
            del self.held[other]
        self.held[name] = _Held(self.needs[name], users=1, used_at=next(self._clock))

    def failed(self, name: str) -> None:
        """Its load failed: it takes no room."""
        self.held.pop(name, None)

    def take(self, name: str) -> None:
        held = self.held[name]
        held.users += 1
        held.used_at = next(self._clock)

    def give_back(self, name: str) -> None:
        held = self.held.get(name)
        if held is not None:
            held.users -= 1

    def last_used(self) -> str | None:
        """The loaded model used most recently."""
        return max(self.held, key=lambda n: self.held[n].used_at, default=None)


# ---------------------------------------------------------------- the set


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model the node can serve: its file, and what it needs once loaded."""

    name: str
    path: Path
    info: ModelInfo
    needs: Needs


def model_spec(path: Path, policy: RamPolicy) -> ModelSpec:
    """The spec of a GGUF file: its name, hash and size, and what ``policy`` says it needs
    (reads the file: off the loop)."""
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    name = model_name(path)
    info = ModelInfo(name=name, sha256=sha256_file(path), size_bytes=path.stat().st_size, ctx=policy.ctx)
    return ModelSpec(name, path, info, policy.needs(path, name))


@dataclass(frozen=True, slots=True)
class Lease:
    """A model in use by one task."""

    engine: Engine
    #: seconds spent loading it for this task (None: it was in memory)
    load_s: float | None


class ModelSet:
    """The models one node serves: which are loaded, loading on demand within the budget."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        *,
        load: Callable[[ModelSpec], Engine] | None,
        policy: RamPolicy,
        engines: dict[str, Engine] | None = None,
    ) -> None:
        """``load`` builds an engine for a spec (in a worker thread); None for a set that cannot
        load (one engine given ready-made, as tests and embedders do). ``engines``: models
        already loaded."""
        if not specs:
            raise ConfigError("a node needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"the same model is given twice: {', '.join(sorted(names))}")
        self.specs = {s.name: s for s in specs}
        self.default = specs[0].name
        self._load = load
        self.policy = policy
        self._engines: dict[str, Engine] = dict(engines or {})
        self.shelf = Shelf({s.name: s.needs.total for s in specs})
        for name in self._engines:
            self.shelf.loading(name, ())
            self.shelf.give_back(name)
        self._changed = asyncio.Condition()
        #: seconds each load took, in order; the first load of each model at start is not a swap
        self.load_times: dict[str, float] = {}
        self.swaps: list[tuple[str, float]] = []
        self._watchers: list[Callable[[], Awaitable[None]]] = []
        #: names that cannot fit even alone, found at start
        self.unfit: dict[str, str] = {}
        self._started = False
        #: the model being loaded now, if any (one at a time)
        self._loading: set[str] = set()
        #: the last engine's description, for when none is loaded (a load failed after an eviction)
        self._last_info: EngineInfo | None = next((e.info for e in self._engines.values()), None)

    @classmethod
    def single(cls, engine: Engine) -> ModelSet:
        """One engine, already loaded, which stays: the set a node gets when handed an engine."""
        info = engine.info
        model = ModelInfo(name=info.name, sha256=info.sha256, size_bytes=info.size_bytes, ctx=info.ctx)
        spec = ModelSpec(info.name, Path(info.name), model, Needs(info.name, weights=info.size_bytes, context=0))
        return cls([spec], load=None, policy=RamPolicy(budget_bytes=None), engines={info.name: engine})

    def watch(self, callback: Callable[[], Awaitable[None]]) -> None:
        """``callback`` is awaited whenever what is loaded changes (the node announces again)."""
        self._watchers.append(callback)

    # ------------------------------------------------------------ what the node says

    @property
    def current(self) -> Engine:
        """The engine used most recently (the one a task naming no model runs on)."""
        name = self.shelf.last_used()
        if name is None or name not in self._engines:
            raise ConfigError("no model is loaded")
        return self._engines[name]

    def current_info(self) -> EngineInfo:
        """What the node says it serves first: the engine used most recently, or, with none
        loaded (a load failed after an eviction), its default model as the last engine was."""
        name = self.shelf.last_used()
        if name is not None and name in self._engines:
            return self._engines[name].info
        spec = self.specs[self.default]
        if self._last_info is None:
            raise ConfigError("no model is loaded")
        return replace(self._last_info, name=spec.name, sha256=spec.info.sha256, size_bytes=spec.info.size_bytes)

    def loaded(self) -> list[str]:
        return sorted(self._engines)

    def announced(self) -> list[ModelInfo]:
        """``Announce.models``: every model, with what it needs and whether it is loaded now.
        Empty for a one-model node (its announce's ``model`` says it all)."""
        if len(self.specs) == 1:
            return []
        return [
            spec.info.model_copy(
                update={
                    "needs_bytes": spec.needs.total,
                    "loaded": name in self._engines,
                    "load_s": round(self.load_times[name], 3) if name in self.load_times else None,
                    "fits": name not in self.unfit,
                }
            )
            for name, spec in self.specs.items()
        ]

    # ------------------------------------------------------------ loading

    async def start(self) -> None:
        """Note which models can never fit, then load the first one that can. ConfigError when
        none can (with the numbers of the first). A ready-made set has nothing to do."""
        if self._load is None or self._started:
            return
        self._started = True
        self.unfit = self._unfit(self.specs.values(), freed=self.shelf.used)
        self.default = next(n for n in self.specs if n not in self.unfit)
        if not self._engines:
            await self._load_alone(self.default)

    def _unfit(self, specs: Iterable[ModelSpec], *, freed: int) -> dict[str, str]:
        """Why each of ``specs`` that can never fit does not (the models loaded now would give
        ``freed`` back). ConfigError, with the numbers of the first, when none fits."""
        unfit: dict[str, str] = {}
        first_error: ConfigError | None = None
        specs = list(specs)
        for spec in specs:
            try:
                self.policy.check_needs(spec.needs, freed=freed)
            except ConfigError as exc:
                first_error = first_error or exc
                unfit[spec.name] = str(exc)
                log.warning("model does not fit this node; announced, never loaded", model=spec.name, reason=str(exc))
        if len(unfit) == len(specs) and first_error is not None:
            raise first_error
        return unfit

    async def reset(self, specs: Sequence[ModelSpec], load: Callable[[ModelSpec], Engine]) -> None:
        """Serve ``specs`` from now on (a model pin: one model, or several). ConfigError, and
        nothing changed, when none of them fits. Models no longer served are closed before any
        other loads (a phone may not hold two); those still served stay loaded. The caller makes
        sure nothing is in use."""
        if not specs:
            raise ConfigError("a node needs at least one model")
        unfit = self._unfit(specs, freed=self.shelf.used)
        new = {s.name: s for s in specs}
        keep = {
            name: engine
            for name, engine in self._engines.items()
            if name in new and name not in unfit and new[name].info.sha256 == self.specs[name].info.sha256
        }
        for name, engine in self._engines.items():
            if name not in keep:
                await asyncio.to_thread(engine.close)
        self._engines = keep
        self.specs, self._load, self.unfit = new, load, unfit
        self.default = next(s.name for s in specs if s.name not in unfit)
        self.shelf = Shelf({s.name: s.needs.total for s in specs})
        for name in keep:
            self.shelf.loading(name, ())
            self.shelf.give_back(name)
        if not self._engines:
            await self._load_alone(self.default)
        else:
            await self._changed_now()

    def _room(self) -> int | None:
        return self.policy.room(freed=self.shelf.used)

    @asynccontextmanager
    async def use(self, name: str | None, *, deadline: float) -> AsyncIterator[Lease]:
        """The engine for ``name`` (None: the one used last), loaded first if need be. Raises
        ``RequestFailed`` for a model this node does not have, one that cannot fit, one that does
        not load, or when the room it needs is still held by busy models at ``deadline``
        (``time.monotonic``).

        A load runs outside the set's lock, one at a time: tasks on loaded models start and end
        meanwhile. The shelf counts the model from the moment its load begins."""
        load_s: float | None = None
        #: set when this task reserved a load (the models it evicts)
        evicting: list[tuple[str, Engine]] | None = None
        async with self._changed:
            # Under the lock: a load that ends meanwhile may have changed what "the last" is.
            name = name or self.shelf.last_used() or self.default
            if name not in self.specs:
                have = ", ".join(self.specs)
                raise RequestFailed(ErrorCode.UNKNOWN_MODEL, f"this node does not serve {name!r} (it serves {have})")
            if name in self.unfit:
                raise RequestFailed(ErrorCode.MODEL_TOO_LARGE, self.unfit[name])
            while True:
                plan = self.shelf.plan(name, self._room())
                if isinstance(plan, Ready) and name in self._engines:
                    self.shelf.take(name)
                    break
                if isinstance(plan, TooLarge):
                    raise RequestFailed(
                        ErrorCode.MODEL_TOO_LARGE,
                        f"{name} needs ~{mb(plan.needs)} but only {mb(plan.room)} is available to this node's models",
                    )
                if isinstance(plan, Load) and not self._loading:
                    evicting = self._reserve(name, plan.evict)
                    break
                # Busy, another load under way, or this very model still loading: wait.
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await self._changed.wait()
                except TimeoutError:
                    raise RequestFailed(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"{name} could not be loaded in time: models in use held the room it needs",
                    ) from None
        if evicting is not None:  # this task reserved the load: do it, outside the lock
            try:
                load_s = await self._bring_in(name, evicting, count_swap=True)
            except ConfigError as exc:  # the file went bad since start, say
                raise RequestFailed(ErrorCode.ENGINE_ERROR, f"could not load {name}: {exc}") from exc
        try:
            yield Lease(self._engines[name], load_s)
        finally:
            async with self._changed:
                self.shelf.give_back(name)
                self._changed.notify_all()

    def _reserve(self, name: str, evict: Sequence[str]) -> list[tuple[str, Engine]]:
        """Take the room for ``name`` (held, as in use) in place of ``evict``, whose engines are
        handed back to be closed: under the lock, before the load itself."""
        self.shelf.loading(name, evict)
        self._loading.add(name)
        return [(other, self._engines.pop(other)) for other in evict]

    async def _bring_in(self, name: str, evicting: Sequence[tuple[str, Engine]], *, count_swap: bool) -> float:
        """Close ``evicting``, then load ``name``, reserved by ``_reserve``. Its load time. A load
        that fails gives its room back; either way, the node announces what it now holds."""
        try:
            if self._load is None:
                raise ConfigError(f"this node cannot load {name}")
            for other, engine in evicting:
                log.info("evicting model", model=other, frees=mb(self.shelf.needs[other]))
                try:
                    await asyncio.to_thread(engine.close)
                except Exception:  # its memory is llama-cpp's to free now; the load goes on
                    log.exception("closing a model failed", model=other)
            started = time.monotonic()
            engine = await asyncio.to_thread(self._load, self.specs[name])
        except BaseException:
            async with self._changed:
                self.shelf.failed(name)
                self._loading.discard(name)
                self._changed.notify_all()
            await self._changed_now()
            raise
        took = time.monotonic() - started
        async with self._changed:
            self._engines[name] = engine
            self._loading.discard(name)
            self._last_info = engine.info
            self._changed.notify_all()
        self.load_times[name] = took
        if count_swap:
            self.swaps.append((name, took))
        log.info("loaded model", model=name, seconds=round(took, 2), evicted=[o for o, _ in evicting], swap=count_swap)
        await self._changed_now()
        return took

    async def _load_alone(self, name: str) -> None:
        """Load ``name`` with nothing in use (start, a pin): not counted as a swap."""
        await self._bring_in(name, self._reserve(name, ()), count_swap=False)
        self.shelf.give_back(name)

    async def _changed_now(self) -> None:
        for callback in self._watchers:
            await callback()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
