"""The medusa drafter (and hydra, its subclass) through the engine: greedy equality with generate(), template learning, bad heads.
(Its sampled distribution is checked with every other method in test_sampling.py.)"""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.drafters.hydra import Hydra
from specdec.drafters.medusa import Medusa
from specdec.errors import InputError
from specdec.heads.medusa import PackedMedusa, save_medusa

import tiny
from tiny import random_medusa


@pytest.mark.slow
@pytest.mark.parametrize("method", ["medusa", "hydra"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("options", [{}, {"max_nodes": 10, "width": 3}])
def test_medusa_and_hydra_equal_generate(tok, method, arch, options):
    model = tiny.model(arch, seed=1)
    dec = SpecDecoder(model, tok, method, head=tiny.untrained_head(method, model), **options)
    for prompt in ([5], [5, 9, 14, 3, 77, 1], list(range(40, 70))):
        out = dec.generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert out.token_ids == tiny.hf_greedy(model, prompt, 20)


@pytest.mark.parametrize("cls", [Medusa, Hydra])
def test_medusa_and_hydra_learn_which_ranks_are_right(tok, cls):
    """Vocabulary 8 and 8 ranks per head: the first head's truth is always among its candidates, so its
    measured rank acceptance sums to one and the template follows it."""
    model = tiny.model("llama", seed=2, vocab_size=8, layers=2, eos=99)  # an EOS it never emits
    drafter = cls(head=tiny.untrained_head(cls.name, model), max_nodes=12, regrow_every=4)
    dec = SpecDecoder(model, tok, drafter)
    prompt = [1, 2, 3, 1, 2]
    out = dec.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert out.token_ids == tiny.hf_greedy(model, prompt, 40)
    # drafts are accepted: the template's ranks are the right ones
    assert out.stats.mean_accepted_tokens > 1.2
    # every step but the last (one token left: nothing to draft) recorded head 0's truth
    assert drafter.trials[0] == out.stats.target_forwards - 1 and drafter.hits[0].sum() == drafter.trials[0]
    measured = drafter.acceptance()[0]
    best = int(drafter.hits[0].argmax())
    assert measured[best] == max(measured)
    assert drafter.template is not None and best in drafter.template.ranks[1:]
    assert drafter.trials[1] >= 1  # accepted depth-1 nodes had their children ranked too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_heads_compute_what_the_heads_compute(dtype):
    """Drafting's packed heads against the module every head is trained as: one hidden state (what drafting
    passes) and a few rows."""
    model = tiny.model("llama", seed=3, dtype=dtype)
    heads = random_medusa(model, 3).to(dtype)
    packed = PackedMedusa(heads)
    assert (packed.lm_heads[0].packed is not None) == (dtype == torch.float32)
    g = torch.Generator().manual_seed(1)
    for shape in [(model.config.hidden_size,), (3, model.config.hidden_size)]:
        hidden = torch.randn(shape, generator=g).to(dtype)
        with torch.inference_mode():
            want = heads(hidden)
        got = packed(hidden)
        assert len(got) == len(want) == 3
        for g_k, w_k in zip(got, want, strict=True):
            torch.testing.assert_close(g_k, w_k.reshape(-1, w_k.shape[-1]))


def test_medusa_refuses_heads_for_another_model(tok, tmp_path):
    model = tiny.model("llama", seed=1)
    other = tiny.model("llama", seed=1, hidden=64)
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "medusa", head=random_medusa(other))
    save_medusa(random_medusa(other), tmp_path / "heads", dtype=torch.float32)
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "medusa", head=str(tmp_path / "heads"))
    for bad in ({"width": 0}, {"max_nodes": "lots"}, {"regrow_every": 0}):
        with pytest.raises(InputError):
            SpecDecoder(model, tok, "medusa", head=random_medusa(model), **bad)
