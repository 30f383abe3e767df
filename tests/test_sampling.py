"""Lossless sampling: specdec samples from exactly the distribution generate(do_sample=True) samples from.

The evidence comes in layers, cheapest and strictest first:

1. p itself. `TargetDistribution` on generate()'s own raw logits equals the softmax of the scores generate()
   samples from (`output_logits` / `output_scores`), for any temperature, top-k and top-p, ties included.
2. Exactness of one acceptance step, by enumeration. `acceptance.py` draws randomness through two primitives
   (`torch.rand` for the uniforms, `torch.multinomial` for the draws). `Chance` replaces them with branches
   carrying exact probabilities (a uniform U becomes "U*s < t with probability clip(t/s, 0, 1)") and runs the
   real code once per outcome, drafting included (children drawn from q are branches too). The emitted tokens,
   continued autoregressively from p, must have exactly the autoregressive distribution (to 1e-9) over the
   whole vocabulary, for point masses, i.i.d. children with shared or differing q, mixes, zeros in p or q, q = p.
3. Statistics against the exact distribution of a short continuation of a tiny-vocabulary model (8 tokens, so
   every continuation is enumerable from the model's own probabilities), with a chi-square test
   (cells with expected count < 5 pooled) that must not reject at p > 1e-3:
   - `verify_sampled` called directly, 20 000 steps per tree shape, on the real model's logits for every
     node (precomputed for all contexts, so a step costs 0.1-0.3 ms instead of model forwards);
   - the engine end to end (`SpecDecoder.generate(..., temperature, seed)`), 400 generations per method:
     fewer samples because each costs a few model forwards, still enough to catch gross errors (wrong rows, wrong
     q, an unsampled first token, drafts taken as output).
   Each layer runs deliberately broken rules (accept every draft; resample from p instead of the residual)
   through the same harness and requires the test to reject them, so a pass is not a lack of power.
   Fixed seeds keep every statistical test deterministic.
   Point-mass drafters draw exactly one y ~ p per emitted token, so beyond the statistics their seeded output is
   compared token for token with vanilla sampling and with generate(do_sample=True) after torch.manual_seed.
4. Seeds: the same seed gives the same tokens, different seeds differ, and the global torch RNG is untouched.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdec import Drafter, DraftTree, SpecDecoder, acceptance
from specdec.acceptance import Verdict, verify_sampled
from specdec.drafters import REGISTRY, methods
from specdec.errors import InputError
from specdec.sampling import SamplingParams, TargetDistribution

import tiny

# ---------------------------------------------------------------------------------------------------------------
# 1. p equals what generate(do_sample=True) samples from


def _tied_model():
    """Only 8 distinct lm_head rows, each repeated: the logits tie in groups of 48, so every top-k and top-p
    boundary falls inside a tie."""
    m = tiny.model("llama", seed=3)
    with torch.no_grad():
        m.lm_head.weight.copy_(m.lm_head.weight[torch.arange(m.config.vocab_size) % 8])
    return m


HF_MODELS = {"random": lambda: tiny.model("llama", seed=2), "tied": _tied_model}  # name -> how to build it


@pytest.fixture(scope="module")
def hf_models() -> dict:
    """HF_MODELS built, when the test first asks for them (not at collection)."""
    return {name: build() for name, build in HF_MODELS.items()}


@settings(max_examples=30, deadline=None)
@given(
    which=st.sampled_from(sorted(HF_MODELS)),
    prompt=st.lists(st.integers(1, 383), min_size=1, max_size=6),
    temperature=st.sampled_from([0.05, 0.3, 0.7, 1.0, 1.3, 3.0]),
    top_k=st.sampled_from([0, 1, 2, 5, 50, 384, 1000]),
    top_p=st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.1, 1e-4]),
)
def test_p_equals_what_generate_samples_from(hf_models, which, prompt, temperature, top_k, top_p):
    model, ids = hf_models[which], torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,  # explicit: generate() would otherwise default to 50
        top_p=top_p,
        pad_token_id=0,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    hf_p = torch.softmax(out.scores[0], dim=-1)  # generate(): probs = softmax(processed scores)
    ours = TargetDistribution(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    p = ours(out.logits[0])  # generate()'s raw logits (already cast to float32 by it)
    assert torch.equal(p == 0, hf_p == 0)
    torch.testing.assert_close(p, hf_p, rtol=0, atol=1e-7)
    with torch.inference_mode():  # and from the model's own float64 logits, as the engine gets them
        own = ours(model(ids).logits[:, -1])
    assert torch.equal(own == 0, hf_p == 0)
    torch.testing.assert_close(own, hf_p, rtol=0, atol=1e-6)


def test_integer_temperature_is_accepted():
    """JSON prompt files and Python callers pass `temperature=2`; transformers' warper insists on a float."""
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    p_int = TargetDistribution(SamplingParams(temperature=2))(logits)
    p_float = TargetDistribution(SamplingParams(temperature=2.0))(logits)
    assert torch.equal(p_int, p_float)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": "0.7"},
        {"temperature": float("inf")},
        {"temperature": float("nan")},
        {"temperature": -0.5},
        {"top_k": True},
        {"top_k": 2.0},
        {"top_p": "0.9"},
        {"top_p": 0.0},
        {"seed": "1"},
        {"seed": 1.5},
        {"seed": 2**64},
    ],
)
def test_bad_sampling_parameters_are_input_errors(decoder, bad):
    with pytest.raises(InputError):
        decoder("vanilla").generate(PROMPT, max_new_tokens=2, **{"temperature": 1.0, **bad})


