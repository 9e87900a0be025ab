"""Scoring ``best_of_n`` candidates. Pluggable through the ``nova_swarm.rerankers`` entry point.

The built-in ``rules`` reranker needs no model: it rewards answers that share words with the
prompt (relevance) and with the other candidates (consensus: independent samples that agree
are more often right), and penalises empty, cut-off and repetitive answers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from nova_swarm.broker.contract.errors import ConfigError

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class Candidate:
    text: str
    finish_reason: str | None


class Reranker(Protocol):
    def score(self, prompt: str, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate; higher is better."""
        ...


def _bag(text: str) -> Counter[str]:
    return Counter(_WORD.findall(text.lower()))


def cosine(a: Counter[str], b: Counter[str]) -> float:
    if not a or not b:
        return 0.0
    dot = sum(count * b[word] for word, count in a.items())
    return dot / (math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values())))


def repetition(text: str) -> float:
    """Share of repeated word trigrams: 0 for fresh text, near 1 for a loop."""
    words = _WORD.findall(text.lower())
    grams = list(zip(words, words[1:], words[2:], strict=False))
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class RuleReranker:
    relevance_weight = 0.4
    consensus_weight = 0.4

    def score(self, prompt: str, candidates: Sequence[Candidate]) -> list[float]:
        bags = [_bag(c.text) for c in candidates]
        prompt_bag = _bag(prompt)
        scores = []
        for i, cand in enumerate(candidates):
            if not cand.text.strip():
                scores.append(-1.0)
                continue
            others = [cosine(bags[i], bags[j]) for j in range(len(candidates)) if j != i]
            score = self.relevance_weight * cosine(bags[i], prompt_bag)
            score += self.consensus_weight * (sum(others) / len(others) if others else 0.0)
            score -= 0.5 * repetition(cand.text)
            if cand.finish_reason == "length":
                score -= 0.1  # cut off mid-thought
            if len(bags[i]) < 2:
                score -= 0.1
            scores.append(round(score, 4))
        return scores


def load_reranker(name: str) -> Reranker:
    found = {ep.name: ep for ep in entry_points(group="nova_swarm.rerankers")}
    if name not in found:
        raise ConfigError(f"unknown reranker {name!r}; installed: {', '.join(sorted(found)) or 'none'}")
    reranker: Reranker = found[name].load()()
    return reranker
