"""The lean draft forward reproduces transformers' Llama forward (prefill, chunks, crops, layer subsets)."""

from __future__ import annotations

import torch

from specdec.drafters.layerskip import skipping_view
from specdec.models.lean import LeanRunner
from specdec.runner import ModelRunner

import tiny


def _steps(runner, tokens: list[int]) -> list[torch.Tensor]:
    """Prefill 5, extend by 3 and 1, crop back 2 and extend by 4 (capacity 6: the cache must grow)."""
    with torch.inference_mode():
        out = [runner.start(tokens[:5], 6)[None], runner.extend(tokens[5:8]), runner.extend(tokens[8:9])]
        runner.cache.crop(7)
        out.append(runner.extend(tokens[9:13]))
    return out


def test_lean_matches_transformers_llama():
    model = tiny.model("llama", seed=3, layers=3)  # 4 query heads over 2 kv heads: grouped-query attention
    assert LeanRunner.supports(model)
    tokens = [(11 * i + 5) % model.config.vocab_size for i in range(13)]
    for got, want in zip(_steps(LeanRunner(model), tokens), _steps(ModelRunner(model), tokens), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_lean_layer_subset_matches_a_skipping_view():
    model = tiny.model("llama", seed=4, layers=4)
    tokens = [(7 * i + 2) % model.config.vocab_size for i in range(13)]
    lean = _steps(LeanRunner(model, layers=[0, 3]), tokens)
    view = skipping_view(model, [0, 3])
    with torch.inference_mode():
        full = view(torch.tensor([tokens[:9]]), use_cache=False).logits[0]
    torch.testing.assert_close(torch.cat(lean[:3]), full[[4, 5, 6, 7, 8]], rtol=0, atol=1e-9)


def test_other_architectures_keep_the_transformers_forward():
    assert not LeanRunner.supports(tiny.model("qwen2"))  # q/k/v biases
    assert not LeanRunner.supports(tiny.model("gemma"))
    model = tiny.model("llama")
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    assert not LeanRunner.supports(model)
