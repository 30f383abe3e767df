"""Greedy equivalence: every method's tokens equal transformers' generate(do_sample=False), for any tree."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec import Drafter, DraftTree, SpecDecoder
from specdec.runtime.hf import ModelRunner
from specdec.runtime.native import NativeModel, NativeRunner

import tiny

ARCHS = ["llama", "qwen2", "gemma"]


@pytest.fixture(scope="module")
def models() -> dict:
    """One tiny model per architecture, built when a test first asks for it (not at collection)."""
    return {arch: tiny.model(arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def reference(models) -> tiny.Reference:
    return tiny.Reference(models)


class ScriptedDrafter(Drafter):
    """Knows the right answer and hides it in a random tree among wrong branches (or leaves it out).

    `right` is the fraction of steps whose tree contains the true continuation (up to a random depth);
    every tree also carries decoy branches: wrong siblings at the root and wrong children under true nodes.
    """

    name = "scripted"

    def __init__(self, truth: list[int], prompt: list[int], seed: int, right: float, vocab: int):
        self.truth, self.prompt, self.rng, self.right, self.vocab = (
            truth,
            prompt,
            random.Random(seed),
            right,
            vocab,
        )

    def _wrong(self, avoid: int) -> int:
        tok = self.rng.randrange(self.vocab)
        return tok if tok != avoid else (tok + 1) % self.vocab

    def propose(self, state, context: list[int], max_depth: int) -> DraftTree:
        done = len(context) - len(self.prompt)  # emitted tokens so far (root included)
        future = self.truth[done:]
        sequences = []
        depth = self.rng.randint(0, max_depth + 2)  # may exceed what is allowed: the engine must trim
        if future and self.rng.random() < self.right:
            true_seq = future[:depth]
            sequences.append(true_seq)
            for cut in range(len(true_seq)):  # decoy child under each true node
                if self.rng.random() < 0.4:
                    sequences.append(true_seq[:cut] + [self._wrong(true_seq[cut])])
        for _ in range(self.rng.randint(0, 3)):  # decoy branches at the root
            first = self._wrong(future[0] if future else -1)
            sequences.append(
                [first] + [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, 3))]
            )
        self.rng.shuffle(sequences)
        return DraftTree.from_sequences(context[-1], sequences)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(ARCHS),
    prompt=st.lists(st.integers(1, 383), min_size=1, max_size=12).map(tuple),
    n=st.integers(1, 24),
    seed=st.integers(0, 10**6),
    right=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_scripted_trees_equal_generate(tok, models, reference, arch, prompt, n, seed, right):
    m = models[arch]
    truth = reference(arch, prompt, n + 8)
    drafter = ScriptedDrafter(truth, list(prompt), seed, right, m.config.vocab_size)
    dec = SpecDecoder(m, tok, method=drafter)
    out = dec.generate(list(prompt), max_new_tokens=n)
    expected = reference(arch, prompt, n)
    assert out.token_ids == expected
    assert out.stats.new_tokens == len(expected) <= n
    if right == 1.0 and n > 1:
        assert out.stats.target_forwards <= n  # an oracle never makes it slower than vanilla


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["vanilla", "pld"])
@settings(max_examples=8, deadline=None)
@given(
    prompt=st.lists(st.integers(1, 40), min_size=1, max_size=30).map(
        tuple
    ),  # small alphabet: repeats for pld
    n=st.integers(1, 30),
)
def test_builtin_methods_equal_generate(tok, models, reference, arch, method, prompt, n):
    out = SpecDecoder(models[arch], tok, method=method).generate(list(prompt), max_new_tokens=n)
    assert out.token_ids == reference(arch, prompt, n)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_draft_model_same_and_random(tok, models, reference, arch):
    m = models[arch]
    prompt = tok("def add(a, b):\n    return a + b\n")["input_ids"]
    expected = reference(arch, tuple(prompt), 40)
    same = SpecDecoder(m, tok, method="draft", draft_model=m).generate(prompt, max_new_tokens=40)
    assert same.token_ids == expected
    assert (
        same.stats.acceptance_by_depth and min(same.stats.acceptance_by_depth) == 1.0
    )  # everything accepted
    other = tiny.model(arch, seed=99)
    rand = SpecDecoder(m, tok, method="draft", draft_model=other).generate(prompt, max_new_tokens=40)
    assert rand.token_ids == expected


def test_eos_inside_accepted_draft_stops_there(tok, models):
    """An oracle drafts past an EOS; the output ends at the EOS, exactly like generate()."""
    base = models["llama"]
    prompt = [5, 9, 14, 3]
    free = tiny.hf_greedy(base, prompt, 20)
    eos = free[6]  # make the 7th generated token an EOS
    m = tiny.model("llama", seed=0, eos=eos)
    expected = tiny.hf_greedy(m, prompt, 20)
    assert expected[-1] == eos and len(expected) <= 7
    drafter = ScriptedDrafter(free, prompt, 0, 1.0, m.config.vocab_size)
    drafter.rng.randint = lambda a, b: b  # always the deepest true chain: EOS lands mid-draft
    out = SpecDecoder(m, tok, method=drafter).generate(prompt, max_new_tokens=20)
    assert out.token_ids == expected
    assert out.stats.finish_reason == "eos"


def _kv(runtime, length: int) -> list[torch.Tensor]:
    """Every layer's committed keys and values, whatever the runtime's cache layout."""
    if isinstance(runtime, NativeRunner):
        return [runtime.cache.k[:, 0, :, :length], runtime.cache.v[:, 0, :, :length]]
    return [
        t[..., :length, :] for layer in range(len(runtime.cache.layers)) for t in runtime.cache.tensors(layer)
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("runtime", ["native", "transformers"])
def test_cache_holds_exactly_the_accepted_path(tok, models, reference, arch, runtime, monkeypatch):
    """After every commit the target's cache equals a fresh prefill of the emitted sequence (all but the
    last emitted token, which is the next tree's root)."""
    if runtime == "native" and not NativeModel.supports(models[arch]):
        runtime = "transformers"  # gemma: the native runtime does not run it (test_native.py)
    m = models[arch]
    prompt = [7, 3, 11, 19, 2]
    truth = reference(arch, tuple(prompt), 40)
    fresh = tiny.model(arch, seed=ARCHS.index(arch))
    checks = []
    runtime_cls = NativeRunner if runtime == "native" else ModelRunner
    commit = runtime_cls.commit

    def checked_commit(self, tree_start: int, accepted_nodes: list[int]) -> None:
        commit(self, tree_start, accepted_nodes)
        seq = (prompt + truth)[: self.length]
        ref = NativeRunner(NativeModel(fresh)) if runtime == "native" else ModelRunner(fresh)
        ref.start(seq, len(seq) + 4)
        for got, want in zip(_kv(self, len(seq)), _kv(ref, len(seq)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        checks.append(self.length)

    drafter = ScriptedDrafter(truth, prompt, 3, 0.8, m.config.vocab_size)
    dec = SpecDecoder(m, tok, method=drafter, runtime=runtime)  # its load-time check commits unchecked
    monkeypatch.setattr(runtime_cls, "commit", checked_commit)
    out = dec.generate(prompt, max_new_tokens=30)
    assert out.stats.runtime == runtime
    assert out.token_ids == truth[:30]
    assert len(checks) == out.stats.target_forwards  # checked after every verification step
    # each commit keeps the prompt and every emitted token but the newest (the next root)
    assert checks[-1] == len(prompt) + 30 - 1 - (len(out.token_ids) - 30)


def test_max_new_tokens_exact_even_when_more_accepted(tok, models, reference):
    m = models["llama"]
    prompt = [1, 2, 3]
    truth = reference("llama", tuple(prompt), 30)
    for n in (1, 2, 5, 13):
        drafter = ScriptedDrafter(truth, prompt, n, 1.0, m.config.vocab_size)
        out = SpecDecoder(m, tok, method=drafter).generate(prompt, max_new_tokens=n)
        assert out.token_ids == truth[:n]
        assert out.stats.finish_reason == "length"