# ---------------------------------------------------------------------------------------------------------------
# 2. Exact enumeration of one acceptance step


class Chance:
    """Runs a random program once per combination of outcomes, each with its exact probability.

    The program asks `choose([(value, prob), ...])` for every random decision; runs replay a script of choice
    indices and advance it like an odometer (outcomes with probability 0 are never taken).
    """

    def outcomes(self, program):
        script: list[int] = []
        while True:
            self.script, self.widths, self.pos, self.prob = script, [], 0, 1.0
            result = program(self)
            yield result, self.prob
            script = self.script[: self.pos]
            while script and script[-1] + 1 >= self.widths[len(script) - 1]:
                script.pop()
            if not script:
                return
            script[-1] += 1

    def choose(self, options):
        options = [(v, p) for v, p in options if p > 0]
        if self.pos == len(self.script):
            self.script.append(0)
        value, prob = options[self.script[self.pos]]
        self.widths.append(len(options))
        self.pos += 1
        self.prob *= prob
        return value

    def draw(self, weights: torch.Tensor) -> int:
        """A multinomial draw (unnormalised weights, as torch.multinomial takes them)."""
        w = weights.double()
        return self.choose([(i, (w[i] / w.sum()).item()) for i in range(len(w))])


class Uniform:
    """U ~ Uniform[0, 1) times a scale; comparing it with a number is a branch with the exact probability."""

    def __init__(self, chance: Chance, scale: float = 1.0) -> None:
        self.chance, self.scale = chance, scale

    def __mul__(self, s) -> Uniform:
        return Uniform(self.chance, self.scale * float(s))

    __rmul__ = __mul__

    def _below(self, t: float, or_equal: bool) -> bool:
        # U * 0 is 0 whatever U is
        prob = min(max(t / self.scale, 0.0), 1.0) if self.scale else float(t > 0 or (or_equal and t == 0))
        return self.chance.choose([(True, prob), (False, 1.0 - prob)])

    def __lt__(self, t) -> bool:
        return self._below(float(t), False)

    def __le__(self, t) -> bool:
        return self._below(float(t), True)

    def __gt__(self, t) -> bool:
        return not self._below(float(t), True)

    def __ge__(self, t) -> bool:
        return not self._below(float(t), False)


class _Scalar:
    def __init__(self, value) -> None:
        self.value = value

    def item(self):
        return self.value


class ChanceTorch:
    """Stands in for `torch` inside acceptance.py: its random primitives become `Chance` branches."""

    def __init__(self, chance: Chance) -> None:
        self.chance = chance

    def __getattr__(self, name):
        return getattr(torch, name)

    def rand(self, size=(), generator=None, dtype=None, device=None):
        assert tuple(size) == (), "the enumerator models scalar uniforms only"
        return _Scalar(Uniform(self.chance))

    def multinomial(self, probs, num_samples, generator=None):
        assert num_samples == 1 and probs.dim() == 1, "the enumerator models single draws from one row"
        return torch.tensor([self.chance.draw(probs)])


