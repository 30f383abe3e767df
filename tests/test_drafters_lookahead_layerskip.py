"""lookahead and layerskip: greedy equivalence, seeded sampling, the view's exactness, the user's model untouched."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec import SpecDecoder
from specdec.acceptance import verify_greedy
from specdec.drafters import Request, make_drafter
from specdec.drafters.base import Scored
from specdec.drafters.layerskip import default_skip
from specdec.drafters.lookahead import Lookahead, LookaheadState
from specdec.errors import InputError
from specdec.runtime.skipview import ViewRunner, skipping_view
from specdec.sampling import SamplingParams, TargetDistribution, make_generator

import tiny

ARCHS = ["llama", "qwen2", "gemma"]

# Options beside the defaults: a small lookahead, and a layerskip that searches its layer set every step.
VARIANTS = {
    "lookahead": [{}, {"window": 2, "ngram": 2, "guesses": 2}, {"seed_context": False}],
    "layerskip": [{}, {"threshold": 0.0}, {"adapt_every": 1, "adapt_window": 4, "stop_at": 1.0}],
}


def released_states(dec: SpecDecoder) -> list:
    """Collects the per-generation drafter states of `dec` as its generations end."""
    states: list = []
    release = dec.drafter.release

    def spy(state) -> None:
        states.append(state)
        release(state)

    dec.drafter.release = spy  # type: ignore[method-assign]
    return states


@pytest.fixture(scope="module")
def models() -> dict:
    """One four-layer tiny model per architecture, built when a test first asks for it (not at collection)."""
    return {arch: tiny.model(arch, seed=10 + i, layers=4) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def reference(models) -> tiny.Reference:
    return tiny.Reference(models)


prompts = st.tuples(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 3)).map(
    lambda t: tuple(t[0] * t[1])
)  # repeated segments give the n-gram pool something to find


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lookahead", "layerskip"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(ARCHS), prompt=prompts, n=st.integers(1, 20), variant=st.integers(0, 2))
def test_greedy_equals_transformers(tok, models, reference, method, arch, prompt, n, variant):
    dec = SpecDecoder(models[arch], tok, method, **VARIANTS[method][variant])
    out = dec.generate(list(prompt), max_new_tokens=n)
    assert out.token_ids == reference(arch, prompt, n)


@pytest.mark.parametrize("method", ["lookahead", "layerskip"])
def test_sampling_is_deterministic_with_a_seed(tok, models, method):
    model = models["llama"]
    dec = SpecDecoder(model, tok, method)
    kwargs = dict(max_new_tokens=16, ignore_eos=True, temperature=0.9, top_k=20)
    first = dec.generate([3, 4, 5, 3, 4], seed=11, **kwargs).token_ids
    dec.generate([7, 8], seed=12, **kwargs)  # another call in between changes nothing
    assert dec.generate([3, 4, 5, 3, 4], seed=11, **kwargs).token_ids == first
    assert SpecDecoder(model, tok, method).generate([3, 4, 5, 3, 4], seed=11, **kwargs).token_ids == first
    assert dec.generate([3, 4, 5, 3, 4], seed=13, **kwargs).token_ids != first
    if method == "lookahead":  # point-mass drafts: one draw y ~ p per emitted token, as vanilla decoding does
        vanilla = SpecDecoder(model, tok, "vanilla")
        assert vanilla.generate([3, 4, 5, 3, 4], seed=11, **kwargs).token_ids == first


# ---------------------------------------------------------------------------------------------------------------
# layerskip


def test_view_skips_exactly_the_chosen_layers(models):
    """The view equals the full model with the skipped layers turned into identities (by hooks, here only)."""
    ids = torch.tensor([[5, 9, 2, 7, 7, 1]])
    for arch, model in models.items():
        keep = [0, 2, 3]
        handle = model.model.layers[1].register_forward_hook(lambda mod, args, out: args[0])
        try:
            with torch.inference_mode():
                expected = model(ids, use_cache=False).logits
        finally:
            handle.remove()
        with torch.inference_mode():
            got = skipping_view(model, keep)(ids, use_cache=False).logits
            full = skipping_view(model, [0, 1, 2, 3])(ids, use_cache=False).logits
            assert torch.allclose(got, expected, atol=1e-12, rtol=0), arch
            assert torch.allclose(full, model(ids, use_cache=False).logits, atol=1e-12, rtol=0), arch


def test_view_cache_maps_original_layer_indices(models):
    """Prefill + extends through the kept-layer cache give the logits of one uncached forward."""
    tokens = [4, 8, 15, 16, 23, 42]
    for model in models.values():
        runner = ViewRunner(model, [0, 3])
        with torch.inference_mode():
            full = runner.model(torch.tensor([tokens]), use_cache=False).logits[0]
            steps = [runner.start(tokens[:3], 4)[None], runner.extend(tokens[3:5]), runner.extend(tokens[5:])]
        assert runner.cache.length == len(tokens) and len(runner.cache.layers) == 2  # grew past capacity 4
        assert torch.allclose(torch.cat(steps)[-3:], full[-3:], atol=1e-12, rtol=0)
        assert torch.allclose(steps[0][0], full[2], atol=1e-12, rtol=0)


def test_the_users_model_and_config_are_unchanged(tok):
    model = tiny.model("qwen2", seed=5, layers=6)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    layers = list(model.model.layers)
    prompt = [9, 8, 7, 9, 8, 7, 6]
    before = tiny.hf_greedy(model, prompt, 12)
    dec = SpecDecoder(model, tok, "layerskip", adapt_every=1, adapt_window=4, stop_at=1.0)
    states = released_states(dec)
    dec.generate(prompt, max_new_tokens=24, ignore_eos=True)
    dec.generate(prompt, max_new_tokens=8, temperature=1.0, seed=0)
    assert states[0].trials > 0  # views of other layer sets were built and run
    assert model.config.to_dict() == config and model.config.num_hidden_layers == 6
    assert list(model.model.layers) == layers and len(model.model.layers) == 6
    state = model.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[k], v) for k, v in params.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert tiny.hf_greedy(model, prompt, 12) == before


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_zero_layers_skipped_accepts_everything(tok, models, temperature):
    """The view of all layers is the target: every drafted token at every depth is accepted."""
    dec = SpecDecoder(models["gemma"], tok, "layerskip", skip=(), threshold=0.0)
    out = dec.generate([1, 2, 3], max_new_tokens=30, ignore_eos=True, temperature=temperature, seed=1)
    stats = out.stats
    assert len(stats.acceptance_by_depth) >= 4 and all(a == 1.0 for a in stats.acceptance_by_depth)
    assert stats.target_forwards < 10  # drafts grow 4, 6, 8, 8, ...: far fewer forwards than tokens


def test_default_skip_keeps_the_first_and_last_layers():
    assert default_skip(6, 0.5) == (2, 4) and default_skip(2, 0.5) == () and default_skip(1, 0.5) == ()
    for n in range(1, 40):
        skip = default_skip(n, 0.5)
        assert len(set(skip)) == len(skip) == round(0.5 * max(n - 2, 0))
        assert all(0 < i < n - 1 for i in skip)


def test_bad_layerskip_options_are_input_errors(tok, models):
    model = models["llama"]
    for options in ({"skip": (0, 1, 2, 3)}, {"skip": (7,)}, {"skip": "1,x"}, {"skip_ratio": 2.0}):
        with pytest.raises(InputError):
            SpecDecoder(model, tok, "layerskip", **options)
    assert make_drafter("layerskip", skip="1, 2").config.skip == (1, 2)


def _exact_distribution(model, prompt: list[int], length: int, params: SamplingParams) -> dict:
    """Probability of every `length`-token continuation of `prompt`, from the model's own logits."""
    vocab = model.config.vocab_size
    dist = TargetDistribution(params)
    probs = {(): 1.0}
    for k in range(length):
        seqs = list(itertools.product(range(vocab), repeat=k))
        with torch.inference_mode():
            rows = dist(model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1].double())
        p = dict(zip(seqs, rows.double(), strict=True))
        probs = {s + (x,): w * float(p[s][x]) for s, w in probs.items() for x in range(vocab)}
    total = sum(probs.values())  # p is float32: renormalise the float64 products
    return {s: w / total for s, w in probs.items()}


