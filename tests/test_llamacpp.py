"""The llamacpp runtime (llama.cpp over a GGUF conversion) and the bench's llama.cpp methods: same logits as
transformers for trees after commits, greedy output equal to generate() for every drafter it runs."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.bench.llamacpp import LlamaCppMethod
from specdec.drafters import REGISTRY, methods
from specdec.drafters.base import Reads
from specdec.errors import InputError, UnsupportedModelError
from specdec.runtime.hf import ModelRunner
from specdec.runtime.llamacpp import LlamaCppModel, LlamaCppRunner
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

import tiny


@pytest.fixture(scope="module")
def model():
    """The float32 Llama the tests here convert, built when a test first asks for it (not at collection)."""
    return tiny.model("llama", seed=1, dtype=torch.float32)


@pytest.mark.parametrize("handover", [True, False], ids=["native-prefill", "llamacpp-prefill"])
def test_trees_after_commits_match_transformers(model, handover):
    """With the prompt prefilled by llama.cpp, or by the native runtime and handed over as a sequence state."""
    shared = LlamaCppModel(model)
    if handover:
        shared.probe_state_layout()
        assert shared.state_header  # the layout llama.cpp writes is the one specdec writes
    vocab = model.config.vocab_size
    prompt = [(7 * i + 2) % vocab for i in range(10)]
    trees = [DraftTree([5, 6, 7, 8, 9, 6], [-1, 0, 0, 1, 3, 2]), DraftTree([4, 3, 2, 1], [-1, 0, 1, 0])]
    results = []
    with torch.inference_mode():
        for runtime in (LlamaCppRunner(shared), ModelRunner(model)):
            runtime.reset(32, slack=8)
            runtime.prefill(prompt)
            out = []
            for tree, keep in zip(trees, ([0, 1, 3], [0, 2]), strict=True):
                scores = runtime.score(tree)
                out.append(scores.logits)
                runtime.commit(scores, keep)
            results.append(out)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("faster", ["llamacpp", "native"])
def test_auto_runtime_for_drafting_is_the_one_timed_cheaper(tok, monkeypatch, faster):
    """Plain decoding takes llamacpp outright; a drafting method the runtime whose tree forward was timed
    cheaper on this machine; `auto` (which picks per request) starts on native with llamacpp beside it."""
    import specdec.runtime as runtime

    timed: list[str] = []
    sizes: set[int] = set()

    def tree_seconds(model, choice, tokens, clock):
        timed.append(choice.name)
        sizes.add(tokens)
        return 1.0 if choice.name == faster else 2.0

    monkeypatch.setattr(runtime, "_tree_seconds", tree_seconds)
    model = tiny.model("llama", seed=1, dtype=torch.float32)  # a new model: choices are kept per model
    assert SpecDecoder(model, tok, "vanilla").engine.runtime.name == "llamacpp"
    assert not timed
    assert SpecDecoder(model, tok, "pld").engine.runtime.name == faster
    assert sorted(timed) == ["llamacpp", "native"]
    assert SpecDecoder(model, tok, "suffix").engine.runtime.name == faster  # decided once per model
    assert len(timed) == 2 and sizes == {8}
    # heads verify small trees: timed at their own size (`Drafter.tree_tokens`), decided apart
    medusa = SpecDecoder(model, tok, "medusa", head=tiny.untrained_head("medusa", model))
    assert medusa.engine.runtime.name == faster
    assert len(timed) == 4 and sizes == {8, 3}
    engine = SpecDecoder(model, tok, "auto").engine
    assert [r.name for r in engine.runtimes] == ["native", "llamacpp"]


def test_llamacpp_returns_the_final_hidden_state_as_native_does(model):
    """Layer L (the LM head's input) for a prefill, by llama.cpp itself or handed over, and for a tree after a
    commit; any other layer is refused."""
    from specdec.errors import UnsupportedModelError
    from specdec.runtime.native import NativeModel, NativeRunner

    final = model.config.num_hidden_layers
    prompt, tree = (
        [(5 * i + 3) % model.config.vocab_size for i in range(12)],
        DraftTree([4, 3, 2, 1], [-1, 0, 1, 0]),
    )
    for handover in (True, False):
        shared = LlamaCppModel(model)
        if handover:
            shared.probe_state_layout()
        results = []
        with torch.inference_mode():
            for runtime in (LlamaCppRunner(shared), NativeRunner(NativeModel(model))):
                runtime.reset(32, slack=8)
                first = runtime.prefill(prompt, (final,))
                results.append((first.hidden[final], runtime.score(tree, (final,)).hidden[final]))
        for got, want in zip(*results, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
        with pytest.raises(UnsupportedModelError, match="final hidden state"):
            LlamaCppRunner(shared).score(tree, (1,))


def test_methods_reading_hidden_states_never_get_llamacpp(tok, model):
    head = tiny.untrained_head("eagle", model)
    with pytest.raises(InputError, match="hidden states"):
        SpecDecoder(model, tok, "eagle", head=head, runtime="llamacpp")
    auto = SpecDecoder(model, tok, "auto", runtime="llamacpp")  # auto runs without its eagle member there
    assert auto.engine.runtime.name == "llamacpp"
    assert "eagle" not in [m.name for m in auto.drafter.members]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [m for m in methods() if not REGISTRY[m].reads.requires_all_layers],
)
def test_every_drafter_is_lossless_on_llamacpp(tok, model, method):
    prompt = tok("def add(a, b):\n    return a + b\n\ndef add(a, b):\n")["input_ids"]
    extra = {"draft_model": tiny.model("llama", seed=9)} if REGISTRY[method].needs_draft_model else {}
    if REGISTRY[method].reads is Reads.FINAL_HIDDEN:  # medusa, hydra: heads on a state llama.cpp returns
        extra["head"] = tiny.untrained_head(method, model)
    dec = SpecDecoder(model, tok, method, runtime="llamacpp", **extra)
    out = dec.generate(prompt, max_new_tokens=24)
    assert out.stats.runtime == "llamacpp"
    assert out.token_ids == tiny.hf_greedy(model, prompt, 24)


@pytest.mark.parametrize("name", ["llamacpp", "llamacpp-lookup"])
def test_bench_methods_reproduce_generate(tok, model, name):
    prompt = tok("x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n")["input_ids"]
    run = LlamaCppMethod(name, model, tok, threads=1).run(prompt, SamplingParams(max_new_tokens=20))
    assert run.token_ids == tiny.hf_greedy(model, prompt, 20)
    assert 1 <= run.target_forwards <= 20


def test_the_gguf_conversion_is_removed_once_loaded(tok, model, tmp_path, monkeypatch):
    """llama.cpp maps the file it loaded, so the runtime and the bench remove theirs at once: a process killed
    later leaves no model-sized file in the temp folder. Both still decode what generate() does."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    prompt = tok("x = 1\ny = 2\nx = 1\n")["input_ids"]
    method = LlamaCppMethod("llamacpp", model, tok, threads=1)
    dec = SpecDecoder(model, tok, "pld", runtime="llamacpp")
    assert list(tmp_path.iterdir()) == []
    assert method.run(prompt, SamplingParams(max_new_tokens=12)).token_ids == tiny.hf_greedy(
        model, prompt, 12
    )
    assert dec.generate(prompt, max_new_tokens=12).token_ids == tiny.hf_greedy(model, prompt, 12)


def test_auto_runs_a_mostly_plain_temperature_on_llamacpp(tok, model, monkeypatch):
    """auto has both runtimes; where its generations decode plainly it takes llama.cpp's, and stays lossless.
    The runtimes' cost curves are scripted (llama.cpp's one-token forward far cheaper), so the choice does not
    hang on how busy the machine is while they are measured."""
    from specdec.costmodel import CostModel
    from specdec.drafters.auto import USAGE_STEPS, Usage

    curves = {
        "native": CostModel.fit([1, 2, 64], [1.0, 1.1, 4.0]),
        "llamacpp": CostModel.fit([1, 2, 64], [0.01, 1.0, 8.0]),
    }
    scripted = classmethod(lambda cls, m, r, clock=None: curves[r.name])
    monkeypatch.setattr(CostModel, "for_runtime", scripted)
    monkeypatch.setattr(CostModel, "recheck", scripted)
    dec = SpecDecoder(model, tok, "auto")
    assert [r.name for r in dec.engine.runtimes] == ["native", "llamacpp"]
    prompt = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    first = dec.generate(prompt, max_new_tokens=16)
    assert first.stats.runtime == "native" and first.token_ids == tiny.hf_greedy(model, prompt, 16)
    dec.drafter.profile(0.0).usage = Usage(plain_share=1.0, tree_nodes=2.0, steps=USAGE_STEPS)
    second = dec.generate(prompt, max_new_tokens=16)
    assert second.stats.runtime == "llamacpp" and second.token_ids == first.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla", "pld", "medusa", "hydra"])
def test_sampled_tokens_are_what_generate_samples_on_llamacpp(tok, model, method):
    """Seeded sampling through the llamacpp runtime: one draw per emitted token from the target's own p, so
    the same tokens as transformers' sampler with the same seed (as test_sampling checks for the others)."""
    prompt = tok("x = 1\ny = 2\nx = 1\ny = 2\n")["input_ids"]
    heads = REGISTRY[method].reads is Reads.FINAL_HIDDEN  # medusa, hydra
    head = {"head": tiny.untrained_head(method, model)} if heads else {}
    dec = SpecDecoder(model, tok, method, runtime="llamacpp", **head)
    ids = torch.tensor([prompt])
    for seed in range(6):
        torch.manual_seed(seed)
        hf = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=20, top_k=0,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
        out = dec.generate(prompt, max_new_tokens=20, temperature=1.0, seed=seed, ignore_eos=True)
        assert out.token_ids == hf, seed


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_every_native_family_converts_and_decodes_as_generate(tok, arch):
    """Mistral (llama.cpp's llama architecture), Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms) convert,
    pass the load check against transformers, take the native prefill handed over (Qwen's keys in
    transformers' order), and decode generate()'s tokens, drafting included."""
    from specdec.runtime import select_runtime
    from test_native import _model

    model = _model(arch, seed=4, dtype=torch.float32)
    assert select_runtime(model, "llamacpp").name == "llamacpp"
    shared = LlamaCppModel(model)
    shared.probe_state_layout()
    assert shared.state_header
    prompt = tok("def add(a, b):\n    return a + b\n\ndef add(a, b):\n")["input_ids"]
    for method in ("vanilla", "pld"):
        out = SpecDecoder(model, tok, method, runtime="llamacpp").generate(prompt, max_new_tokens=20)
        assert out.stats.runtime == "llamacpp"
        assert out.token_ids == tiny.hf_greedy(model, prompt, 20), method


def test_a_model_llamacpp_cannot_run_as_converted_is_refused_in_one_line():
    """A Mistral whose sliding window is shorter than its context (llama.cpp's llama architecture attends to
    everything) is refused with the reason, not converted into another function."""
    from specdec.runtime import select_runtime

    model = tiny.model("mistral", seed=1, dtype=torch.float32)
    model.config.sliding_window = 64
    with pytest.raises(UnsupportedModelError, match="sliding-window attention of 64 positions"):
        select_runtime(model, "llamacpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_prefills_are_handed_over_in_the_model_precision(dtype):
    """The KV cache is in the model's precision, so native's prefill is handed over for bfloat16 models too:
    the probe proves the layout (llama.cpp's next logits after the handed-over prompt are those after its own
    prefill), and a longer prompt handed over gives the same next logits as llama.cpp prefilling it."""
    model = tiny.model("llama", seed=2, dtype=dtype)
    shared = LlamaCppModel(model)
    shared.probe_state_layout()
    assert shared.state_header
    prompt = [(5 * i + 3) % model.config.vocab_size for i in range(40)]
    logits = []
    for handover in (True, False):
        runner = LlamaCppRunner(shared)
        runner.reset(64)
        runner.prefill(prompt[:-1]) if handover else runner._prefill_llamacpp(prompt[:-1])
        logits.append(runner.extend(prompt[-1:]).float())
        runner.free()
    got, want = logits
    bound = (1e-5 if dtype == torch.float32 else 2e-2) * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=bound)


def test_a_state_in_a_wrong_layout_is_not_handed_over(monkeypatch):
    """A handover whose keys or values land in the wrong place is caught by the load-time probe, which then
    leaves prefilling to llama.cpp (and decoding still works)."""
    import specdec.runtime.llamacpp as lc

    real = lc.state_bytes

    def scrambled(header, cache, n, *layout):  # each value's dimensions in reverse order
        cache.v[:, 0, :, :n] = cache.v[:, 0, :, :n].flip(-1).clone()
        return real(header, cache, n, *layout)

    model = tiny.model("llama", seed=2, dtype=torch.float32)
    shared = LlamaCppModel(model)
    monkeypatch.setattr(lc, "state_bytes", scrambled)
    shared.probe_state_layout()
    assert shared.state_header == b""
    runner = LlamaCppRunner(shared)
    runner.reset(16)
    runner.prefill([1, 2, 3])
    assert runner.extend([4]).shape == (1, model.config.vocab_size)


def test_a_bfloat16_model_runs_on_llamacpp(tok):
    """A bfloat16 Llama converts and passes the load check (its norm weights are written in float32: llama.cpp's
    CPU multiply takes no 16-bit operand there, and aborted the process in the first forward), and greedy
    decoding through it is generate()'s up to a bfloat16 tie (the native bfloat16 test's rule)."""
    from specdec.runtime import select_runtime
    from test_native import _bf16_tie

    model = tiny.model("llama", seed=3, dtype=torch.bfloat16)
    assert select_runtime(model, "llamacpp").name == "llamacpp"
    prompt = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    want = tiny.hf_greedy(model, prompt, 16)
    got = SpecDecoder(model, tok, "vanilla", runtime="llamacpp").generate(prompt, max_new_tokens=16).token_ids
    cut = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    assert cut is None or _bf16_tie(model, prompt + want[:cut])