def test_chance_enumerates_every_outcome_exactly():
    """The enumerator itself: a draw, then a uniform compared with a threshold that depends on the draw."""
    chance = Chance()

    def program(ch):
        x = ch.draw(torch.tensor([1.0, 3.0]))  # P(x = 1) = 3/4
        return x, Uniform(ch) * 4 < x + 1  # P(U < (x + 1) / 4): 1/4 for x = 0, 1/2 for x = 1

    got = dict(chance.outcomes(program))
    assert got == pytest.approx({(0, True): 1 / 16, (0, False): 3 / 16, (1, True): 3 / 8, (1, False): 3 / 8})


def step_distribution(draft, p_of) -> dict[tuple[int, ...], float]:
    """Exact distribution of the tokens one drafting + `verify_sampled` step emits.

    `draft(chance)` returns a DraftTree (its random children drawn with `chance`); `p_of(path)` is the target
    distribution after the root and the drafted tokens `path`, so node rows are p_of(path to the node).
    """
    chance = Chance()

    def program(ch: Chance) -> tuple[int, ...]:
        tree = draft(ch)
        paths = [tuple(tree.tokens[j] for j in tree.path_to(i)[1:]) for i in range(len(tree))]
        p = torch.stack([p_of(path) for path in paths])  # [N, V]
        return tuple(verify_sampled(tree, p, lambda x: x, generator=None).tokens)

    dist: dict[tuple[int, ...], float] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(acceptance, "torch", ChanceTorch(chance))
        for tokens, prob in chance.outcomes(program):
            dist[tokens] = dist.get(tokens, 0.0) + prob
    return dist


def assert_lossless(emitted: dict[tuple[int, ...], float], p_of, vocab: int, length: int) -> None:
    """Emitted tokens continued autoregressively from p must have p's distribution over all length-L sequences."""
    assert sum(emitted.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(map(len, emitted)) <= length
    worst = 0.0
    for seq in itertools.product(range(vocab), repeat=length):
        want = 1.0
        for k in range(length):
            want *= p_of(seq[:k])[seq[k]].item()
        got = 0.0
        for m in range(1, length + 1):
            prob = emitted.get(seq[:m], 0.0)
            for k in range(m, length):
                prob *= p_of(seq[:k])[seq[k]].item()
            got += prob
        worst = max(worst, abs(got - want))
    assert worst < 1e-9


def dyadic(weights: list[int], denominator: int) -> torch.Tensor:
    """Exact in float32 too, so the code's `q.float()` loses nothing and equality can be asserted to 1e-9."""
    assert sum(weights) == denominator
    return torch.tensor(weights, dtype=torch.float64) / denominator


def table_p(vocab: int, seed: int = 0):
    """p_of(path): a fixed random distribution (in sixteenths, zeros likely) for every context."""

    @functools.cache
    def p_of(path: tuple[int, ...]) -> torch.Tensor:
        rng = random.Random(f"{seed}:{path}")
        picks = [rng.randrange(vocab) for _ in range(16)]
        return dyadic([picks.count(i) for i in range(vocab)], 16)

    return p_of


V_EXACT = 4
sixteenths = st.lists(st.integers(0, V_EXACT - 1), min_size=16, max_size=16).map(
    lambda picks: dyadic([picks.count(i) for i in range(V_EXACT)], 16)
)
child = st.one_of(
    st.tuples(st.just("point"), st.integers(0, V_EXACT - 1)),  # a deterministic guess (one-hot q)
    st.tuples(st.just("q"), st.integers(0, 1)),  # drawn from one of two drafter distributions
    st.tuples(st.just("p"), st.just(0)),  # drawn from p itself: the residual becomes 0
)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    p_root=sixteenths,
    qs=st.lists(sixteenths, min_size=2, max_size=2),
    children=st.lists(child, min_size=1, max_size=3),
)
def test_one_node_is_exact(p_root, qs, children):
    """A node with 1-3 children of any kind: point masses, i.i.d. draws from a shared q, differing q, q = p."""
    table = table_p(V_EXACT)

    def p_of(path):
        return p_root if not path else table(path)

    def draft(ch: Chance) -> DraftTree:
        tokens, rows = [0], [torch.zeros(V_EXACT, dtype=torch.float64)]
        for kind, arg in children:
            if kind == "point":
                tokens.append(arg)
                rows.append(torch.eye(V_EXACT, dtype=torch.float64)[arg])
            else:
                q = qs[arg] if kind == "q" else p_root
                tokens.append(ch.draw(q))
                rows.append(q)
        return DraftTree(tokens, [-1] + [0] * len(children), torch.stack(rows))

    assert_lossless(step_distribution(draft, p_of), p_of, V_EXACT, 2)
    points = [arg for kind, arg in children if kind == "point"]
    if len(points) == len(children) and len(set(points)) == len(points):  # also as a probs=None tree
        tree = DraftTree([0, *points], [-1] + [0] * len(points))
        assert_lossless(step_distribution(lambda ch: tree, p_of), p_of, V_EXACT, 2)


