"""Running a model inside the loop: prefill once, score a token tree in one forward, keep the accepted path.

The tree is passed to the unmodified Hugging Face model as an explicit 4D additive attention mask (past
fully visible, tree nodes see their ancestors) and depth-based position ids, so any causal LM whose attention
honours a 4D mask works without forking its modeling code. `specdec.runtime.check.check_tree_attention`
proves that on the actual model before it is trusted.

Hidden states for drafters that read them (EAGLE, Medusa, ...) come from the model's own
`output_hidden_states`, asked for only when some layer is requested, so the model's code is never forked and
drafters that read none pay nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from specdec.models.support import check_layer_types
from specdec.runtime.base import Scores
from specdec.runtime.kvcache import KVCache
from specdec.tree import DraftTree


def cache_keyword(model) -> str:
    """The forward's name for the cache argument: transformers 5.24 renamed `past_key_values` to `cache` (the
    old name still works there, with a FutureWarning, until 5.40)."""
    for cls in type(model).__mro__:  # a wrapper's forward(*args, **kwargs) names neither: ask its base
        forward = cls.__dict__.get("forward")
        params = inspect.signature(forward).parameters if callable(forward) else {}
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


def _num_layers(model) -> int:
    config = model.config.get_text_config(decoder=True)
    return config.num_hidden_layers


class ModelRunner:
    """A causal LM plus its preallocated cache, for one generation at a time (the target, or a draft model):
    the `transformers` runtime (`specdec.runtime.base.Runtime`)."""

    name = "transformers"

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: KVCache | None = None
        self.cache_keyword = cache_keyword(model)
        self.forwards = 0
        self.cached_tokens = 0  # no prefix cache here

    @property
    def max_positions(self) -> int | None:
        config = self.model.config.get_text_config(decoder=True)
        return getattr(config, "max_position_embeddings", None)

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        """Prefill the prompt into a fresh cache (as `reset`); returns the logits [V] for the token after it
        (drafters' own models use this; the engine's target uses `reset` and `prefill`)."""
        self.reset(positions, slack)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None, logits_to_keep=1).logits[-1]

    def reset(self, positions: int, slack: int = 0) -> None:
        """A fresh, empty cache for a generation that reaches `positions` positions, with `slack` more slots
        for tree nodes scored past the committed length (it grows if a generation needs more)."""
        check_layer_types(self.model, positions)
        self.cache = KVCache(_num_layers(self.model), positions + slack)
        self.forwards = 0

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """Run `token_ids` causally into the cache. Only the hidden states are kept (logits of the last row
        only, which the engine does not use: the first new token comes from the first tree step)."""
        if not token_ids:
            return Scores(torch.empty(0, device=self.device), {})
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None, logits_to_keep=1, layers=layers)

    @property
    def length(self) -> int:
        """Committed positions in the cache."""
        return 0 if self.cache is None else self.cache.length

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        """One forward over the tree nodes after the committed cache; logits [N, V], row i for node i."""
        past = self._cache().length
        n = len(tree)
        ids = torch.tensor([tree.tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([[past + d for d in tree.depths]], dtype=torch.long, device=self.device)
        # [1, 1, N, past + N]: 0 where attention is allowed, dtype-min elsewhere
        mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=self.device)
        mask[0, 0, :, past:].masked_fill_(~tree.ancestor_mask().to(self.device), torch.finfo(self.dtype).min)
        scores = self._forward(ids, positions, mask, layers=layers)
        return Scores(scores.logits, scores.hidden, past, tree)

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        """Keep the KV of the accepted nodes (a root-to-node path: ascending indices) and drop the rest."""
        self._cache().keep(scores.start, accepted_nodes)

    def crop(self, length: int) -> None:
        self._cache().crop(length)

    def keep_prefix(self) -> None:
        """No prefix cache on this runtime (`specdec.runtime.prefix` serves the native one)."""

    def free(self) -> None:
        self.cache = None

    def _cache(self) -> KVCache:
        assert self.cache is not None, "reset() or start() comes first"
        return self.cache

    def _forward(self, ids, positions, mask, logits_to_keep: int = 0, layers: Sequence[int] = ()) -> Scores:
        if positions is None:
            past = self._cache().length
            positions = torch.arange(past, past + ids.shape[1], device=self.device)[None]
            if past:
                n = ids.shape[1]
                mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=self.device)
                causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
                mask[0, 0, :, past:].masked_fill_(~causal, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            output_hidden_states=bool(layers),
            **{self.cache_keyword: self.cache},
        )
        self.forwards += 1
        hidden = {i: out.hidden_states[i][0] for i in layers} if layers else {}
        return Scores(out.logits[0], hidden)

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally (a chunk after the cache); returns their logits [T, V]."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None).logits
