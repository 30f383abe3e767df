"""The drafter protocol: the only thing a new speculative method implements.

A drafter never touches verification, the KV cache of the target or the sampler. The engine calls, per
generation, `reset` once, then repeatedly `propose` (a token tree rooted at the last emitted token) and
`observe` (what the target accepted, with its logits at every node, for drafters that learn from them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from specdec.acceptance import Verdict
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree


@dataclass
class Request:
    """What a drafter may know about the generation it drafts for."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator  # the call's private RNG; sampled drafts must draw from it for seeded runs


class Drafter(ABC):
    name: ClassVar[str]
    needs_draft_model: ClassVar[bool] = False

    @classmethod
    def create(cls, draft_model=None, **options) -> Drafter:
        """Build from CLI/API options; drafters with a config dataclass take its fields as options."""
        if cls.needs_draft_model:
            return cls(draft_model, **options)
        return cls(**options)

    def bind(self, model) -> None:  # noqa: B027 - optional hook
        """Called once by the engine with the target model (for drafters that run or measure it)."""

    def reset(self, request: Request) -> None:  # noqa: B027 - optional hook
        """A new generation starts; state that should persist across calls (learned tables) may be kept."""

    @abstractmethod
    def propose(self, context: list[int], max_depth: int) -> DraftTree:
        """Guess continuations of `context` (prompt + emitted tokens; `context[-1]` is the tree root).

        `context` is the engine's own list, append-only within a generation: read it, never mutate it.
        No node may be deeper than `max_depth` (the engine trims if one is, but drafting it was wasted work).
        """

    def observe(self, tree: DraftTree, verdict: Verdict, logits: torch.Tensor) -> None:  # noqa: B027
        """The target scored `tree` (raw logits [N, V], row i for node i) and accepted `verdict`."""

    def release(self) -> None:  # noqa: B027
        """The generation ended (finished, failed or cancelled): drop per-generation memory such as caches."""


REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    REGISTRY[cls.name] = cls
    return cls
