"""Batched decoding (`specdec.batch`): every row's tokens are what the same request gives alone, for several
drafters and architectures, rows of different prompt lengths ending at different steps, greedy and seeded
sampling."""

from __future__ import annotations

import pytest

from specdec import SpecDecoder
from specdec.api import sampling_params
from specdec.batch import run_batch
from specdec.errors import InputError

import tiny

TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "x = 1\ny = 2\nx = 1\n",
    "import os\n",
    "class A:\n    pass\n\nclass A:\n    pass\n\nclass B",
]


def _decoder(arch: str, method: str) -> SpecDecoder:
    model = tiny.model(arch, seed=2)
    draft = {"draft_model": tiny.model(arch, seed=7)} if method == "draft" else {}
    return SpecDecoder(model, tiny.tokenizer(), method, **draft)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("method", ["vanilla", "pld", "suffix", "merge", "recycle", "draft", "auto"])
def test_each_row_equals_generate(arch, method):
    """Rows of 3-18 prompt tokens; max_new_tokens 5, 24, 11, 17: rows leave at different steps and the live
    rows are renumbered as they go."""
    dec = _decoder(arch, method)
    tok = tiny.tokenizer()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    lengths = [5, 24, 11, 17]
    params = [sampling_params(max_new_tokens=n) for n in lengths]
    results = {i: step.result for i, step in run_batch(dec.engine, prompts, params) if step.result}
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == tiny.hf_greedy(dec.model, prompt, lengths[i])


def test_auto_with_a_head_batches_with_it():
    """auto's eagle member reads hidden states, which a batch now scores for every row: the rows run with it,
    and each still equals generate()."""
    model = tiny.model("llama", seed=2)
    dec = SpecDecoder(model, tiny.tokenizer(), "auto", head=tiny.untrained_head("eagle", model))
    assert dec.engine.layers  # auto reads hidden states for its eagle member
    tok = tiny.tokenizer()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    results = dec.generate_batch(prompts, max_new_tokens=12, ignore_eos=True)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == tiny.hf_greedy(model, prompt, 12)
        assert result.stats.drafter["ran"]["eagle"] > 0  # not sat out for want of hidden states


def test_generate_batch_matches_generate_one_by_one():
    dec = _decoder("llama", "pld")
    batch = dec.generate_batch(TEXTS, max_new_tokens=16)
    alone = [dec.generate(t, max_new_tokens=16) for t in TEXTS]
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.text for b in batch] == [a.text for a in alone]