def test_edge_cases_are_exact():
    """Zeros where they hurt: r(x) = 0 for a drafted x, q(x) = 0 where p(x) > 0, disjoint supports, p one-hot."""
    d = dyadic
    cases = [  # (p at the node, [the q each child is drawn from, in order])
        (d([0, 8, 8, 0], 16), [d([8, 0, 4, 4], 16), d([0, 0, 0, 16], 16)]),  # r(x) = 0; q(x) = 0 < p(x)
        (d([16, 0, 0, 0], 16), [d([0, 8, 8, 0], 16), d([4, 4, 4, 4], 16)]),  # p one-hot, disjoint first q
        (d([4, 4, 4, 4], 16), [d([0, 0, 0, 16], 16), d([0, 0, 0, 16], 16)]),  # the same one-hot q twice
        (d([2, 6, 8, 0], 16), [d([2, 6, 8, 0], 16), d([2, 6, 8, 0], 16)]),  # q = p: residual sums to 0
        (d([2, 6, 8, 0], 16), [d([8, 0, 4, 4], 16)] * 3),  # i.i.d. from a shared q: residual renormalised
    ]
    table = table_p(V_EXACT, seed=1)
    for p_root, qs in cases:

        def p_of(path, p_root=p_root):
            return p_root if not path else table(path)

        def draft(ch, qs=qs):
            tokens = [0] + [ch.draw(q) for q in qs]
            rows = torch.stack([torch.zeros(V_EXACT, dtype=torch.float64), *qs])
            return DraftTree(tokens, [-1] + [0] * len(qs), rows)

        assert_lossless(step_distribution(draft, p_of), p_of, V_EXACT, 2)


def test_two_levels_are_exact():
    """Depth 2: q at every node conditioned on its path; a point mass beside sampled children; a probs=None tree."""
    vocab = 3
    p_of, q_of = table_p(vocab, seed=2), table_p(vocab, seed=3)

    def draft(ch: Chance) -> DraftTree:
        a = ch.draw(q_of(()))
        one_hot = torch.eye(vocab, dtype=torch.float64)
        tokens, parents, rows = [0, a, 2], [-1, 0, 0], [one_hot[0], q_of(()), one_hot[2]]
        for node, path in ((1, (a,)), (2, (2,))):
            for _ in range(2):  # two i.i.d. children from q(path)
                tokens.append(ch.draw(q_of(path)))
                parents.append(node)
                rows.append(q_of(path))
        return DraftTree(tokens, parents, torch.stack(rows))

    assert_lossless(step_distribution(draft, p_of), p_of, vocab, 3)
    points = DraftTree([0, 1, 2, 0, 1, 2], [-1, 0, 0, 1, 1, 2])
    assert_lossless(step_distribution(lambda ch: points, p_of), p_of, vocab, 3)


def test_enumerator_catches_a_broken_rule(monkeypatch):
    """The exact check has teeth: resampling from p instead of the residual is off by far more than 1e-9."""
    p_root, q = dyadic([2, 6, 8, 0], 16), dyadic([8, 0, 4, 4], 16)
    table = table_p(V_EXACT)

    def p_of(path):
        return p_root if not path else table(path)

    def draft(ch):
        return DraftTree([0, ch.draw(q)], [-1, 0], torch.stack([q, q]))

    monkeypatch.setattr(torch.Tensor, "clamp_min_", lambda self, v: self * 0 + p_root)  # residual := p
    emitted = step_distribution(draft, p_of)
    with pytest.raises(AssertionError):
        assert_lossless(emitted, p_of, V_EXACT, 2)


