"""The prefix cache: a prompt that starts as an earlier one did is prefilled only past the cached blocks, and
decodes exactly as a fresh prefill would (greedy and seeded sampling, single and batched), whatever the
budget evicts, with requests that share and extend one prefix in the same batch."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.api import sampling_params
from specdec.batch import run_batch
from specdec.runtime import attach_prefix_cache as attach
from specdec.runtime.prefix import BLOCK, PrefixCache

import tiny

SHARED = list(range(3, 3 + 3 * BLOCK + 5))  # three whole blocks and a bit


@pytest.fixture
def model():
    return tiny.model("llama", seed=2)  # a fresh model per test: the cache hangs on its native weights


def fresh(model, tok, method: str, prompt: list[int], **params) -> list[int]:
    """What a decoder with no prefix cache gives (another copy of the weights, so nothing is shared)."""
    copy = tiny.model("llama", seed=2)
    return SpecDecoder(copy, tok, method, runtime="native").generate(prompt, **params).token_ids


@pytest.mark.parametrize("method", ["vanilla", "pld", "auto"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_cached_prefix_decodes_as_a_fresh_prefill(model, tok, method, temperature):
    dec = SpecDecoder(model, tok, method, runtime="native")
    cache = attach(model, 64)
    assert cache is not None
    params = {"max_new_tokens": 20, "temperature": temperature, "seed": 3}
    first = dec.generate(SHARED + [7, 8], **params)
    assert first.stats.cached_prompt_tokens == 0 and cache.blocks >= 3
    for tail in ([7, 8], [9], [7, 8, 9, 10, 11]):
        got = dec.generate(SHARED + tail, **params)
        assert got.stats.cached_prompt_tokens == 3 * BLOCK  # the whole blocks of the shared part
        assert got.token_ids == fresh(model, tok, method, SHARED + tail, **params)


def test_the_generated_tokens_are_cached_too(model, tok):
    """A chat's next turn resends the answer: the answer's blocks are found as well."""
    dec = SpecDecoder(model, tok, "pld", runtime="native")
    attach(model, 64)
    first = dec.generate(SHARED, max_new_tokens=40)
    turn = SHARED + first.token_ids + [5, 6]
    second = dec.generate(turn, max_new_tokens=10)
    assert second.stats.cached_prompt_tokens == ((len(SHARED) + 39) // BLOCK) * BLOCK
    assert second.token_ids == fresh(model, tok, "pld", turn, max_new_tokens=10)


def test_eviction_under_a_tiny_budget_loses_nothing(model, tok):
    dec = SpecDecoder(model, tok, "pld", runtime="native")
    cache = attach(model, 0.001)  # about one block of this model
    assert cache is not None
    prompts = [SHARED + [i] for i in range(4)] + [list(range(40, 120))]
    for prompt in prompts * 2:
        assert dec.generate(prompt, max_new_tokens=12).token_ids == fresh(
            model, tok, "pld", prompt, max_new_tokens=12
        )
        assert cache.bytes <= cache.budget


def test_rows_sharing_and_extending_a_prefix_while_it_is_evicted_get_their_solo_results(model, tok):
    dec = SpecDecoder(model, tok, "pld", runtime="native")
    cache = attach(model, 0.05)
    assert cache is not None
    prompts = [SHARED + [i] * (i + 1) for i in range(6)] + [SHARED + SHARED]
    params = [sampling_params(max_new_tokens=16 + i) for i in range(len(prompts))]
    hits = []
    for _ in range(2):  # the second round finds what the first left (as far as the budget kept it)
        results: dict[int, list[int]] = {}
        for i, step in run_batch(dec.engine, prompts, params):
            if step.result is not None:
                results[i] = step.result.token_ids
                hits.append(step.result.stats.cached_prompt_tokens)
        for i, prompt in enumerate(prompts):
            assert results[i] == fresh(model, tok, "pld", prompt, max_new_tokens=16 + i), i
        assert cache.bytes <= cache.budget
    assert max(hits) >= BLOCK  # rows did start from cached blocks


def test_the_trie_keeps_whole_blocks_and_drops_least_recent_leaves_first():
    k = torch.arange(2 * 1 * 64 * 2, dtype=torch.float32).reshape(2, 1, 64, 2)
    per_block = 2 * k[:, :, :BLOCK].numel() * 4
    cache = PrefixCache(3 * per_block)
    a, b = list(range(40)), list(range(32)) + [99] * 8
    cache.store(a, k, k)  # blocks a0, a1 (the last 8 tokens are no whole block)
    cache.store(b, k, k)  # shares a0, a1: nothing new
    assert cache.blocks == 2
    cache.store(list(range(32)) + list(range(200, 232)), k, k)  # a0, a1, then two more: over the budget
    assert cache.blocks == 3 and cache.bytes <= cache.budget
    out = torch.zeros_like(k)
    assert cache.restore(a, out, out.clone(), limit=40) == (2 * BLOCK, {})
    assert torch.equal(out[:, :, : 2 * BLOCK], k[:, :, : 2 * BLOCK])
    assert cache.restore(a, out, out.clone(), limit=20)[0] == BLOCK  # never past the limit
    assert cache.restore(a, out, out.clone(), limit=40, layers=(1,))[0] == 0  # no states kept for layer 1
    h = torch.randn(40, 3)
    cache.store(a, k, k, {1: h})  # the same blocks gain the states a drafter read
    n, hidden = cache.restore(a, out, out.clone(), limit=40, layers=(1,))
    assert n == 2 * BLOCK and torch.equal(hidden[1], h[: 2 * BLOCK])


@pytest.mark.parametrize("method", ["vanilla", "pld"])
def test_llamacpp_contexts_keep_their_cells_for_a_prompt_that_starts_the_same(tok, method):
    """On llama.cpp a pooled context keeps its last generation's cells: the next prompt that starts the same
    is prefilled past them, and decodes as a fresh context would."""
    pytest.importorskip("llama_cpp")
    model = tiny.model("llama", seed=2, dtype=torch.float32)
    dec = SpecDecoder(model, tok, method, runtime="llamacpp")
    attach(model, 64)
    first = dec.generate(SHARED + [7, 8], max_new_tokens=12)
    assert first.stats.cached_prompt_tokens == 0
    for tail in ([7, 8], [9], first.token_ids + [5]):
        got = dec.generate(SHARED + tail, max_new_tokens=12)
        assert got.stats.cached_prompt_tokens >= len(SHARED) - 1  # all but what the prefill must run
        copy = tiny.model("llama", seed=2, dtype=torch.float32)
        want = SpecDecoder(copy, tok, method, runtime="llamacpp").generate(SHARED + tail, max_new_tokens=12)
        assert got.token_ids == want.token_ids


@pytest.mark.parametrize("method", ["eagle", "hydra", "auto"])
def test_a_drafter_reading_the_prompts_states_gets_the_cached_ones_too(model, tok, method):
    """eagle (inner layers), hydra (the final one) and auto with its eagle member read the prompt's hidden
    states at prefill: the cache keeps them beside the keys and values, so a cached prompt drafts exactly as
    a fresh one (the same accepted drafts by depth), single and batched."""
    head = tiny.untrained_head("eagle" if method == "auto" else method, model)
    options = {"head": head} | ({} if method == "auto" else {"max_nodes": 8})
    dec = SpecDecoder(model, tok, method, runtime="native", **options)
    attach(model, 64)
    dec.generate(SHARED + [7, 8], max_new_tokens=20)
    got = dec.generate(SHARED + [9], max_new_tokens=20)
    assert got.stats.cached_prompt_tokens == 3 * BLOCK
    copy = tiny.model("llama", seed=2)
    alone = SpecDecoder(copy, tok, method, runtime="native", **options).generate(
        SHARED + [9], max_new_tokens=20
    )
    assert got.token_ids == alone.token_ids
    if method != "auto":  # auto's choices also follow measured times, which differ between processes' runs
        assert got.stats.accepted_by_depth == alone.stats.accepted_by_depth
    rows = dec.generate_batch([SHARED + [9], SHARED + [10]], max_new_tokens=20)
    assert rows[0].token_ids == alone.token_ids and rows[0].stats.cached_prompt_tokens == 3 * BLOCK