@pytest.mark.slow
def test_layerskip_sampling_matches_the_target_distribution(tok):
    """A view that differs from the target (one of 3 layers skipped): the output is still exactly p."""
    model = tiny.model("llama", seed=4, vocab_size=8, hidden=16, layers=3)
    prompt, params = [1, 2, 3, 1], SamplingParams(temperature=1.0)
    exact = _exact_distribution(model, prompt, 3, params)
    dec = SpecDecoder(model, tok, "layerskip", skip=(1,), adapt=False)
    counts: Counter = Counter()
    rejected = 0
    for seed in range(300):
        out = dec.generate(prompt, max_new_tokens=3, ignore_eos=True, temperature=1.0, seed=seed)
        counts[tuple(out.token_ids)] += 1
        rejected += out.stats.proposed_by_depth[0] - out.stats.accepted_by_depth[0]
    assert rejected > 0  # q differs from p: the test exercises the residual
    n = sum(counts.values())
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    for s in sorted(exact, key=exact.get, reverse=True):
        if n * exact[s] >= 5:
            observed.append(counts[s])
            expected.append(n * exact[s])
        else:
            rest_o, rest_e = rest_o + counts[s], rest_e + n * exact[s]
    observed.append(rest_o)
    expected.append(rest_e)
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# lookahead