# ---------------------------------------------------------------------------------------------------------------
# 3. Statistics on a tiny-vocabulary model: verify_sampled directly, then the engine end to end

V = 8
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats: prompt lookup drafts "3 1 2 ..."
PLAIN = SamplingParams(temperature=1.0)
WARPED = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)  # p and q with zeros


def vocab_model(seed: int):
    m = tiny.model("llama", seed=seed, vocab_size=V, hidden=16, layers=1)
    with torch.no_grad():  # mean entropy ~1.2 nats (uniform: 2.08): neither uniform nor one-hot
        m.lm_head.weight.mul_(3.0)
    return m


def word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class Continuations:
    """Raw logits of a model after PROMPT + s for every s shorter than `length`, and exact distributions."""

    def __init__(self, model, length: int) -> None:
        self.length = length
        self.logits: dict[tuple[int, ...], torch.Tensor] = {}
        for k in range(length):
            seqs = list(itertools.product(range(V), repeat=k))
            with torch.inference_mode():
                rows = model(torch.tensor([PROMPT + list(s) for s in seqs])).logits[:, -1]
            self.logits.update(zip(seqs, rows, strict=True))
        self._p: dict = {}

    def p(self, params: SamplingParams) -> dict[tuple[int, ...], torch.Tensor]:
        """Processed p after every context (as the engine computes it, from the raw logits)."""
        key = (params.temperature, params.top_k, params.top_p)
        if key not in self._p:
            dist = TargetDistribution(params)
            self._p[key] = {s: dist(row[None])[0] for s, row in self.logits.items()}
        return self._p[key]

    def ranked(self, params: SamplingParams) -> dict[tuple[int, ...], list[int]]:
        """Tokens after every context, most likely first."""
        key = ("ranked", params.temperature, params.top_k, params.top_p)
        if key not in self._p:
            self._p[key] = {
                s: row.argsort(descending=True, stable=True).tolist() for s, row in self.p(params).items()
            }
        return self._p[key]

    def exact(self, params: SamplingParams) -> dict[tuple[int, ...], float]:
        """Probability of every `length`-token continuation (products of p, float64)."""
        p = self.p(params)
        probs = {(): 1.0}
        for _ in range(self.length):
            probs = {s + (x,): w * float(p[s][x]) for s, w in probs.items() for x in range(V)}
        total = sum(probs.values())
        return {s: w / total for s, w in probs.items()}


# This section's models, tokenizer and exact continuations: module fixtures, built when a test first asks.
@pytest.fixture(scope="module")
def target():
    return vocab_model(0)


@pytest.fixture(scope="module")
def other():
    return vocab_model(1)


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def direct(target) -> Continuations:
    return Continuations(target, 3)  # a verify step of depth <= 2 emits <= 3 tokens


@pytest.fixture(scope="module")
def direct_other(other) -> Continuations:
    return Continuations(other, 3)


@pytest.fixture(scope="module")
def engine(target) -> Continuations:
    return Continuations(target, 4)  # the prefill's token, then a tree of depth <= 2


def chi_square_pvalue(
    counts: Counter, exact: dict[tuple[int, ...], float], min_expected: float = 5.0
) -> float:
    """Pearson's test of `counts` against `exact`; cells expecting < `min_expected` are pooled into one."""
    n = sum(counts.values())
    if any(exact.get(s, 0.0) == 0.0 for s in counts):
        return 0.0  # an impossible continuation was produced (e.g. a token top-k removed)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for s in sorted(exact, key=exact.get, reverse=True):
        e = n * exact[s]
        if e >= min_expected:
            observed.append(counts[s])
            expected.append(e)
        else:
            pool_o += counts[s]
            pool_e += e
    if pool_e >= min_expected:
        observed.append(pool_o)
        expected.append(pool_e)
    else:  # too little to stand alone: fold into the last kept cell
        observed[-1] += pool_o
        expected[-1] += pool_e
    return scipy.stats.chisquare(observed, expected).pvalue


