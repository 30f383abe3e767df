"""`auto`: the per-step choice of members and tree size, its bookkeeping, and that it stays lossless.

The cost model is injected (not measured) wherever a test needs the choice to go one way: on a shared CPU
timing is noise, and no assertion here depends on it. Also here: the draft model's break-even length
(`draft_model.py`), which `auto`'s `draft` member uses.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from specdec import Drafter, DraftTree, Request, SamplingParams, SpecDecoder
from specdec.acceptance import Verdict
from specdec.costmodel import CostModel, OnlineCost
from specdec.drafters.auto import (
    DEPTHS,
    PRIOR_RATE,
    PRIOR_TRIALS,
    RANKS,
    RETRY_GENERATIONS,
    Acceptance,
    Auto,
    Realized,
    plan,
    trials,
)
from specdec.drafters.base import Scored
from specdec.drafters.draft_model import BreakEven, Calibration, DraftModel
from specdec.drafters.eagle import Eagle
from specdec.drafters.recycle import TokenRecycling
from specdec.runtime import RuntimeChoice, select_runtime

import tiny

PROMPTS = ([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(40, 70)), [9])
FLAT = CostModel.fit([1, 64], [1e-3, 1e-3])  # verifying more tokens costs nothing: any useful node is drafted
STEEP = CostModel.fit([1, 2, 64], [1e-3, 1.0, 63.0])  # each drafted node costs a thousand plain steps


# Models in module fixtures: built when a test first asks for them, not at collection.
@pytest.fixture(scope="module")
def model():
    return tiny.model("llama", seed=0)


@pytest.fixture(scope="module")
def other_model():
    return tiny.model("llama", seed=7)  # a draft model that is often wrong


def native(model) -> RuntimeChoice:
    """The runtime an engine under `--runtime auto` binds auto to (auto picks llama.cpp per request itself)."""
    return select_runtime(model, "native")


def with_cost(drafter, cost: CostModel):
    """Fix the cost model: no measuring, no online refinement (for every runtime)."""
    drafter.config.cost = cost
    drafter.timings = {}
    return drafter


@pytest.fixture(scope="module")
def auto_decoder(model, tok) -> Callable[..., SpecDecoder]:
    """auto_decoder(target=model, cost=FLAT, drafter=None, **options): a decoder running `auto` (or `drafter`)
    under a fixed cost model."""

    def make(target=None, cost: CostModel = FLAT, drafter: Auto | None = None, **options) -> SpecDecoder:
        dec = SpecDecoder(model if target is None else target, tok, drafter or "auto", **options)
        with_cost(dec.drafter, cost)
        return dec

    return make


# ---------------------------------------------------------------------------------------------------------------
# Greedy: generate()'s tokens whatever is chosen


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("draft", [None, "same", "other"])
def test_auto_equals_generate(auto_decoder, arch, draft):
    model = tiny.model(arch, seed=1)
    draft_model = {None: None, "same": model, "other": tiny.model(arch, seed=5)}[draft]
    dec = auto_decoder(model, draft_model=draft_model)
    drafted = 0
    for prompt in PROMPTS:
        out = dec.generate(prompt, max_new_tokens=24)
        assert out.token_ids == tiny.hf_greedy(model, prompt, 24)
        drafted += out.stats.draft_nodes
    assert drafted > 0  # trees were verified, not only roots


def test_auto_with_an_eagle_member_equals_generate(auto_decoder):
    model = tiny.model("llama", seed=1, layers=4)
    dec = auto_decoder(model, head=tiny.random_head(model))
    assert [m.name for m in dec.drafter.members] == ["suffix", "pld", "recycle", "eagle"]
    assert dec.drafter.hidden_layers() == tuple(sorted(dec.drafter.members[-1].hidden_layers()))
    ran = 0
    for prompt in PROMPTS:
        out = dec.generate(prompt, max_new_tokens=20)
        assert out.token_ids == tiny.hf_greedy(model, prompt, 20)
        ran += out.stats.drafter["ran"]["eagle"]
    assert ran > 0


def heads_members(model) -> list:
    from specdec.drafters.hydra import Hydra
    from specdec.drafters.medusa import Medusa

    return ["suffix", "pld", Hydra(head=tiny.random_hydra(model)), Medusa(head=tiny.random_medusa(model))]


@pytest.mark.parametrize("runtime", ["native", "llamacpp"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_auto_with_head_members_stays_lossless(auto_decoder, runtime, temperature):
    """Hydra and Medusa as members, on native (the prompt's hidden states at prefill) and on llama.cpp (the
    final hidden state from the first verification on): greedy equals generate(); sampled runs are checked for
    running at all here (their distribution: the sampling tests below, whatever the members propose)."""
    model = tiny.model("llama", seed=1, dtype=torch.float32)
    dec = auto_decoder(model, drafter=Auto(members=heads_members(model)), runtime=runtime)
    assert [m.name for m in dec.drafter.members] == ["suffix", "pld", "hydra", "medusa"]
    ran = Counter()
    for prompt in PROMPTS:
        out = dec.generate(prompt, max_new_tokens=20, temperature=temperature, seed=0)
        assert out.stats.runtime == runtime and len(out.token_ids) == 20
        if temperature == 0:
            assert out.token_ids == tiny.hf_greedy(model, prompt, 20)
        ran.update(out.stats.drafter["ran"])
    assert ran["hydra"] > 0 and ran["medusa"] > 0


def test_a_given_head_joins_the_member_of_its_kind(model):
    hydra = tiny.random_hydra(model)
    auto = Auto(head=hydra)
    by_name = {m.name: m for m in auto.candidates}
    assert by_name["hydra"].config.head is hydra
    assert by_name["medusa"].config.head is None and by_name["eagle"].config.head is None  # the shipped ones


def test_a_member_that_never_runs_never_starts(auto_decoder):
    """pld and suffix start at their first run (nothing indexed in a generation they sit out); recycle, which
    learns its table from every verification, starts with the generation."""
    from specdec.drafters.pld import PromptLookup

    pld, started = PromptLookup(), []
    start = pld.start
    pld.start = lambda request: started.append(len(request.prompt_ids)) or start(request)  # type: ignore
    dec = auto_decoder(drafter=Holdout("pld", 12, members=["suffix", pld, "recycle"]))
    prompt = PROMPTS[1]
    dec.generate(prompt, max_new_tokens=8)
    assert not started
    out = dec.generate(prompt, max_new_tokens=20)
    assert started == [len(prompt)] and out.stats.drafter["ran"]["pld"] > 0
    assert out.token_ids == tiny.hf_greedy(dec.model, prompt, 20)


def test_hidden_states_are_read_only_while_a_member_reading_them_takes_part(auto_decoder, monkeypatch):
    """With its heads members benched, auto's forwards return no hidden states (cheaper on llama.cpp)."""
    from specdec.engine import Decoding

    model = tiny.model("llama", seed=1, dtype=torch.float32)
    dec = auto_decoder(model, drafter=Auto(members=heads_members(model)))
    asked = []
    wanted = Decoding.wanted
    monkeypatch.setattr(
        Decoding, "wanted", lambda self, layers: asked.append(wanted(self, layers)) or asked[-1]
    )
    dec.generate(PROMPTS[1], max_new_tokens=8)
    assert asked[0] and asked[1]  # on trial: the prefill and the first forward return the final hidden state
    monkeypatch.setattr(Auto, "pays_its_keep", lambda self, i, lift, timing: self.members[i].name == "suffix")
    profile = dec.drafter.profile(0.0)
    profile.lifts = [1.0] * len(profile.lifts)  # measured, and not paying: benched at the start
    asked.clear()
    out = dec.generate(PROMPTS[1], max_new_tokens=8)
    assert {"hydra", "medusa"} <= set(out.stats.drafter["benched"])
    assert asked and not any(asked)
    assert out.token_ids == tiny.hf_greedy(model, PROMPTS[1], 8)


