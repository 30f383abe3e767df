"""specdec on a CUDA device: the transformers runtime, the trees' masks and positions, the cache and the heads on
the model's device; `--runtime auto` takes transformers there (native and llama.cpp are CPU forwards).

The GPU tests (`needs_cuda`) skip without a GPU. The others run anywhere: a model on the `meta` device stands
in for a GPU, since an op mixing a meta tensor with a CPU one fails ("Tensor on device cpu is not on the
expected device meta"), so every tensor the transformers runtime and the heads' binding make must follow the
model's device for them to pass. (A meta tensor cannot be read, so what reads values, acceptance and drafting,
is covered by the GPU tests alone.)
"""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.drafters import REGISTRY, methods
from specdec.drafters.base import Request
from specdec.drafters.eagle import Eagle
from specdec.drafters.hydra import Hydra
from specdec.drafters.medusa import Medusa
from specdec.runtime import select_runtime
from specdec.runtime.hf import ModelRunner
from specdec.runtime.native import unsupported_reason
from specdec.sampling import SamplingParams, make_generator
from specdec.tree import DraftTree

import tiny

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"


def _on_meta(seed: int = 1):
    return tiny.model("llama", seed=seed).to("meta")


def test_transformers_runtime_keeps_every_tensor_on_the_model_device():
    """Prefill, a branching tree (its 4D mask, positions), a non-contiguous commit (the cache's gather), a
    chain after it, a causal extend and a fresh start: all on the model's device, hidden states included."""
    model = _on_meta()
    runner = ModelRunner(model)
    assert runner.device.type == "meta"
    with torch.inference_mode():
        runner.reset(64, slack=16)
        prefill = runner.prefill([1, 2, 3, 4, 5], layers=(1, 2))
        assert {t.device.type for t in prefill.hidden.values()} == {"meta"}
        tree = DraftTree([5, 6, 7, 8, 9, 10], [-1, 0, 0, 1, 2, 3])
        scores = runner.score(tree, layers=(1,))
        assert scores.logits.device.type == "meta" and scores.hidden[1].device.type == "meta"
        assert tuple(scores.logits.shape) == (len(tree), model.config.vocab_size)
        runner.commit(scores, [0, 2, 4])  # slots move: the gather's index is on the cache's device
        assert runner.length == 5 + 3
        chain = runner.score(DraftTree.chain(9, [1, 2, 3]))
        assert chain.logits.device.type == "meta"
        runner.commit(chain, [0, 1])
        assert runner.extend([4, 5]).device.type == "meta"
        keys, values = runner._cache().tensors(0)
        assert keys.device.type == "meta" and values.device.type == "meta"
        assert runner.start([1, 2, 3], 16).device.type == "meta"
        assert runner.prefill([]).logits.device.type == "meta"


def test_auto_takes_transformers_for_a_model_off_the_cpu():
    """native (and llama.cpp, which converts native's packing) refuse a model whose weights are not on the CPU,
    saying where they are; `auto` then takes transformers, for drafting, plain and hidden-state methods alike."""
    model = _on_meta()
    assert "weights are on meta" in unsupported_reason(model)
    assert unsupported_reason(tiny.model("llama", seed=1)) == ""  # the same model on the CPU runs natively
    for kwargs in ({}, {"drafts": False}, {"hidden_states": True}):
        choice = select_runtime(model, "auto", **kwargs)
        assert choice.name == "transformers"
        assert "weights are on meta" in choice.notice


@pytest.mark.parametrize("drafter", [Medusa, Hydra], ids=["medusa", "hydra"])
def test_medusa_and_hydra_heads_go_to_the_model_device(drafter):
    """Heads built (or loaded) on the CPU are moved to the target's device when the drafter binds, packed
    weights included: the hidden states they read are there."""
    cpu = tiny.model("llama", seed=1)
    heads = tiny.untrained_head(drafter.name, cpu)
    model = cpu.to("meta")
    d = drafter(head=heads, max_nodes=4)
    d.bind(model, select_runtime(model, "transformers"))
    assert d.heads is not None and d.packed is not None
    assert {p.device.type for p in d.heads.parameters()} == {"meta"}
    assert d.heads.draft_to_target.device.type == "meta"
    first = d.packed.lm_heads[0]
    assert first.t.device.type == "meta" and first.packed is None  # oneDNN's prepacking is for the CPU only