# Broken rules: the same signature as verify_sampled, wrong on purpose.


def accept_everything(tree: DraftTree, logits, dist, generator) -> Verdict:
    """BROKEN: take the first child at every node without a test, then sample a bonus from p at the leaf."""
    path = [0]
    while tree.children[path[-1]]:
        path.append(tree.children[path[-1]][0])
    bonus = int(torch.multinomial(dist(logits[path[-1]][None])[0], 1, generator=generator))
    return Verdict(path, [tree.tokens[i] for i in path[1:]] + [bonus])


def residual_is_p(tree: DraftTree, logits, dist, generator) -> Verdict:
    """BROKEN: the right tests, but after a rejection the next child and the bonus use p, not the residual."""
    p = dist(logits)
    path = [0]
    while True:
        node = path[-1]
        for c in tree.children[node]:
            x = tree.tokens[c]
            q_x = 1.0 if tree.probs is None else float(tree.probs[c, x])
            if torch.rand((), generator=generator, dtype=torch.float64).item() * q_x < float(p[node, x]):
                path.append(c)
                break
        else:
            bonus = int(torch.multinomial(p[node], 1, generator=generator))
            return Verdict(path, [tree.tokens[i] for i in path[1:]] + [bonus])


# Trees for the direct test. Kinds of child: "other" drawn from another model's q, "self" drawn from the
# target's own p (q = p), "topI" a point mass on the other model's I-th most likely token.
SHAPES = {
    "point masses (probs=None)": [["top0", "top1", "top2"], ["top0", "top1"]],
    "chain from another model": [["other"], ["other"]],
    "i.i.d. children, shared q": [["other", "other", "other"], ["other", "other"]],
    "mixed: q, p and a point mass": [["other", "self", "top0"], ["top0", "other"]],
}
EYE = torch.eye(V)


class Sampler:
    """Fast draws for the harness's own drafting and continuation (not the code under test): Python's RNG
    over precomputed cumulative weights costs ~1 us, torch.multinomial on one row ~20 us."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.cum: dict[int, list[float]] = {}

    def draw(self, row: torch.Tensor) -> int:
        key = id(row)  # rows live in the Continuations caches (module fixtures) for the whole module
        if key not in self.cum:
            self.cum[key] = list(itertools.accumulate(row.double().tolist()))
        return self.rng.choices(range(V), cum_weights=self.cum[key])[0]


def draft_tree(
    shape: list[list[str]],
    params: SamplingParams,
    sampler: Sampler,
    target: Continuations,
    drafter: Continuations,
):
    """(tree, the drafted path after the root of every node); shape[d] lists each depth-d node's children."""
    p, q, ranked = target.p(params), drafter.p(params), drafter.ranked(params)
    point_only = all(kind.startswith("top") for kinds in shape for kind in kinds)
    tokens, parents, rows, paths = [PROMPT[-1]], [-1], [EYE[0]], [()]
    frontier = [0]
    for kinds in shape:
        nxt = []
        for node in frontier:
            ctx = paths[node]
            for kind in kinds:
                if kind in ("other", "self"):
                    row = q[ctx] if kind == "other" else p[ctx]
                    tok = sampler.draw(row)
                else:
                    tok = ranked[ctx][int(kind[3:])]
                    row = None if point_only else EYE[tok]
                tokens.append(tok)
                parents.append(node)
                rows.append(row)
                paths.append(ctx + (tok,))
                nxt.append(len(tokens) - 1)
        frontier = nxt
    return DraftTree(tokens, parents, None if point_only else torch.stack(rows)), paths