def test_when_no_tree_pays_it_decodes_plainly_through_the_same_engine(model, auto_decoder):
    dec = auto_decoder(cost=STEEP)
    for prompt in PROMPTS:
        out = dec.generate(prompt, max_new_tokens=16)
        assert out.token_ids == tiny.hf_greedy(model, prompt, 16)
        assert out.stats.draft_nodes == 0 and out.stats.target_forwards == 16
        assert out.stats.drafter["chosen"]["none"] == 16


# ---------------------------------------------------------------------------------------------------------------
# The choice rule


def test_plan_takes_every_node_that_pays_and_none_that_does_not():
    cost = CostModel.fit([1, 2, 64], [10e-3, 11e-3, 73e-3])  # 10 ms, then 1 ms per node
    sure = [0.9**d for d in range(1, 9)]  # a chain that is almost always right
    n, gain, rate = plan(sure, cost, overhead=0.0)
    assert n == 8 and gain == pytest.approx(sum(sure)) and rate > 1 / 10e-3
    assert plan([0.02] * 8, cost, overhead=0.0)[0] == 0  # 2% for 10% more time: plain decoding
    # in between, the prefix stops where the next node's chance no longer pays for its 1 ms
    assert plan([0.9, 0.5, 0.25, 0.05, 0.01], cost, overhead=0.0)[0] == 3
    # a fixed cost per step (overhead) makes the same node worth more: the forward is a smaller share
    assert plan([0.09], cost, overhead=0.0)[0] == 0 and plan([0.09], cost, overhead=10e-3)[0] == 1


