"""The hub: fans prompts out to nodes, collects and ranks replies, keeps the registry.

The names below load on first use (PEP 562), so a program that only asks the swarm
(``from nova_swarm.hub.client import SwarmClient``) does not load the hub's own machinery:
its scheduler, journal, schema checks and rerankers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import SwarmClient
    from .config import HubConfig
    from .hub import Hub
    from .intake import Limits
    from .rerank import Reranker, RuleReranker

_HOME = {
    "Hub": ".hub",
    "HubConfig": ".config",
    "Limits": ".intake",
    "Reranker": ".rerank",
    "RuleReranker": ".rerank",
    "SwarmClient": ".client",
}

__all__ = ["Hub", "HubConfig", "Limits", "Reranker", "RuleReranker", "SwarmClient"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