def direct_counts(
    shape,
    params: SamplingParams,
    target: Continuations,
    drafter: Continuations,
    verify=verify_sampled,
    n: int = 20_000,
    seed: int = 0,
):
    """n independent steps: draft a tree, verify it on the target's logits, continue to 3 tokens from p."""
    generator, sampler = torch.Generator().manual_seed(seed), Sampler(seed)
    dist, p = TargetDistribution(params), target.p(params)
    counts: Counter = Counter()
    for _ in range(n):
        tree, paths = draft_tree(shape, params, sampler, target, drafter)
        logits = torch.stack([target.logits[path] for path in paths])
        seq = verify(tree, logits, dist, generator).tokens
        while len(seq) < 3:
            seq.append(sampler.draw(p[tuple(seq)]))
        counts[tuple(seq)] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "params"),
    [pytest.param(shape, PLAIN, id=shape) for shape in SHAPES if not shape.startswith("mixed")]
    + [pytest.param("mixed: q, p and a point mass", WARPED, id="mixed, temperature + top-k + top-p")],
)
def test_verify_sampled_matches_the_exact_distribution(direct, direct_other, shape, params):
    """20 000 steps per case; under top-k/top-p, p and q have zeros and a zero-probability output fails."""
    counts = direct_counts(SHAPES[shape], params, direct, direct_other)
    assert chi_square_pvalue(counts, direct.exact(params)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broken", "shape"),
    [
        (accept_everything, "chain from another model"),
        (residual_is_p, "chain from another model"),
        (residual_is_p, "point masses (probs=None)"),
    ],
)
def test_the_direct_test_rejects_broken_rules(direct, direct_other, broken, shape):
    counts = direct_counts(SHAPES[shape], PLAIN, direct, direct_other, verify=broken)
    assert chi_square_pvalue(counts, direct.exact(PLAIN)) < 1e-3


class PointMassTree(Drafter):
    """Scripted: three distinct guesses at the root, two under each, all deterministic (probs=None)."""

    name = "test-point-tree"

    def propose(self, state, context, max_depth):
        root = context[-1]
        firsts = [(root + d) % V for d in (1, 3, 6)]
        return DraftTree.from_sequences(root, [[a, b] for a in firsts for b in ((a + 2) % V, (a + 5) % V)])


class SampledTree(Drafter):
    """Scripted: two i.i.d. children from a fixed q beside a point mass, at the root and under its first child.

    q is a random table indexed by the parent's token; draws use the call's generator, as drafters must.
    """

    name = "test-sampled-tree"
    samples_drafts = True

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.q = torch.softmax(2.0 * torch.randn(V, V, generator=g), dim=-1)  # [V, V], rows sum to 1

    def start(self, request):
        return request.generator  # the only per-generation state: where draws come from

    def propose(self, generator, context, max_depth):
        tokens, parents, rows = [context[-1]], [-1], [torch.zeros(V)]
        for node in (0, 1)[:max_depth]:
            q = self.q[tokens[node]]
            for row in (q, q, torch.eye(V)[int(q.argmax())]):
                tokens.append(int(torch.multinomial(row, 1, generator=generator)))
                parents.append(node)
                rows.append(row)
        return DraftTree(tokens, parents, torch.stack(rows))


@pytest.fixture(scope="module")
def decoder(target, other, word_tok) -> Callable[[str], SpecDecoder]:
    """A fresh decoder on `target` for `method` at each call, or for one of the scripted drafters above."""

    def make(method: str) -> SpecDecoder:
        if method == "draft (another model)":
            return SpecDecoder(target, word_tok, "draft", draft_model=other)
        if method == "draft (the target itself)":
            return SpecDecoder(target, word_tok, "draft", draft_model=target)
        if method == PointMassTree.name:
            return SpecDecoder(target, word_tok, PointMassTree())
        if method == SampledTree.name:
            return SpecDecoder(target, word_tok, SampledTree())
        if REGISTRY[method].reads.any:  # trained heads: an untrained one drafts for target
            return SpecDecoder(target, word_tok, method, head=tiny.untrained_head(method, target))
        return SpecDecoder(target, word_tok, method)

    return make


ENGINE_METHODS = [m for m in methods() if not REGISTRY[m].needs_draft_model] + [
    "draft (another model)",
    "draft (the target itself)",
    SampledTree.name,  # (PointMassTree reproduces vanilla exactly: see the next tests)
]
ENGINE_SAMPLES = 400


