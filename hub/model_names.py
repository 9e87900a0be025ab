"""Which model a client means, and what the swarm knows of each model. No I/O.

Clients name models the way their own defaults do (``gpt-4o-mini``, ``GPT-3.5-Turbo``,
``smollm2-135m-instruct.q4_1``). Every API of the gateway (OpenAI, Ollama, Anthropic) turns the
name it got into the swarm's own with :func:`resolve`, in this order:

1. nothing, ``""`` or ``auto``: any node (None);
2. a model some node announced, compared without regard to case;
3. an alias of the owner's (``--model-alias gpt-4o-mini=SmolLM2-135M-Instruct.Q4_1``), its key
   compared without regard to case, its target resolved as in 2;
4. with the fallback on (the default) and exactly one model in the swarm: that model. A swarm of
   one model has nothing else a client could have meant, and tools that default to
   ``gpt-4o-mini`` then just work; the answer's ``model`` says which model really answered.
   With several models a guess could silently change the answer, so the name is refused;
5. otherwise :class:`RequestFailed` with ``unknown_model``, which each API shows its own way.

While the hub's node table has not been seen yet (``served`` is None) a name goes to the hub
as it is, aliases applied, and the hub answers ``unknown_model`` if no node serves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nova_swarm.broker.contract.errors import ConfigError, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import NodeRow, NodeState, NodeTable

#: the ``model`` a client may send to let any node answer (as it may leave ``model`` out)
ANY_MODEL = "auto"
#: what every model can do; the rest comes from the nodes' announces
CHAT = "chat"

#: nodes that serve requests now, or will once their guard lets them
_SERVING = (NodeState.ONLINE, NodeState.PAUSED)


def parse_alias(text: str) -> tuple[str, str]:
    """``ALIAS=MODEL`` (as ``--model-alias`` takes it) as (alias, model); ConfigError if malformed."""
    alias, sep, target = text.partition("=")
    alias, target = alias.strip(), target.strip()
    if not sep or not alias or not target:
        raise ConfigError(f"a model alias is ALIAS=MODEL, like gpt-4o-mini=SmolLM2-135M-Instruct.Q4_1; not {text!r}")
    if len(alias) > 128 or len(target) > 128:
        raise ConfigError("model names and aliases are at most 128 characters")
    return alias, target


@dataclass(frozen=True, slots=True)
class ModelNames:
    """The owner's naming rules: aliases, and whether unknown names fall back to a lone model."""

    #: alias -> the model it stands for; keys are compared without regard to case
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fallback: bool = True

    def __post_init__(self) -> None:
        folded: dict[str, str] = {}
        for alias, target in self.aliases.items():
            key = alias.casefold()
            if key in folded and folded[key] != target:
                raise ConfigError(f"the model alias {alias!r} is given twice, for different models")
            if key == ANY_MODEL:
                raise ConfigError(f"{ANY_MODEL!r} already means any model; it cannot be an alias")
            folded[key] = target
        object.__setattr__(self, "aliases", MappingProxyType(folded))

    @classmethod
    def parse(cls, aliases: Iterable[str] = (), *, fallback: bool = True) -> ModelNames:
        """From ``--model-alias`` values (``ALIAS=MODEL``, repeatable)."""
        return cls(aliases=dict(parse_alias(text) for text in aliases), fallback=fallback)


def row_models(row: NodeRow) -> list[str]:
    """Every model a node can serve (a node that serves several lists them all; ``model`` is
    the one it used last), leaving out any it announced as too big for its RAM."""
    return [m.name for m in row.served() if m.fits]


def served_models(fleet: NodeTable | None) -> set[str] | None:
    """Every model a node ever announced (the hub's test for ``unknown_model``); None: not seen yet."""
    if fleet is None:
        return None
    return {m.name for row in fleet.nodes for m in row.models} | {row.model for row in fleet.nodes if row.model}


def resolve(requested: str | None, served: set[str] | None, names: ModelNames | None = None) -> str | None:
    """The swarm's name for the model a client asked for (None: any node); see the module docstring."""
    names = names or ModelNames()
    if requested is None:
        return None
    name = requested.strip()
    if not name or name.casefold() == ANY_MODEL:
        return None
    found = _match(name, served)
    if found is not None:
        return found
    target = names.aliases.get(name.casefold())
    if target is not None:
        if served is None:
            return target
        found = _match(target, served)
        if found is not None:
            return found
        raise RequestFailed(
            ErrorCode.UNKNOWN_MODEL,
            f"the model alias {name!r} stands for {target!r}, which no node of this swarm serves"
            f" (known: {_listing(served)})",
        )
    if served is None:
        return name
    if names.fallback and len(served) == 1:
        return next(iter(served))
    hint = "" if names.fallback else "; unknown names do not fall back (--no-model-fallback)"
    raise RequestFailed(
        ErrorCode.UNKNOWN_MODEL,
        f"the model {name!r} does not exist in this swarm (known: {_listing(served)}){hint};"
        " the owner can map it with --model-alias",
    )


def _match(name: str, served: set[str] | None) -> str | None:
    if not served:
        return None
    if name in served:
        return name
    folded = name.casefold()
    hits = sorted(model for model in served if model.casefold() == folded)
    return hits[0] if hits else None


def _listing(served: set[str]) -> str:
    return ", ".join(sorted(served)) or "none yet"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model of the swarm, from the announces of the nodes that serve it."""

    name: str
    #: nodes online or paused that serve it
    nodes: int
    #: the smallest context length among them (what a request can count on), None if unknown
    ctx: int | None
    #: the largest answer one request can get: the hub's cap, and the most any of its nodes allows
    max_tokens: int | None
    #: ``chat`` plus what any of its nodes announced (``embed``, ``tools``, ``json_schema``,
    #: ``stream``): the hub routes a request that needs one to a node that has it
    capabilities: tuple[str, ...]
    #: the nodes that serve it, and those of them that have it in memory now (a node serving
    #: several models loads one when a request needs it)
    node_ids: tuple[str, ...] = ()
    loaded_on: tuple[str, ...] = ()


def catalogue(fleet: NodeTable | None, *, max_tokens_limit: int | None = None) -> list[ModelEntry]:
    """The models served by nodes online or paused, by name; ``max_tokens_limit`` is the hub's cap."""
    rows: dict[str, list[NodeRow]] = {}
    for row in fleet.nodes if fleet else []:
        if row.state in _SERVING:
            for name in row_models(row):
                rows.setdefault(name, []).append(row)
    entries = []
    for name, group in sorted(rows.items()):
        ctxs = [r.ctx for r in group if r.ctx is not None]
        caps = [r.max_tokens for r in group if r.max_tokens is not None]
        offered = {cap for r in group for cap in r.capabilities}
        limit = max(caps) if caps else None
        if max_tokens_limit is not None:
            limit = max_tokens_limit if limit is None else min(limit, max_tokens_limit)
        entries.append(
            ModelEntry(
                name=name,
                nodes=len(group),
                ctx=min(ctxs) if ctxs else None,
                max_tokens=limit,
                capabilities=(CHAT, *sorted(offered)),
                node_ids=tuple(r.node_id for r in group),
                loaded_on=tuple(r.node_id for r in group if _loaded(r, name)),
            )
        )
    return entries


def _loaded(row: NodeRow, name: str) -> bool:
    """Whether ``row``'s node has model ``name`` in memory (a one-model node always has)."""
    return any(m.name == name and m.loaded for m in row.served())
