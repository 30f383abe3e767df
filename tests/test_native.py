"""The native runtime computes transformers' function: logits for chains and branching trees, after cache
commits, for every family it runs; greedy output through it equals generate() for every drafter; models it
cannot run fall back to transformers with a notice; a runtime that disagrees is refused at load."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from specdec import SpecDecoder
from specdec.drafters import REGISTRY, methods
from specdec.errors import UnsupportedModelError
from specdec.runtime import select_runtime
from specdec.runtime.check import check_runtime
from specdec.runtime.hf import ModelRunner
from specdec.runtime.native import NativeModel, NativeRunner, unsupported_reason
from specdec.runtime.skipview import skipping_view
from specdec.tree import DraftTree

import tiny

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
# transformers normalises in float32 even in float64 models; Qwen3's per-head q/k norms sum their squares in
# another order here (rotary-pair order), which float32 rounding shows at ~1e-7
ATOL = {"qwen3": 1e-6}


def _model(arch: str, seed: int = 3, layers: int = 3, dtype=torch.float64):
    """A tiny model whose norm weights are random too (all-ones norms would hide a wrongly ordered q/k norm)."""
    m = tiny.model(arch, seed=seed, layers=layers, dtype=dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return m


def _steps(runner, tokens: list[int]) -> list[torch.Tensor]:
    """Prefill 5, extend by 3 and 1, crop back 2 and extend by 4 (capacity 6: the cache must grow)."""
    with torch.inference_mode():
        out = [runner.start(tokens[:5], 6)[None], runner.extend(tokens[5:8]), runner.extend(tokens[8:9])]
        runner.cache.crop(7)
        out.append(runner.extend(tokens[9:13]))
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_chains_match_transformers(arch):
    model = _model(arch)  # 4 query heads over 2 kv heads: grouped-query attention
    assert NativeModel.supports(model), unsupported_reason(model)
    tokens = [(11 * i + 5) % model.config.vocab_size for i in range(13)]
    native = _steps(NativeRunner(NativeModel(model)), tokens)
    for got, want in zip(native, _steps(ModelRunner(model), tokens), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL.get(arch, 1e-9))


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [(a, torch.float64) for a in FAMILIES] + [("llama", torch.float32), ("qwen2", torch.float32)],
)
def test_trees_after_commits_match_transformers(arch, dtype):
    """Score a branching tree, keep a non-contiguous path, score another tree: every node's logits and the
    requested hidden states equal transformers' over the same tree (its 4D-mask forward). In float32 the
    products of 2+ tokens go through oneDNN's prepacked weights (Qwen2: with the q/k/v bias), a different
    rounding: equal within float32's."""
    model = _model(arch, seed=5, dtype=dtype)
    assert (NativeModel(model).layers[0].packed is not None) == (dtype == torch.float32)
    atol = ATOL.get(arch, 1e-9) if dtype == torch.float64 else 1e-4
    vocab = model.config.vocab_size
    prompt = [(7 * i + 2) % vocab for i in range(10)]
    trees = [
        DraftTree([5, 6, 7, 8, 9, 6], [-1, 0, 0, 1, 3, 2]),  # keep nodes 0, 1, 3: slots move on commit
        DraftTree([4, 3, 2, 1], [-1, 0, 1, 0]),
    ]
    layers = (0, 2, 3)  # an input of a layer, and the final normed output (id = num_hidden_layers)
    runtimes = [NativeRunner(NativeModel(model)), ModelRunner(model)]
    results = []
    with torch.inference_mode():
        for runtime in runtimes:
            runtime.reset(32, slack=8)
            out = [runtime.prefill(prompt, layers).hidden[0]]
            for tree, keep in zip(trees, ([0, 1, 3], [0, 1]), strict=True):
                scores = runtime.score(tree, layers)
                out += [scores.logits, *(scores.hidden[i] for i in layers)]
                runtime.commit(scores, keep)
            results.append(out)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_layer_subset_matches_a_skipping_view():
    model = tiny.model("llama", seed=4, layers=4)
    tokens = [(7 * i + 2) % model.config.vocab_size for i in range(13)]
    native = _steps(NativeRunner(NativeModel(model, layers=[0, 3])), tokens)
    view = skipping_view(model, [0, 3])
    with torch.inference_mode():
        full = view(torch.tensor([tokens[:9]]), use_cache=False).logits[0]
    torch.testing.assert_close(torch.cat(native[:3]), full[[4, 5, 6, 7, 8]], rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_load_check_accepts_float32_and_bfloat16(dtype):
    model = _model("llama", dtype=dtype)
    assert select_runtime(model, "native").name == "native"


def test_a_runtime_that_disagrees_is_refused():
    """One packed weight off by 1%: the load check sees it and auto keeps transformers."""
    model = _model("qwen2", seed=6)
    native = NativeModel(model)
    native.layers[1].wgu_t.mul_(1.01)
    with pytest.raises(UnsupportedModelError, match="differ from transformers"):
        check_runtime(model, lambda: NativeRunner(native))
    check_runtime(model, lambda: NativeRunner(NativeModel(model)))  # the unperturbed one passes


def test_unsupported_models_fall_back_with_a_notice(tok, caplog):
    gemma = tiny.model("gemma")
    with pytest.raises(UnsupportedModelError, match="native runtime does not run GemmaForCausalLM"):
        select_runtime(gemma, "native")
    with caplog.at_level(logging.WARNING, logger="specdec.runtime"):
        dec = SpecDecoder(gemma, tok, method="pld")
    assert dec.engine.runtime.name == "transformers"
    assert [r.getMessage() for r in caplog.records] == [
        "the native runtime does not run GemmaForCausalLM: model type 'gemma' is not one of llama, mistral, "
        "qwen2, qwen3; using the transformers runtime"
    ]
    assert dec.generate([5, 6, 7], max_new_tokens=4).stats.runtime == "transformers"
    llama = tiny.model("llama")
    llama.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    assert "rope type 'dynamic'" in unsupported_reason(llama)


def _decoder(method: str, model, tok, runtime: str) -> SpecDecoder:
    if method == "draft":
        return SpecDecoder(model, tok, "draft", draft_model=tiny.model("llama", seed=9), runtime=runtime)
    if REGISTRY[method].reads.any:
        return SpecDecoder(model, tok, method, head=tiny.untrained_head(method, model), runtime=runtime)
    return SpecDecoder(model, tok, method, runtime=runtime)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["native", "transformers"])