def run_fake_target(
    drafter: Lookahead, context: list[int], vocab: int, next_token, steps: int
) -> tuple[list[int], LookaheadState]:
    """Drive propose/observe with logits that put all mass on next_token(node token, node position)."""
    state = drafter.start(Request(list(context), SamplingParams(max_new_tokens=1000), make_generator(0)))
    accepted = []
    for _ in range(steps):
        tree = drafter.propose(state, context, 100)
        root_pos = len(context) - 1
        want = [next_token(t, root_pos + d) for t, d in zip(tree.tokens, tree.depths, strict=True)]
        logits = torch.nn.functional.one_hot(torch.tensor(want), vocab).double() * 10.0
        verdict = verify_greedy(tree, logits)
        drafter.observe(state, Scored(tree, verdict, logits))
        context += verdict.tokens
        accepted.append(verdict.accepted_drafts)
    return accepted, state


def test_lookahead_window_is_one_jacobi_iteration_per_step():
    """A target that knows the text by position: one iteration makes the whole window right, and the next
    step accepts it as a chain."""
    text = list(range(1, 64))
    drafter = Lookahead(window=4, ngram=4, guesses=4, seed_context=False)
    context = text[:1]
    accepted, _ = run_fake_target(drafter, context, 64, lambda tok, pos: text[pos + 1], 2)
    assert accepted == [0, 4] and context == text[: len(context)]


def test_lookahead_pool_holds_the_targets_ngrams_and_drafts_them():
    """Target: next = token + 1 (mod 16), whatever came before. The pool (not seeded with the context) gets
    only the target's own n-grams from the lookahead branch; from the second lap on they are drafted, and
    every step accepts at least N - 1 tokens."""
    drafter = Lookahead(window=4, ngram=4, guesses=4, seed_context=False)
    context = [0]
    accepted, state = run_fake_target(drafter, context, 16, lambda tok, pos: (tok + 1) % 16, 30)
    assert context == [i % 16 for i in range(len(context))]
    assert state.jacobi_ngrams > 0
    for key, conts in state.pool.table.items():
        assert list(conts) == [tuple((key + i) % 16 for i in (1, 2, 3))]
    first_lap = next(i for i, n in enumerate(itertools.accumulate(a + 1 for a in accepted)) if n >= 20)
    assert all(a >= 3 for a in accepted[first_lap + 1 :]) and len(accepted) > first_lap + 3


def test_lookahead_pool_fills_and_drafts_are_accepted(tok, models, reference):
    """A repetitive case: the prompt's n-grams, then the generated loop's, get drafted and accepted."""
    model = models["llama"]
    prompt = [5, 6, 7, 8] * 4
    for options in ({}, {"seed_context": False}):
        dec = SpecDecoder(model, tok, "lookahead", **options)
        states = released_states(dec)
        out = dec.generate(prompt, max_new_tokens=40)
        assert out.token_ids == reference("llama", tuple(prompt), 40)
        assert states[0].jacobi_ngrams > 0 and len(states[0].pool) > 0
        assert sum(out.stats.accepted_by_depth) > 0 and out.stats.mean_accepted_tokens > 1.2


def test_lookahead_trees_have_distinct_siblings_and_respect_max_depth():
    drafter = Lookahead(window=5, ngram=3, guesses=3)
    state = drafter.start(Request([1], SamplingParams(), make_generator(0)))
    context = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2, 3, 1]
    for depth in range(4):
        tree = drafter.propose(state, context, depth)
        assert tree.depth <= depth
        for kids in tree.children:
            assert len({tree.tokens[c] for c in kids}) == len(kids)
    assert len(tree) - 1 <= 3 * 2 + 5  # G (N - 1) + W


def test_bad_lookahead_options_are_input_errors():
    for options in ({"window": 0}, {"ngram": 1}, {"guesses": True}):
        with pytest.raises(InputError):
            make_drafter("lookahead", **options)
    assert make_drafter("lookahead", window=2, ngram=3).config.window == 2