def test_a_tree_that_promised_more_than_it_delivered_raises_the_bar():
    """Steps with drafts that realize half the tokens per second they promised, while plain steps go as
    predicted: a tree must then promise about twice plain decoding's rate; steps that deliver what they
    promise bring the bar back to 1, and a machine slowing every step alike leaves it there."""
    cost = CostModel.fit([1, 2, 64], [10e-3, 11e-3, 73e-3])
    realized = Realized()
    assert realized.bar == 1.0  # nothing seen: no correction
    for _ in range(200):
        realized.record(False, 1.0, 10e-3, 1, 10e-3)
        realized.record(True, 2.0, 12e-3, 1, 12e-3)  # promised 2 tokens, got 1
    assert realized.bar == pytest.approx(2.0, rel=0.05)
    values = [0.9, 0.3]  # 2.2 tokens in 13 ms: 1.7x plain decoding's rate on paper
    assert plan(values, cost, overhead=0.0)[0] == 2
    n, _, rate = plan(values, cost, overhead=0.0, bar=realized.bar)
    assert n == 0 and rate == pytest.approx(1 / 10e-3)  # plain decoding, at its own rate
    for _ in range(300):
        realized.record(False, 1.0, 10e-3, 1, 10e-3)
        realized.record(True, 2.0, 12e-3, 2, 12e-3)
    assert realized.bar == pytest.approx(1.0, abs=0.01)
    for _ in range(300):  # every step 1.5x slower than predicted, drafted or not
        realized.record(False, 1.0, 10e-3, 1, 15e-3)
        realized.record(True, 2.0, 12e-3, 2, 18e-3)
    assert realized.bar == pytest.approx(1.0, abs=0.01)


class Fixed(Drafter):
    """Proposes the same continuations at every step (the tests' stand-in for a retrieval drafter)."""

    mergeable = True

    def __init__(self, name: str, sequences: list[list[int]]) -> None:
        self.name, self.sequences = name, sequences

    def propose(self, state, context, max_depth) -> DraftTree:
        return DraftTree.from_sequences(context[-1], self.sequences).truncate_depth(max_depth)


def set_acceptance(acceptance: Acceptance, rate: float) -> None:
    """Fake acceptance: every cell of every member measured at `rate` over 1000 trials, calibration 1."""
    for m in range(len(acceptance.hits)):
        for d in range(DEPTHS):
            for r in range(RANKS):
                acceptance.hits[m][d][r], acceptance.trials[m][d][r] = 1000 * rate, 1000.0
        acceptance.tables[m] = None
    acceptance.accepted = acceptance.expected = 1000.0


