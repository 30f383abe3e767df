"""The one protocol every target runtime implements, and what its forwards return.

    reset(positions, slack) -> prefill(prompt) -> [ score(tree) -> commit(scores, accepted path) ]* -> free()

plus the causal surface that timing and draft models use on the same object:

    start(prompt, positions, slack) -> [V] logits for the next token; extend(tokens) -> [T, V]; crop(length)

A runtime holds ONE generation's cache (a `RuntimeChoice.new()` makes another). It may be the unmodified
transformers model (`specdec.runtime.hf`), specdec's own forward (`native`), or llama.cpp over a GGUF file
(`llamacpp`): nothing in the engine, the cost model or the draft models knows which. `score` returns
everything `commit` needs (where the tree's entries start in the cache, the tree, and any runtime-specific
handle), so the two depend on no hidden state and call order is the caller's to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from specdec.tree import DraftTree


@dataclass(frozen=True)
class Scores:
    """What one forward returns."""

    logits: torch.Tensor  # [N, V], row i for the i-th token of the forward (or tree node i)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer id -> [N, H], only those asked for
    start: int = 0  # committed positions before this forward: where its tokens' cache entries begin
    tree: DraftTree | None = None  # the tree scored (None: a causal forward)
    handle: Any = None  # what this runtime's `commit` needs besides (llama.cpp: each leaf's sequence id)


class Runtime(Protocol):
    """One generation's target: its cache and the forwards over it."""

    name: str
    forwards: int  # forwards since `reset`
    cached_tokens: int  # prompt tokens the last `prefill` restored from a prefix cache (0: none, or no cache)

    @property
    def length(self) -> int: ...  # committed positions in the cache

    @property
    def max_positions(self) -> int | None: ...  # the model's context (None: unbounded)

    def reset(self, positions: int, slack: int = 0) -> None:
        """A fresh, empty cache for a generation reaching `positions` positions, `slack` more for trees."""
        ...

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """Run the tokens causally into the cache; hidden states of `layers` for every one of them."""
        ...

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        """One forward over the tree's nodes after the committed cache: logits [N, V], row i for node i."""
        ...

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        """Keep the cache entries of the accepted root-to-node path of the tree `scores` came from."""
        ...

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        """`reset`, then the prompt causally: the logits [V] for the token after it."""
        ...

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally after the cache; their logits [T, V]."""
        ...

    def crop(self, length: int) -> None:
        """Drop every cache entry from position `length` on."""
        ...

    def keep_prefix(self) -> None:
        """The generation ended: offer its committed tokens' cache entries to the prefix cache, if any
        (`specdec.runtime.prefix`; a no-op for a runtime without one)."""
        ...

    def free(self) -> None: ...


__all__ = ["Runtime", "Scores"]
