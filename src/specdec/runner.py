"""Running a model inside the loop: prefill once, score a token tree in one forward, keep the accepted path.

The tree is passed to the unmodified Hugging Face model as an explicit 4D additive attention mask (past
fully visible, tree nodes see their ancestors) and depth-based position ids, so any causal LM whose attention
honours a 4D mask works without forking its modeling code. `check_tree_attention` proves that on the actual
model before it is trusted.
"""

from __future__ import annotations

import torch

from specdec.cache import KVCache
from specdec.errors import UnsupportedModelError
from specdec.tree import DraftTree


def _num_layers(model) -> int:
    config = model.config.get_text_config(decoder=True)
    return config.num_hidden_layers


def _check_layer_types(model, max_length: int) -> None:
    config = model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or []
    others = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if others:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {', '.join(others)} layers; specdec verifies trees only for attention layers"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = "sliding_attention" in types or (window and getattr(config, "use_sliding_window", True))
    if uses_window and window and max_length > window:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses sliding-window attention (window {window}) and this request needs "
            f"{max_length} positions; specdec's tree mask covers full attention only, so it refuses rather than "
            "produce output that differs from the model's own decoding"
        )


class ModelRunner:
    """A causal LM plus its preallocated cache, for one generation at a time (the target, or a draft model)."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: KVCache | None = None
        self.forwards = 0

    @property
    def max_positions(self) -> int | None:
        config = self.model.config.get_text_config(decoder=True)
        return getattr(config, "max_position_embeddings", None)

    def start(self, prompt_ids: list[int], capacity: int) -> torch.Tensor:
        """Prefill the prompt into a fresh cache; returns the logits [V] for the token after it."""
        _check_layer_types(self.model, capacity)
        self.cache = KVCache(_num_layers(self.model), capacity)
        self.forwards = 0
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None, logits_to_keep=1)[-1]

    def score(self, tree: DraftTree) -> torch.Tensor:
        """One forward over the tree nodes after the committed cache; returns logits [N, V], row i for node i."""
        past = self.cache.length
        n = len(tree)
        ids = torch.tensor([tree.tokens], dtype=torch.long, device=self.device)
        positions = torch.tensor([[past + d for d in tree.depths]], dtype=torch.long, device=self.device)
        # [1, 1, N, past + N]: 0 where attention is allowed, dtype-min elsewhere
        mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=self.device)
        mask[0, 0, :, past:].masked_fill_(~tree.ancestor_mask().to(self.device), torch.finfo(self.dtype).min)
        return self._forward(ids, positions, mask)

    def commit(self, tree_start: int, accepted_nodes: list[int]) -> None:
        """Keep the KV of the accepted nodes (a root-to-node path: ascending indices) and drop the rest."""
        self.cache.keep(tree_start, accepted_nodes)

    def _forward(self, ids, positions, mask, logits_to_keep: int = 0) -> torch.Tensor:
        if positions is None:
            past = self.cache.length
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
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.forwards += 1
        return out.logits[0]

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally (a chunk after the cache); returns their logits [T, V]."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None)


def check_tree_attention(model) -> None:
    """Raise UnsupportedModelError unless scoring a branching tree matches plain causal decoding.

    A model that ignores (or rewrites) a custom 4D mask would silently verify the wrong sequences; this runs
    both ways on a few tokens and compares the logits, once per model.
    """
    if getattr(model, "_specdec_tree_ok", False):
        return
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = [1 % vocab, 2 % vocab, 3 % vocab]
    a, b, c = 4 % vocab, 5 % vocab, 6 % vocab
    tree = DraftTree([a, b, c, b], [-1, 0, 0, 2])  # root a; children b and c; b under c
    target = ModelRunner(model)
    with torch.inference_mode():
        target.start(prompt, 16)
        got = target.score(tree).float()
        ref = ModelRunner(model)
        ref.start(prompt, 16)
        ab = ref.extend([a, b]).float()
        ref.cache.crop(len(prompt))
        acb = ref.extend([a, c, b]).float()
    expected = torch.stack([ab[0], ab[1], acb[1], acb[2]])
    scale = expected.abs().max().clamp_min(1.0)
    if not torch.allclose(got, expected, atol=2e-2 * scale.item(), rtol=0):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not honour a custom 4D attention mask (tree scoring differs from "
            "causal decoding), so specdec cannot verify token trees with it"
        )
    model._specdec_tree_ok = True