@pytest.mark.parametrize(("rate", "expected_nodes"), [(0.95, 7), (0.01, 0)])
def test_auto_picks_the_merged_tree_when_acceptance_is_high_and_nothing_when_low(model, rate, expected_nodes):
    a = Fixed("a", [[11, 12, 13, 14], [15]])
    b = Fixed("b", [[11, 12, 20], [16]])  # shares 11 12 with a: merged, 7 distinct nodes in all
    auto = Auto(members=[a, b])
    auto.bind(model, native(model))
    with_cost(auto, CostModel.fit([1, 2, 64], [10e-3, 11e-3, 73e-3]))
    state = auto.start(Request([1, 2, 3], SamplingParams(), torch.Generator()))
    set_acceptance(state.acceptance, rate)
    tree = auto.propose(state, [1, 2, 3], max_depth=8)
    assert len(tree) - 1 == expected_nodes
    if expected_nodes:
        paths = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))}
        assert {(11, 12, 13, 14), (15,), (11, 12, 20), (16,)} <= paths


def test_a_member_not_worth_running_is_still_probed_now_and_then(model):
    auto = Auto(members=[Fixed("a", [[11]])])
    auto.bind(model, native(model))
    with_cost(auto, STEEP)
    state = auto.start(Request([1, 2, 3], SamplingParams(), torch.Generator()))
    assert auto.probe_due(state, 0)  # nothing is known about a new member: it runs at once
    auto.seconds[0] = 1e-3  # as slow as a plain step: a probe may cost 0.2% of the time, so every 500 steps
    state.members[0].idle = 490
    assert not auto.probe_due(state, 0)
    state.members[0].idle = 510
    assert auto.probe_due(state, 0)


def test_online_cost_scales_with_a_lasting_change_and_shrugs_off_a_stall():
    base = CostModel.fit([1, 8, 64], [10e-3, 14e-3, 30e-3])
    cost = OnlineCost(base)
    for _ in range(60):  # the machine (or the context) got 1.5x slower; only plain steps are timed
        cost.update(1, 15e-3)
    for n in (1, 8, 64):  # every size follows, not just the one timed
        assert cost(n) == pytest.approx(1.5 * base(n), rel=0.1)
    before = cost(8)
    cost.update(8, 10.0)  # one stall of 10 s
    assert cost(8) < 1.2 * before
    frozen = OnlineCost(base, rate=0.0)
    frozen.update(1, 1.0)
    assert frozen(1) == base(1)


def test_trials_walk_the_members_own_tree_along_the_emitted_tokens():
    tree = DraftTree.from_sequences(0, [[1, 2, 3], [1, 4], [5]])
    # emitted 1 2 9: depth 0 has children 1 (hit) and 5, depth 1 children 2 (hit) and 4, depth 2 child 3 (miss)
    assert list(trials(tree, [1, 2, 9])) == [
        (0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False), (2, 0, False),
    ]  # fmt: skip
    assert list(trials(tree, [7])) == [(0, 0, False), (0, 1, False)]  # the truth beyond depth 0 is unknown


# ---------------------------------------------------------------------------------------------------------------
# Members that sat out


class Holdout(Auto):
    """Keeps the member named `held` out for the first `hold` steps of every generation."""

    def __init__(self, held: str, hold: int, **options) -> None:
        super().__init__(**options)
        self.held, self.hold = held, hold

    def should_run(self, state, i, plain=None) -> bool:
        if self.members[i].name == self.held:
            return state.steps >= self.hold
        return super().should_run(state, i, plain)


def spy_propose(member: Drafter, snapshot=lambda state: None) -> list:
    """Records (context, tree, snapshot(state) before proposing) for every call of member.propose."""
    calls = []
    propose = member.propose

    def spy(state, context, max_depth):
        before = snapshot(state)
        tree = propose(state, context, max_depth)
        calls.append((list(context), tree, before))
        return tree

    member.propose = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_model_left_out_for_many_steps_drafts_correctly_when_chosen_again(
    model, other_model, auto_decoder, temperature
):
    member = DraftModel(other_model, break_even=False, adaptive=False, num_tokens=4)
    calls = spy_propose(member)
    dec = auto_decoder(drafter=Holdout("draft", 8, members=["pld", "recycle", member]))
    prompt = PROMPTS[1]
    out = dec.generate(prompt, max_new_tokens=64, temperature=temperature, seed=0)
    if temperature == 0:
        assert out.token_ids == tiny.hf_greedy(model, prompt, 64)
    assert out.stats.target_forwards > 8 and calls  # it ran after sitting out 8 steps
    assert len(calls[0][0]) >= len(prompt) + 8
    for context, tree, _ in calls:
        chain = tree.tokens[1:]
        assert chain, "a fixed length of 4"
        if temperature == 0:  # its cache caught up with every token it had not seen: its own greedy chain
            assert chain == tiny.hf_greedy(other_model, context, len(chain))
        else:  # sampled: q at each node is the draft's distribution after the context and the drafts before it
            with torch.inference_mode():
                logits = other_model(torch.tensor([context + chain[:-1]])).logits[0, len(context) - 1 :]
            torch.testing.assert_close(
                tree.probs[1:], torch.softmax(logits.float(), -1), rtol=1e-5, atol=1e-6
            )