def engine_counts(dec: SpecDecoder, params: SamplingParams, n: int = ENGINE_SAMPLES) -> Counter:
    kwargs = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    counts: Counter = Counter()
    for seed in range(n):
        out = dec.generate(PROMPT, max_new_tokens=4, ignore_eos=True, seed=seed, **kwargs)
        counts[tuple(out.token_ids)] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_engine_matches_the_exact_distribution(decoder, engine, method):
    """400 seeded generations of 4 tokens per method (every registered drafter that needs no extra model)."""
    params = WARPED if method == SampledTree.name else PLAIN
    assert chi_square_pvalue(engine_counts(decoder(method), params), engine.exact(params)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broken", "method"), [(accept_everything, "pld"), (residual_is_p, PointMassTree.name)]
)
def test_the_engine_test_rejects_broken_rules(decoder, engine, monkeypatch, broken, method):
    monkeypatch.setattr("specdec.engine.verify_sampled", broken)
    counts = engine_counts(decoder(method), PLAIN)
    assert chi_square_pvalue(counts, engine.exact(PLAIN)) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("params", [PLAIN, WARPED], ids=["plain", "top-k + top-p"])
def test_point_mass_drafters_reproduce_generate_token_for_token(decoder, target, params):
    """One draw y ~ p per emitted token, in order: the same tokens as vanilla and as transformers' sampler."""
    kwargs = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    decoders = {m: decoder(m) for m in ("vanilla", "pld", PointMassTree.name)}
    accepted = Counter()
    ids = torch.tensor([PROMPT])
    for seed in range(8):
        torch.manual_seed(seed)
        hf = target.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=24, eos_token_id=None,
            pad_token_id=0, **kwargs,
        )[0, len(PROMPT) :].tolist()  # fmt: skip
        for method, dec in decoders.items():
            out = dec.generate(PROMPT, max_new_tokens=24, ignore_eos=True, seed=seed, **kwargs)
            assert out.token_ids == hf, method
            accepted[method] += sum(out.stats.accepted_by_depth)
    assert accepted["pld"] > 0 and accepted[PointMassTree.name] > 0  # drafts were accepted, not just scored


# ---------------------------------------------------------------------------------------------------------------
# 4. Seeds


SEED_METHODS = ["vanilla", "pld", "draft (another model)", SampledTree.name]


@pytest.mark.parametrize("method", SEED_METHODS)
def test_seed_reproducibility_and_the_global_rng(decoder, method):
    """Same seed, same tokens (also after other calls, and on a fresh decoder); other seeds differ; the global
    torch RNG is neither read nor advanced, with a seed or without one."""
    dec = decoder(method)

    def run(seed, dec=dec):
        return dec.generate(PROMPT, max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=seed).token_ids

    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    first = run(7)
    others = [run(s) for s in (8, 9, 10)]
    unseeded = [run(None), run(None)]
    assert torch.equal(torch.rand(4), expected_next), "generate() used the global torch RNG"
    assert run(7) == first
    assert run(7, decoder(method)) == first
    assert len({tuple(t) for t in [first, *others]}) == 4
    assert unseeded[0] != unseeded[1]


# Through the batched path (specdec.batch): rows of one forward, each with its own seeded generator.

BATCH_METHODS = ["vanilla", "pld", "recycle", "auto", SampledTree.name]


def batch_counts(dec: SpecDecoder, params: SamplingParams, n: int = ENGINE_SAMPLES, rows: int = 8) -> Counter:
    from specdec.api import sampling_params
    from specdec.batch import run_batch

    counts: Counter = Counter()
    for first in range(0, n, rows):
        seeds = range(first, min(n, first + rows))
        batch_params = [
            sampling_params(
                max_new_tokens=4,
                ignore_eos=True,
                seed=seed,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
            )
            for seed in seeds
        ]
        for _, step in run_batch(dec.engine, [list(PROMPT)] * len(batch_params), batch_params):
            if step.result is not None:
                counts[tuple(step.result.token_ids)] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("method", BATCH_METHODS)
def test_batched_rows_match_the_exact_distribution(decoder, engine, method):
    """400 generations of 4 tokens, 8 rows a forward: each row's output has the target's distribution."""
    params = WARPED if method == SampledTree.name else PLAIN
    assert chi_square_pvalue(batch_counts(decoder(method), params), engine.exact(params)) > 1e-3


def test_the_batched_test_rejects_a_broken_rule(decoder, engine, monkeypatch):
    monkeypatch.setattr("specdec.engine.verify_sampled", accept_everything)
    assert chi_square_pvalue(batch_counts(decoder("pld"), PLAIN), engine.exact(PLAIN)) < 1e-3
