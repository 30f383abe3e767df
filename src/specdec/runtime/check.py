"""Before a runtime verifies anything, it must compute transformers' function: `check_tree_attention` proves
that the transformers model itself scores a tree as it decodes causally, `check_runtime` that another runtime
gives the transformers model's logits.

`check_runtime` runs the same sample inputs through the candidate runtime and through the transformers model
causally, token path by token path, and refuses the runtime when any logit differs by more than a float
rounding bound: a prefill, a branching tree whose nodes are stored far from their depth, a commit of a
non-contiguous accepted path (which moves cache slots), and a second tree scored after that commit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.errors import UnsupportedModelError
from specdec.runtime.hf import ModelRunner
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
    out = []
    for path in paths:
        ref.crop(len(prompt))
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
        first = runtime.score(DraftTree([prompt[-1]], [-1]))
        checks.append((first.logits.float(), _reference(model, prompt[:-1], [[prompt[-1]]])[0]))
        runtime.commit(first, [0])
        scores = runtime.score(tree)
        got = scores.logits.float()
        for nodes, ref in zip(paths, _reference(model, prompt, list(paths.values())), strict=True):
            checks.append((got[list(nodes)], ref))
        runtime.commit(scores, list(kept))
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


def _tree_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance between a tree forward and a causal forward, where only the order of summation
    differs. Some models compute parts in float32 whatever their dtype (Gemma2's softmax), so float64 gets
    float32's bound; a wrong position or mask moves logits by far more (an ALiBi bias by index: ~5e-3)."""
    return 1e-4 if dtype in (torch.float64, torch.float32) else 2e-2  # float16 / bfloat16


def _logits(scores) -> torch.Tensor:
    return getattr(scores, "logits", scores).float()


def tree_attention_ok(model) -> bool:
    """`check_tree_attention` as a question (the refusal itself comes where the model is first used)."""
    try:
        check_tree_attention(model)
    except UnsupportedModelError:
        return False
    return True


def check_tree_attention(model) -> None:
    """Raise UnsupportedModelError unless scoring a branching tree matches plain causal decoding.

    A model that ignores (or rewrites) a custom 4D mask or the position ids would silently verify the wrong
    sequences; this scores one small tree, whose nodes are stored far from their depth (so a position taken
    from the storage index shows), and compares every node with a causal forward over its path, once per model.
    """
    if getattr(model, "_specdec_tree_ok", False):
        return
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = [1 % vocab, 2 % vocab, 3 % vocab]
    a, b, c, d, e, f = (t % vocab for t in (4, 5, 6, 7, 8, 9))
    # root a; children b, c, d, e; f under e; b under f; c under b (node 1)
    tree = DraftTree([a, b, c, d, e, f, b, c], [-1, 0, 0, 0, 0, 4, 5, 1])
    paths = [([a, e, f, b], [0, 4, 5, 6]), ([a, b, c], [0, 1, 7]), ([a, c], [0, 2]), ([a, d], [0, 3])]
    try:
        with torch.inference_mode():
            target = ModelRunner(model)
            target.start(prompt, len(prompt) + len(tree))
            got = _logits(target.score(tree))
            ref = ModelRunner(model)
            ref.start(prompt, len(prompt) + len(tree))
            expected = torch.empty_like(got)
            for path, nodes in paths:
                ref.crop(len(prompt))
                expected[nodes] = _logits(ref.extend(path))
    except UnsupportedModelError:
        raise
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise UnsupportedModelError(
            f"{type(model).__name__} fails when scoring a token tree with a 4D attention mask "
            f"({type(err).__name__}: {first}), so specdec cannot verify token trees with it"
        ) from err
    scale = expected.abs().max().clamp_min(1.0).item()
    if not torch.allclose(
        got, expected, atol=_tree_tolerance(next(model.parameters()).dtype) * scale, rtol=0
    ):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not honour a custom 4D attention mask and position ids (tree scoring "
            "differs from causal decoding), so specdec cannot verify token trees with it"
        )
    model._specdec_tree_ok = True