def test_eagle_head_goes_to_the_model_device_and_appends_there():
    """The EAGLE head is moved to the target's device when it binds, and appending the prompt's verified
    entries (the target's hidden states there, tokens made there, positions on the host) writes its cache
    there: the head's chain mask and rotary table follow the device."""
    cpu = tiny.model("llama", seed=1)
    head = tiny.untrained_head("eagle", cpu)
    model = cpu.to("meta")
    eagle = Eagle(head=head, max_nodes=4)
    eagle.bind(model, select_runtime(model, "transformers"))
    assert eagle.head is not None and {p.device.type for p in eagle.head.parameters()} == {"meta"}
    prompt = [1, 2, 3, 4, 5, 6]
    state = eagle.start(Request(prompt, SamplingParams(max_new_tokens=8), make_generator(0)))
    assert state.cache.k.device.type == "meta"
    runner = ModelRunner(model)
    with torch.inference_mode():
        runner.reset(32)
        prefill = runner.prefill(prompt[:-1], eagle.hidden_layers())
        eagle.prefilled(state, prefill.hidden)
    assert state.cache.length == len(prompt) - 1
    assert state.logits is not None and state.logits.device.type == "meta"
    assert state.feature is not None and state.feature.device.type == "meta"


# --- on a GPU ------------------------------------------------------------------------------------------------


def _cuda_model(seed: int = 1):
    return tiny.model("llama", seed=seed).to("cuda")


def _decoder(method: str, model, tok) -> SpecDecoder:
    """As tests/test_native.py builds them: untrained heads (on the CPU: binding moves them), a tiny draft model
    (on the target's GPU)."""
    if method == "draft":
        return SpecDecoder(model, tok, "draft", draft_model=tiny.model("llama", seed=9).to(model.device))
    if REGISTRY[method].reads.any:
        return SpecDecoder(model, tok, method, head=tiny.untrained_head(method, model))
    return SpecDecoder(model, tok, method)


@needs_cuda
@pytest.mark.parametrize("method", methods())
def test_greedy_output_equals_generate_on_cuda(tok, method):
    """Every drafter on a CUDA model: `--runtime auto` takes transformers, and the output is generate()'s."""
    model = _cuda_model()
    prompt = tok(PROMPT)["input_ids"]
    dec = _decoder(method, model, tok)
    assert dec.engine.runtime.name == "transformers"
    out = dec.generate(prompt, max_new_tokens=24)
    assert out.token_ids == tiny.hf_greedy(model, prompt, 24)
    assert out.stats.runtime == "transformers"


@needs_cuda
@pytest.mark.parametrize("method", ["pld", "draft", "medusa", "eagle"])
def test_sampled_run_completes_on_cuda(tok, method):
    """Sampling on a CUDA model (the generator on its device; draft's sampled drafts go through the general
    rule, the others through the point-mass one) completes, with tokens of the vocabulary."""
    model = _cuda_model()
    prompt = tok(PROMPT)["input_ids"]
    out = _decoder(method, model, tok).generate(
        prompt, max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.95, seed=3, ignore_eos=True
    )
    assert len(out.token_ids) == 24 and out.stats.finish_reason == "length"
    assert all(0 <= t < model.config.vocab_size for t in out.token_ids)


@needs_cuda
def test_seeded_point_mass_run_equals_seeded_vanilla_on_cuda(tok):
    """One draw per emitted token from the seeded generator on the GPU, in order: prompt lookup's seeded tokens
    are vanilla's (as on the CPU, tests/test_sampling.py)."""
    model = _cuda_model()
    prompt = tok(PROMPT)["input_ids"]
    runs = {
        m: SpecDecoder(model, tok, m).generate(
            prompt, max_new_tokens=24, temperature=1.0, seed=5, ignore_eos=True
        )
        for m in ("vanilla", "pld")
    }
    assert runs["pld"].token_ids == runs["vanilla"].token_ids
