"""Retrieved context for prompts, with the swarm's own nodes as the embedder.

The hub answers a chat request with snippets of a folder of documents (``--retrieval DIR``,
``retrieval.py``) in a system message. The index is built on first use, by when nodes that can
embed are online; the embeddings come from those nodes, asked over the broker as any client
would ask, by one ``SwarmClient`` this object owns (``aclose`` ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AsyncExitStack

import structlog

from nova_swarm.broker.contract.errors import ConnectionLost, ErrorCode, RequestFailed
from nova_swarm.broker.contract.messages import ChatMessage, PromptRequest
from nova_swarm.broker.link.base import Links

from . import retrieval
from .client import SwarmClient
from .config import HubConfig
from .registry import Registry

log = structlog.get_logger("nova_swarm.hub")


class Context:
    def __init__(
        self, config: retrieval.RetrievalConfig, *, links: Links, swarm: str, registry: Registry, timeout_s: float
    ) -> None:
        self.config = config
        self._links = links
        self._swarm = swarm
        self._registry = registry
        self._timeout_s = timeout_s
        self._index: retrieval.Retriever | None = None
        self._lock = asyncio.Lock()
        self._embedder: SwarmClient | None = None
        self._embed_model: str | None = None
        self._exits = AsyncExitStack()

    @staticmethod
    def wanted(request: PromptRequest) -> bool:
        """Chat requests get context unless they opt out (``retrieval: false``)."""
        return request.kind == "chat" and request.retrieval is not False

    async def add(self, messages: list[ChatMessage], *, private: bool) -> list[ChatMessage]:
        """``messages`` with the snippets that match them. A private request's query is ranked
        on the hub (TF-IDF), never sent out to be embedded."""
        retriever = await self._retriever()
        snippets = await retriever.search(retrieval.query_of(messages), private=private)
        log.info("retrieved context", snippets=len(snippets), mode=retriever.mode)
        return retrieval.with_context(messages, snippets)

    @property
    def index(self) -> retrieval.Retriever | None:
        """The document index, once the first request built it."""
        return self._index

    async def aclose(self) -> None:
        await self._exits.aclose()

    async def _retriever(self) -> retrieval.Retriever:
        async with self._lock:
            if self._index is None:
                self._index = await retrieval.Retriever.build(self.config, self._embed)
                log.info("indexed documents", snippets=self._index.size, mode=self._index.mode)
            return self._index

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        if self._embed_model is None:
            # One model for the whole index: vectors of two models do not compare.
            able = self._registry.eligible(model=None, exclude=frozenset(), now=time.time(), needs=frozenset({"embed"}))
            models = sorted(n.announce.model.name for n in able if n.announce is not None)
            if not models:
                raise RequestFailed(ErrorCode.UNSUPPORTED, "no online node can embed")
            self._embed_model = models[0]
        if self._embedder is None:
            self._embedder = await self._exits.enter_async_context(SwarmClient(links=self._links, swarm=self._swarm))
        try:
            answer = await self._embedder.ask(
                PromptRequest(kind="embed", input=texts, model=self._embed_model), timeout=self._timeout_s
            )
        except ConnectionLost:
            # The broker went away under it: the next call connects afresh (the stack holds
            # only this client).
            self._embedder = None
            with contextlib.suppress(ConnectionLost):
                await self._exits.aclose()
            raise
        return answer.embeddings or []  # the retriever checks the count and the sizes


def for_hub(config: HubConfig, links: Links, registry: Registry) -> Context | None:
    """The hub's retrieval, when ``config.retrieval`` turns it on (None when it is off). The
    document index and the swarm client that asks nodes for embeddings are made on first use."""
    if config.retrieval is None:
        return None
    return Context(
        config.retrieval, links=links, swarm=config.swarm, registry=registry, timeout_s=config.default_timeout_s
    )