@pytest.mark.parametrize("method", methods())
def test_every_drafter_is_lossless_on_either_runtime(tok, method, runtime):
    model = tiny.model("llama", seed=1)
    prompt = tok("def add(a, b):\n    return a + b\n\ndef add(a, b):\n")["input_ids"]
    dec = _decoder(method, model, tok, runtime)
    assert dec.engine.runtime.name == runtime
    out = dec.generate(prompt, max_new_tokens=24)
    assert out.token_ids == tiny.hf_greedy(model, prompt, 24)
    assert out.stats.runtime == runtime


def _bf16_tie(model, ids: list[int]) -> bool:
    """transformers' bfloat16 logits after `ids` have their top two within one bfloat16 step of each other:
    a tie, which rounding in another kernel may break either way."""
    with torch.inference_mode():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1]) <= float(top[0].abs()) * 2**-7


@pytest.mark.parametrize("arch", FAMILIES)
def test_bfloat16_greedy_output_equals_generate(tok, arch):
    """In bfloat16 (prepacked for oneDNN where the CPU has bf16 units, with either one-token kernel) the
    native runtime's greedy output is transformers' bfloat16 generate()'s, for every family, up to where
    generate() itself picks between two tokens whose bfloat16 logits tie (bfloat16 keeps 8 significant
    bits, so tiny random models tie often; the products' rounding breaks a tie either way)."""
    from specdec.runtime.kernels import PACKED_ROWS

    model = _model(arch, seed=7, dtype=torch.bfloat16)
    prompt = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    want = tiny.hf_greedy(model, prompt, 24)
    native = NativeModel(model)
    for packed_from in (1, PACKED_ROWS):
        native.packed_from = packed_from
        runner = NativeRunner(native)
        with torch.inference_mode():
            logits = runner.start(prompt, len(prompt) + 24)
            got = []
            for _ in range(24):
                got.append(int(logits.argmax()))
                logits = runner.extend(got[-1:])[-1]
        cut = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        assert cut is None or _bf16_tie(model, prompt + want[:cut]), (packed_from, cut)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_is_sdpa_in_float32(dtype):
    """A single query's attention (plain decoding's every step) goes through two float32 matrix products, not
    SDPA's CPU kernel (slow for one query): the same function, to float32 rounding, for grouped kv heads."""
    native = NativeModel(tiny.model("qwen2", seed=1, layers=1, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    h, kv, d = native.heads, native.kv_heads, native.head_dim
    assert kv < h  # grouped query attention: each kv head serves h / kv query heads
    q = torch.randn(1, h, 1, d, generator=g).to(dtype)
    keys, values = (torch.randn(1, kv, 37, d, generator=g).to(dtype) for _ in range(2))
    expected = F.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), scale=native.scale, enable_gqa=True
    )
    got = native._one_query(q, keys, values)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.float(), expected.to(dtype).float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3
    )


@pytest.mark.parametrize("faster", [1, 2])
def test_the_one_token_kernel_is_the_one_timed_faster(faster):
    """`choose_one_token_kernel` keeps whichever kernel its clock times faster (a scripted clock here)."""
    from specdec.runtime.native import choose_one_token_kernel

    native = NativeModel(_model("llama", dtype=torch.float32))
    now = [0.0]

    def clock() -> float:  # each forward lasts 1 s, or 0.5 s with the kernel that should win
        now[0] += 0.25 if native.packed_from == faster else 0.5
        return now[0]

    assert choose_one_token_kernel(native, clock) == faster == native.packed_from


def test_auto_dtype_loads_a_bfloat16_checkpoint_in_bfloat16_where_the_cpu_has_bf16_units(tmp_path):
    """--dtype auto (the default): a checkpoint saved in bfloat16 keeps it on a CPU with bf16 units, where
    native's bfloat16 forward is prepacked; any other checkpoint, and the shipped models, load in float32."""
    from specdec.models.loading import load_causal_lm
    from specdec.runtime.kernels import bf16_units

    saved = tmp_path / "bf16"
    tiny.model("llama", dtype=torch.bfloat16).save_pretrained(saved)
    tiny.tokenizer().save_pretrained(saved)
    model, _ = load_causal_lm(str(saved))
    assert next(model.parameters()).dtype == (torch.bfloat16 if bf16_units() else torch.float32)
    assert next(load_causal_lm(str(saved), dtype="float32")[0].parameters()).dtype == torch.float32
    plain = tiny.save(tmp_path / "f32")  # saved in float32: float32, as before
    assert next(load_causal_lm(str(plain))[0].parameters()).dtype == torch.float32
    shipped, _ = load_causal_lm("default")  # saved in bfloat16, kept float32
    assert next(shipped.parameters()).dtype == torch.float32
