"""Which models specdec can verify trees with exactly, decided before any generation.

A model is used only when its tree scoring provably equals its own causal decoding: attention layers only
(state-space and hybrid layers keep a recurrent state that a token tree cannot branch), full attention within
the request's length, and a 4D attention mask that the model honours (checked on the real model, once).
Everything else is refused with one line naming the class and the reason.
"""

from __future__ import annotations

import torch

from specdec.errors import UnsupportedModelError
from specdec.tree import DraftTree


def check_layer_types(model, max_length: int) -> None:
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
    from specdec.runner import ModelRunner

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