@pytest.mark.parametrize("method", ["vanilla", "pld", "recycle"])
def test_a_sampled_row_draws_what_it_draws_alone(method):
    """Each row samples from its own seeded generator: its tokens do not depend on the other rows."""
    dec = _decoder("llama", method)
    tok = tiny.tokenizer()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    params = [
        sampling_params(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (3, 4, 5, 6)
    ]
    batch = {i: step.result for i, step in run_batch(dec.engine, prompts, params) if step.result}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        alone = dec.generate(prompt, max_new_tokens=12, temperature=1.0, seed=p.seed, ignore_eos=True)
        assert batch[i].token_ids == alone.token_ids


def test_what_cannot_batch_says_why():
    gemma = SpecDecoder(tiny.model("gemma"), tiny.tokenizer(), "pld")  # transformers runtime
    with pytest.raises(InputError, match="native runtime"):
        gemma.generate_batch(TEXTS, max_new_tokens=4)
    model = tiny.model("llama", seed=1)
    eagle = SpecDecoder(model, tiny.tokenizer(), "eagle", head=tiny.untrained_head("eagle", model))
    with pytest.raises(InputError, match="non-empty list"):
        eagle.generate_batch([], max_new_tokens=4)
    pld = SpecDecoder(model, tiny.tokenizer(), "pld")
    with pytest.raises(InputError, match="prompt 1: .* exceeds the model's context"):
        pld.generate_batch([[5], [5, 6, 7, 8]], max_new_tokens=510)
    with pytest.raises(InputError, match="prompt 0: the prompt is empty"):
        pld.generate_batch([[]], max_new_tokens=4)


def test_rows_join_and_leave_between_steps():
    """A row joins after others have run steps, one is abandoned mid-way (its row freed at once and reused),
    and every finished row still equals generate()."""
    from specdec.batch import Batch

    dec = _decoder("llama", "pld")
    tok = tiny.tokenizer()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    batch = Batch(dec.engine, rows=2, capacity=64)
    first = batch.join(prompts[0], sampling_params(max_new_tokens=20))
    abandoned = batch.join(prompts[1], sampling_params(max_new_tokens=20))
    assert batch.full
    results = {}
    for _ in range(2):
        for member, step in batch.step():
            if step.done:
                results[id(member)] = step.result
    batch.leave(abandoned)
    late = batch.join(prompts[2], sampling_params(max_new_tokens=12))
    while batch.members:
        for member, step in batch.step():
            if step.done:
                results[id(member)] = step.result
    assert results[id(first)].token_ids == tiny.hf_greedy(dec.model, prompts[0], 20)
    assert results[id(late)].token_ids == tiny.hf_greedy(dec.model, prompts[2], 12)
    assert id(abandoned) not in results


def test_a_row_leaves_after_the_cache_grew():
    """A cache that grew inside a forward (inference mode) can still move rows when one leaves outside it."""
    from specdec.batch import Batch

    dec = _decoder("llama", "pld")
    tok = tiny.tokenizer()
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    batch = Batch(dec.engine, rows=3, capacity=8)  # far too small: every join and step grows it
    members = [
        batch.join(p, sampling_params(max_new_tokens=n)) for p, n in zip(prompts, (4, 30, 9), strict=False)
    ]
    results = {}
    while batch.members:
        for member, step in batch.step():
            if step.done:
                results[id(member)] = step.result.token_ids
    for member, prompt, n in zip(members, prompts, (4, 30, 9), strict=False):
        assert results[id(member)] == tiny.hf_greedy(dec.model, prompt, n)


def test_batch_cost_is_measured_per_rows_and_tokens_and_interpolates_between_rows():
    """The shipped grid of batch sizes x tree tokens per row, each curve monotone in tokens; a batch size
    between two measured ones lies between their curves, one above the largest continues their slope."""
    from specdec.batch import BATCH_ROWS, ROW_TOKENS, BatchCost
    from specdec.costmodel import CostModel
    from specdec.runtime.native import NativeModel

    cost = BatchCost.measure(NativeModel(tiny.model("llama", seed=2)), past=32, repeats=1)
    assert cost.rows == BATCH_ROWS
    for b, curve in zip(cost.rows, cost.curves, strict=True):
        assert curve.sizes == tuple(b * n for n in ROW_TOKENS)
        assert all(x <= y for x, y in zip(curve.seconds, curve.seconds[1:], strict=False))
    fake = BatchCost((2, 4), (CostModel.fit([2, 8], [1.0, 2.0]), CostModel.fit([4, 16], [2.0, 4.0])))
    assert fake(1, 2) == 1.0  # below the smallest batch: its curve
    assert fake(3, 4) == pytest.approx((fake(2, 4) + fake(4, 4)) / 2)
    assert fake(8, 8) == pytest.approx(fake(4, 8) + (fake(4, 8) - fake(2, 8)) * 2)


def test_a_row_sizes_its_tree_for_the_whole_steps_tokens_per_second():
    """`plan` with `base` (the other rows' expected tokens): a node that pays for a row decoded alone does not
    when its cost slows a step that seven other rows' tokens depend on."""
    from specdec.drafters.auto import plan

    def cost(n: int) -> float:  # seconds: a root alone 10 ms, each more tree token 1 ms
        return 0.010 + 0.001 * (n - 1)

    values = [0.9, 0.5, 0.3]
    alone, _, _ = plan(values, cost, overhead=0.0)
    in_batch, _, _ = plan(values, cost, overhead=0.0, base=7.0)
    assert alone == 3  # 2.7 tokens in 13 ms beats 2.4 in 12, 1.9 in 11 and 1 in 10
    assert in_batch == 1  # 8.9 tokens in 11 ms beats 8 in 10, but 9.4 in 12 does not


def test_row_budget_sees_the_other_rows_plans():
    """Each row's view of the step: the other live rows' planned tokens and tree tokens, this row's own
    plan left out, and the step's cost at this row's tree size with theirs in it."""
    from specdec.batch import Batch, RowPlan

    dec = _decoder("llama", "auto")
    tok = tiny.tokenizer()
    batch = Batch(dec.engine, rows=3, capacity=64)
    members = [batch.join(tok(t)["input_ids"], sampling_params(max_new_tokens=8)) for t in TEXTS[:3]]
    for member, plan in zip(members, [RowPlan(2.0, 5), RowPlan(1.0, 1), RowPlan(3.5, 9)], strict=True):
        member.slot.plan = plan
    budget = members[1].run.target.budget
    others, cost = budget.terms()
    assert others == 5.5
    assert cost(4) == batch.budget(3, 5 + 9 + 4)
    budget.plan(1.5, 3)
    assert members[1].slot.plan == RowPlan(1.5, 3)
    batch.close()


@pytest.mark.parametrize("method", ["eagle", "medusa", "hydra"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_head_rows_read_their_own_hidden_states_and_equal_their_solo_runs(method, temperature):
    """eagle (inner layers), medusa and hydra (the final hidden state) in a batch: each row's heads read that
    row's hidden states from the shared forward (and its prefill's), and every row gives its solo result."""
    model = tiny.model("llama", seed=1)
    head = tiny.untrained_head(method, model)
    # fixed trees of 8 nodes (the cost model finds none paying on this tiny model, alone)
    dec = SpecDecoder(model, tiny.tokenizer(), method, head=head, runtime="native", max_nodes=8)
    params = {"max_new_tokens": 16, "temperature": temperature, "seed": 5}
    batch = dec.generate_batch(TEXTS, **params)
    solo = [dec.generate(t, **params) for t in TEXTS]
    assert [b.token_ids for b in batch] == [s.token_ids for s in solo]
    assert all(b.stats.draft_nodes > 0 for b in batch)  # the heads drafted in every row
    # the same drafts accepted as alone: each row's heads read that row's states (any states keep the
    # output lossless; only the right ones draft what the row drafts alone)
    assert [b.stats.accepted_by_depth for b in batch] == [s.stats.accepted_by_depth for s in solo]
