"""The hub: fans prompts out to nodes, collects and ranks replies, keeps the registry."""

from .client import SwarmClient
from .config import HubConfig
from .hub import Hub
from .intake import Limits
from .rerank import Reranker, RuleReranker

__all__ = ["Hub", "HubConfig", "Limits", "Reranker", "RuleReranker", "SwarmClient"]
