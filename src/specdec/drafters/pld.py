"""Prompt lookup: the continuation of an earlier occurrence of the context's last n tokens is the draft.

Matches are found through an n-gram -> positions index updated incrementally as tokens arrive (O(max_ngram)
per token), instead of rescanning the whole context every step as the reference implementation does. The
longest n-gram with a match wins; the most recent occurrences come first, and up to `max_candidates`
distinct continuations are offered as one tree (shared prefixes merged).
"""

from __future__ import annotations

from dataclasses import dataclass

import specdec.checks as checks
from specdec.drafters.base import Drafter, Request, register
from specdec.tree import DraftTree


@dataclass
class PromptLookupConfig:
    max_ngram: int = 3
    min_ngram: int = 1
    num_tokens: int = 8  # draft length per candidate
    max_candidates: int = 2  # distinct continuations merged into one tree
    max_nodes: int = 16  # drafted nodes per step: bounds the verification cost

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "num_tokens", "max_candidates", "max_nodes"):
            checks.integer(name, getattr(self, name), 1)
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"need min_ngram <= max_ngram (got {self.min_ngram} > {self.max_ngram})")


class NgramIndex:
    """n-gram (as a tuple) -> end positions of its occurrences, for n in [min_n, max_n]; append-only."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # positions [0, indexed) are in the tables

    def extend(self, tokens: list[int], upto: int) -> None:
        for end in range(self.indexed, upto):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.tables[n].setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)
        self.indexed = max(self.indexed, upto)

    def matches(self, tokens: list[int], n: int) -> list[int]:
        """End positions of earlier occurrences of the last n tokens (the query itself excluded), oldest first."""
        return self.tables[n].get(tuple(tokens[-n:]), [])


@register
class PromptLookup(Drafter[NgramIndex]):
    name = "pld"
    mergeable = True  # point masses; learns nothing from the target

    def __init__(self, config: PromptLookupConfig | None = None, **options) -> None:
        self.config = config or PromptLookupConfig(**options)

    def start(self, request: Request) -> NgramIndex:
        return NgramIndex(self.config.min_ngram, self.config.max_ngram)  # of this generation's context

    def propose(self, state: NgramIndex, context: list[int], max_depth: int) -> DraftTree:
        cfg = self.config
        # Index every position but the last: an occurrence ending there would be the query itself.
        state.extend(context, len(context) - 1)
        length = min(cfg.num_tokens, max_depth)
        candidates: list[list[int]] = []
        if length > 0:
            for n in range(min(cfg.max_ngram, len(context)), cfg.min_ngram - 1, -1):
                for end in reversed(state.matches(context, n)[-64:]):  # the most recent are the best bets
                    cont = context[end + 1 : end + 1 + length]
                    if cont not in candidates:
                        candidates.append(cont)
                    if len(candidates) >= cfg.max_candidates:
                        break
                if len(candidates) >= cfg.max_candidates:
                    break
        return DraftTree.from_sequences(context[-1], candidates, max_nodes=cfg.max_nodes)
