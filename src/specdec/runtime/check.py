"""Before a runtime other than transformers verifies anything, it must compute transformers' function.

`check_runtime` runs the same sample inputs through the candidate runtime and through the transformers model
causally, token path by token path, and refuses the runtime when any logit differs by more than a float
rounding bound: a prefill, a branching tree whose nodes are stored far from their depth, a commit of a
non-contiguous accepted path (which moves cache slots), and a second tree scored after that commit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.errors import UnsupportedModelError
from specdec.runner import ModelRunner
from specdec.tree import DraftTree


def tolerance(dtype: torch.dtype) -> float:
    """Largest allowed |logit difference| relative to the largest |logit|. Only the order of float operations
    differs between two correct forwards (fused products, one RMSNorm op): ~1e-6 relative in float32, and in
    float64 too where transformers itself rounds to float32 (its RMSNorm does); a wrong position, mask or
    cache slot moves logits by orders of magnitude more (tested with a perturbed weight)."""
    return {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 3e-2)


def _reference(model, prompt: list[int], paths: list[list[int]]) -> list[torch.Tensor]:
    """Transformers' logits [len(path), V] for each path decoded causally after the prompt."""
    ref = ModelRunner(model)
    ref.start(prompt, len(prompt) + max(len(p) for p in paths))
    assert ref.cache is not None  # start() made it
    out = []
    for path in paths:
        ref.cache.crop(len(prompt))
        out.append(ref.extend(path).float())
    return out


def check_runtime(model, new_runtime: Callable, name: str = "native") -> None:
    """Raise UnsupportedModelError unless the runtime's logits match transformers' within `tolerance`."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = [(5 * i + 3) % vocab for i in range(9)]
    a, b, c, d, e, f = ((11 * i + 7) % vocab for i in range(6))
    # root a; children b, c, d, e; f under e; b under f; c under b (node 1)
    tree = DraftTree([a, b, c, d, e, f, b, c], [-1, 0, 0, 0, 0, 4, 5, 1])
    paths = {(0, 4, 5, 6): [a, e, f, b], (0, 1, 7): [a, b, c], (0, 2): [a, c], (0, 3): [a, d]}
    kept = (0, 4, 5)  # a non-contiguous accepted path: its cache slots move on commit
    second = DraftTree([b, c, d, c], [-1, 0, 0, 1])
    second_paths = {(0, 1, 3): [b, c, c], (0, 2): [b, d]}
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        runtime = new_runtime()
        runtime.reset(len(prompt) + 16, slack=8)
        runtime.prefill(prompt[:-1])
        checks: list[tuple[torch.Tensor, torch.Tensor]] = []
        first = runtime.score(DraftTree([prompt[-1]], [-1])).logits.float()
        checks.append((first, _reference(model, prompt[:-1], [[prompt[-1]]])[0]))
        runtime.commit(len(prompt) - 1, [0])
        got = runtime.score(tree).logits.float()
        for nodes, ref in zip(paths, _reference(model, prompt, list(paths.values())), strict=True):
            checks.append((got[list(nodes)], ref))
        runtime.commit(len(prompt), list(kept))
        got = runtime.score(second).logits.float()
        after = prompt + [tree.tokens[i] for i in kept]
        for nodes, ref in zip(
            second_paths, _reference(model, after, list(second_paths.values())), strict=True
        ):
            checks.append((got[list(nodes)], ref))
        runtime.free()
    worst = max(float((g - r).abs().max() / r.abs().max().clamp_min(1.0)) for g, r in checks)
    if worst > tolerance(dtype):
        raise UnsupportedModelError(
            f"the {name} runtime's logits differ from transformers' on {type(model).__name__} by {worst:.2e} "
            f"(relative; allowed {tolerance(dtype):.0e} in {str(dtype).removeprefix('torch.')}), so it is "
            "not used"
        )