def test_an_eagle_head_left_out_keeps_its_feature_cache_complete(auto_decoder):
    model = tiny.model("llama", seed=1, layers=4)
    member = Eagle(head=tiny.random_head(model), max_nodes=8)
    calls = spy_propose(member, lambda state: (state.committed, state.cache.length, state.root_pos))
    dec = auto_decoder(model, drafter=Holdout("eagle", 10, members=["pld", member]))
    prompt = PROMPTS[1]
    out = dec.generate(prompt, max_new_tokens=30)
    assert out.token_ids == tiny.hf_greedy(model, prompt, 30)
    assert calls and len(calls[0][0]) >= len(prompt) + 10
    for context, _, (committed, entries, root_pos) in calls:  # one entry per verified position, then the root
        assert committed == entries == root_pos == len(context) - 1


def test_recycle_left_out_keeps_learning_its_table(auto_decoder):
    recycle = TokenRecycling()
    calls = spy_propose(recycle)
    dec = auto_decoder(drafter=Holdout("recycle", 1000, members=["pld", recycle]))
    prompt = PROMPTS[1]
    out = dec.generate(prompt, max_new_tokens=20)
    assert not calls  # never ran
    roots = [prompt[-1], *out.token_ids[:-1]]  # every step scored its root: each root's row was written
    assert recycle.seen is not None and all(bool(recycle.seen[t]) for t in roots)
    assert int(recycle.table[roots[-1], 0]) == out.token_ids[-1]  # the target's top-1 after the last root


class Clock:
    """An injected clock for auto's own timing: time passes only where a test says so, so a loaded machine
    cannot change what auto measures of its members."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costly(Fixed):
    """Proposes the same wrong guesses every step and takes 20 ms (on `clock`) to observe each verification."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("costly", [[1, 2], [3]])
        self.clock, self.observed = clock, 0

    def observe(self, state, scored) -> None:
        self.observed += 1
        self.clock.now += 0.02


def test_a_member_that_does_not_pay_its_keep_is_benched_and_retried_later(model, auto_decoder):
    clock = Clock()
    costly = Costly(clock)
    dec = auto_decoder(drafter=Auto(members=["pld", costly], clock=clock))
    prompt = PROMPTS[1]
    out = dec.generate(prompt, max_new_tokens=16)
    assert out.token_ids == tiny.hf_greedy(model, prompt, 16)
    assert out.stats.drafter["benched"] == ["costly"] and costly.observed < 4
    for generation in range(RETRY_GENERATIONS + 1):  # benched from the start for a while, then on trial
        out = dec.generate(prompt, max_new_tokens=4)
        assert out.stats.drafter["ran"]["costly"] == (generation == RETRY_GENERATIONS)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def test_a_sampled_draft_is_verified_alone_and_point_masses_are_merged(model, auto_decoder, monkeypatch):
    member = DraftModel(
        model, break_even=False, adaptive=False, num_tokens=3
    )  # the target itself: a sure bet
    dec = auto_decoder(drafter=Auto(members=["pld", "recycle", member]))
    auto = dec.drafter
    choices = []
    count = auto._count
    monkeypatch.setattr(auto, "_count", lambda state, choice: (choices.append(choice), count(state, choice)))
    # the draft every other step, the others every step
    monkeypatch.setattr(
        auto, "should_run", lambda state, i, plain=None: auto.members[i].name != "draft" or state.steps % 2
    )
    for seed in range(3):
        dec.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=seed)
    draft = [m.name for m in auto.members].index("draft")
    sampled = [c for c in choices if c.tree.probs is not None]
    merged = [c for c in choices if c.tree.probs is None and len(c.tree) > 1]
    assert sampled and all(c.members == [draft] for c in sampled)
    assert merged and all(draft not in c.members for c in merged)


class RandomGate(Auto):
    """Runs each member with probability 1/2 (its own RNG): every combination of trees gets verified. Wall
    time plays no part (no step overhead, no realized-rate bar, no benching): on a slow or busy machine the
    bar rose to its cap and nearly every step decoded plainly, so the test exercised little else."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.rng = random.Random(0)

    def should_run(self, state, i, plain=None) -> bool:
        return self.rng.random() < 0.5

    def _time_overhead(self, state, now) -> None:
        pass

    def pays_its_keep(self, i, lift, timing) -> bool:
        return True


@pytest.mark.slow
def test_auto_samples_the_exact_distribution_whatever_it_chooses():
    """As test_sampling's engine test (400 seeded generations of 4 tokens, chi-square against the exact
    distribution), with choices that vary step to step: merged point masses (a head's among them), a sampled
    draft alone, nothing."""
    import test_sampling as ts
    from specdec.drafters.hydra import Hydra

    target, other = ts.vocab_model(0), ts.vocab_model(1)  # test_sampling's target and other model
    members = ["pld", "suffix", "recycle", "draft", Hydra(head=tiny.random_hydra(target))]
    auto = with_cost(RandomGate(members=members, draft_model=other), FLAT)
    dec = SpecDecoder(target, ts.word_tokenizer(), auto)
    counts: Counter = Counter()
    kinds = set()
    for seed in range(400):
        out = dec.generate(ts.PROMPT, max_new_tokens=4, ignore_eos=True, seed=seed, temperature=1.0)
        counts[tuple(out.token_ids)] += 1
        kinds |= {name for name, n in out.stats.drafter["chosen"].items() if n}
    assert {"none", "draft", "pld", "suffix", "recycle", "hydra"} <= kinds
    assert ts.chi_square_pvalue(counts, ts.Continuations(target, 4).exact(ts.PLAIN)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# What it reports


def test_stats_report_the_choices_tree_size_and_cost_fit(other_model, auto_decoder, caplog):
    dec = auto_decoder(draft_model=other_model)
    with caplog.at_level(logging.DEBUG, logger="specdec.auto"):
        out = dec.generate(PROMPTS[0], max_new_tokens=20)
    s = out.stats
    report = s.drafter
    assert report["steps"] == s.target_forwards
    assert set(report["chosen"]) == {"pld", "suffix", "recycle", "draft", "none"}
    assert all(0 <= n <= s.target_forwards for n in report["chosen"].values())
    assert report["mean_tree_nodes"] == pytest.approx(s.draft_nodes / s.target_forwards)
    assert report["accepted"] == sum(s.accepted_by_depth)
    assert report["cost_model"]["sizes"] == [1, 64] and len(report["cost_model"]["current_ms"]) == 2
    assert "eagle" in report["left_out"]  # no head for this model
    assert json.loads(json.dumps(s.to_dict()))["drafter"] == report
    steps = [
        r.getMessage() for r in caplog.records if r.name == "specdec.auto" and ": ran " in r.getMessage()
    ]
    assert len(steps) == s.target_forwards and steps[0].startswith("step 1: ran ")


def test_other_drafters_report_nothing(model, tok):
    out = SpecDecoder(model, tok, "pld").generate(PROMPTS[0], max_new_tokens=4)
    assert out.stats.drafter == {}


def test_members_follow_what_was_given(other_model):
    names = [m.name for m in Auto().members]  # not bound yet: candidates only
    assert names == []
    heads = ["eagle", "hydra", "medusa"]
    assert [m.name for m in Auto().candidates] == ["suffix", "pld", "recycle", *heads]  # no draft model
    assert [m.name for m in Auto(draft_model=other_model).candidates] == [
        "suffix",
        "pld",
        "recycle",
        "draft",
        *heads,
    ]
    with pytest.raises(ValueError, match="unknown member"):
        Auto(members="pld,nonsense")
    with pytest.raises(ValueError, match="lookahead"):  # its window must be verified whole
        Auto(members="pld,lookahead")


def test_warm_start_carries_at_most_warm_weight_trials_per_cell():
    shared = Acceptance(1)
    for _ in range(100):
        shared.record(0, 0, 0, True, memory=1.0)
    warm = shared.warm_copy(8.0)
    assert warm.trials[0][0][0] == pytest.approx(8.0) and warm.hits[0][0][0] == pytest.approx(8.0)
    assert warm.table(0)[0][0] == pytest.approx((8 + PRIOR_TRIALS * PRIOR_RATE) / (8 + PRIOR_TRIALS))
    # a deeper cell nothing was learned for borrows the rate above it; another rank keeps the prior
    assert warm.table(0)[1][0] == pytest.approx(warm.table(0)[0][0])
    assert warm.table(0)[0][1] == pytest.approx(PRIOR_RATE / 2)


# ---------------------------------------------------------------------------------------------------------------
# The draft model's break-even length


def test_break_even_drafts_while_the_next_token_pays():
    flat = BreakEven(FLAT, draft_seconds=0.0)
    for _ in range(10):  # free drafts: any chance pays
        assert flat.worth(0.5)
        flat.take(0.5)
    steep = BreakEven(STEEP, draft_seconds=0.0)
    assert not steep.worth(0.99)
    # 10 ms per forward, 2 ms per draft, each draft right 80% of the time given the ones before it: the rule
    # stops at the length with the most tokens per second (the k-th draft survives with 0.8^k)
    costly = BreakEven(CostModel.fit([1, 64], [10e-3, 10e-3]), draft_seconds=2e-3)
    taken = 0
    while taken < 50 and costly.worth(0.8):
        costly.take(0.8)
        taken += 1

    def rate(k: int) -> float:
        return (1 + sum(0.8**j for j in range(1, k + 1))) / (10e-3 + 2e-3 * k)

    assert taken == max(range(50), key=rate) and 1 < taken < 50


def test_calibration_learns_what_a_confidence_is_worth():
    cal = Calibration()
    assert cal(0.95) == pytest.approx(0.95)  # the prior: the confidence itself
    for _ in range(50):
        cal.update([0.95, 0.95], accepted=0)  # the first was tested and rejected; the second never tested
    assert cal(0.95) < 0.1 and cal(0.35) == pytest.approx(0.35)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_stops_at_the_break_even_point(model, tok, temperature):
    kwargs = dict(max_new_tokens=24, temperature=temperature, seed=1)
    steep = SpecDecoder(model, tok, "draft", draft_model=model)
    steep.drafter.cost = STEEP
    flat = SpecDecoder(model, tok, "draft", draft_model=model)
    flat.drafter.cost = FLAT
    none, many = steep.generate(PROMPTS[1], **kwargs), flat.generate(PROMPTS[1], **kwargs)
    # not one draft pays: only the first, which `draft` always drafts (whether to draft at all is auto's call)
    assert none.stats.proposed_by_depth[1:] == [] and none.stats.draft_nodes == none.stats.target_forwards
    assert many.stats.draft_nodes > 0 and many.stats.target_forwards < 24
    if temperature == 0:
        assert none.token_ids == many.token_ids == tiny.hf_greedy(model, PROMPTS[1], 24)


def test_draft_model_observes_a_tree_that_was_not_its_own(model, other_model):
    """Emitted tokens that repeat its own fed drafts up to the bonus (another member's tree said the same):
    the next root must still be fed, and the next chain is the draft's own continuation of the context."""
    drafter = DraftModel(other_model, break_even=False, adaptive=False, num_tokens=3)
    drafter.bind(model, native(model))
    prompt = list(PROMPTS[1])
    state = drafter.start(Request(prompt, SamplingParams(max_new_tokens=32), torch.Generator()))
    chain = drafter.propose(state, prompt, 8).tokens[1:]
    assert chain == tiny.hf_greedy(other_model, prompt, 3)
    other = DraftTree.chain(prompt[-1], [chain[0]])  # someone else's tree: one node, accepted; then chain[1]
    drafter.observe(state, Scored(other, Verdict([0, 1], chain[:2]), torch.zeros(2, 8)))
    context = prompt + chain[:2]
    assert drafter.propose(state, context, 8).tokens[1:] == tiny.hf_greedy(other_model, context, 3)


def test_auto_picks_the_runtime_its_usage_makes_fastest(model):
    """One runtime with a cheap one-token forward and dear trees (llama.cpp's shape), one the other way: mostly
    plain decoding picks the first, mostly large trees the second, nothing known yet (or too little) the
    engine's default."""
    from specdec.drafters.auto import USAGE_STEPS, Timing, Usage

    auto = Auto(members="pld")
    auto.bind(model, native(model))
    trees, plain = RuntimeChoice("trees", lambda: None), RuntimeChoice("plain", lambda: None)
    auto.timings = {
        "trees": Timing(OnlineCost(CostModel.fit([1, 16], [2.5e-3, 6.0e-3]), rate=0.0)),
        "plain": Timing(OnlineCost(CostModel.fit([1, 16], [1.6e-3, 7.5e-3]), rate=0.0)),
    }
    greedy = SamplingParams()
    assert auto.choose_runtime(greedy, [trees, plain]) == 0
    auto.profile(0.0).usage = Usage(plain_share=0.9, tree_nodes=8, steps=USAGE_STEPS // 2)
    assert auto.choose_runtime(greedy, [trees, plain]) == 0  # too few steps to go by
    auto.profile(0.0).usage = Usage(plain_share=0.9, tree_nodes=8, steps=USAGE_STEPS)
    assert auto.choose_runtime(greedy, [trees, plain]) == 1
    auto.profile(0.0).usage = Usage(plain_share=0.1, tree_nodes=12, steps=USAGE_STEPS)
    assert auto.choose_runtime(greedy, [trees, plain]) == 0
    # per temperature; sampling with no usage of its own yet starts from plain decoding's (SAMPLED_PRIOR)
    hot = SamplingParams(temperature=1.0)
    assert auto.choose_runtime(hot, [trees, plain]) == 1
    auto.profile(1.0).usage = Usage(plain_share=0.1, tree_nodes=12, steps=USAGE_STEPS)
    assert auto.choose_runtime(hot, [trees, plain]) == 0


def test_auto_runtime_choice_lends_a_measured_step_overhead_to_a_runtime_not_run_yet(model):
    """Plain steps' overhead (bookkeeping, sampling) is measured only where generations ran: a runtime with
    none measured must not look cheaper by that much. The default ran (1 ms overhead + a 2 ms forward); the
    other's 1.6 ms forward plus the same overhead is within the margin, so the default stays; a 1 ms forward
    is not."""
    from specdec.drafters.auto import USAGE_STEPS, Timing, Usage

    auto = Auto(members="pld")
    auto.bind(model, native(model))
    ran, fresh = RuntimeChoice("ran", lambda: None), RuntimeChoice("fresh", lambda: None)
    auto.timings = {
        "ran": Timing(OnlineCost(CostModel.fit([1, 16], [2.0e-3, 6.0e-3]), rate=0.0), overhead=1e-3),
        "fresh": Timing(OnlineCost(CostModel.fit([1, 16], [1.6e-3, 6.0e-3]), rate=0.0)),
    }
    auto.profile(0.0).usage = Usage(plain_share=1.0, tree_nodes=1, steps=USAGE_STEPS)
    assert auto.choose_runtime(SamplingParams(), [ran, fresh]) == 0
    auto.timings["fresh"] = Timing(OnlineCost(CostModel.fit([1, 16], [1.0e-3, 6.0e-3]), rate=0.0))
    assert auto.choose_runtime(SamplingParams(), [ran, fresh]) == 1


def test_cost_curves_are_measured_while_the_engine_is_built_not_in_its_first_request(model, tok, monkeypatch):
    """auto's cost curves (~1.5 s on the shipped model) are timed when the engine is built: in a first request
    they made it several times slower than the next ones."""
    calls: list[int] = []
    real = CostModel.measure.__func__  # type: ignore[attr-defined]

    def counted(cls, *args, **kwargs):
        calls.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(CostModel, "measure", classmethod(counted))
    dec = SpecDecoder(tiny.model("llama", seed=3), tok, "auto", runtime="native")  # a model never timed
    assert calls and set(dec.drafter.timings) == {"native"}
    built = len(calls)
    dec.generate(PROMPTS[0], max_new_tokens=8)
    assert len(calls) == built
