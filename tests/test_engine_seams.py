"""The engine's seams: typed steps, per-generation drafter state, hidden states for drafters that ask."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from specdec import Drafter, DraftTree, SpecDecoder
from specdec.api import sampling_params
from specdec.drafters import REGISTRY
from specdec.drafters.base import Reads
from specdec.drafters.merge import Merge
from specdec.engine import Step

import tiny

PROMPTS = ([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [30, 31, 32, 30, 31, 40, 41, 30, 31])


# Models in module fixtures: built when a test first asks for them, not at collection.
@pytest.fixture(scope="module")
def model():
    return tiny.model("llama", seed=0)


@pytest.fixture(scope="module")
def other():
    return tiny.model("llama", seed=7)


@pytest.fixture(scope="module")
def decoder(model, other, tok) -> Callable[[str], SpecDecoder]:
    """A fresh decoder for `method` at each call (the draft model: `other`)."""

    def make(method: str) -> SpecDecoder:
        if method == "draft":
            return SpecDecoder(model, tok, "draft", draft_model=other)
        return SpecDecoder(model, tok, method)

    return make


def interleaved(dec: SpecDecoder, params: dict) -> list:
    """Both prompts' streams advanced one step each in turn; returns their final Generations."""
    runs = [dec.engine.run(list(p), sampling_params(**params)) for p in PROMPTS]
    results: list = [None, None]
    while any(r is None for r in results):
        for i, run in enumerate(runs):
            if results[i] is None:
                step = next(run)
                assert isinstance(step, Step)
                assert not torch.is_inference_mode_enabled()  # no thread-local state held across a yield
                results[i] = step.result
    return results


# recycle and merge learn a shared table across requests on purpose, so only their tokens must match.
SHARED_LEARNING = {"recycle", "merge"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["vanilla", "pld", "suffix", "lookahead", "draft", "layerskip", "recycle", "merge"]
)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_two_interleaved_streams_equal_each_run_alone(decoder, method, temperature):
    params = dict(max_new_tokens=24, temperature=temperature, seed=3, ignore_eos=True)
    alone = [decoder(method).generate(list(p), **params) for p in PROMPTS]  # a fresh decoder each
    together = interleaved(decoder(method), params)
    for a, b in zip(alone, together, strict=True):
        assert b.token_ids == a.token_ids
        if method not in SHARED_LEARNING:  # the same drafts, step for step
            assert b.stats.target_forwards == a.stats.target_forwards
            assert b.stats.accepted_by_depth == a.stats.accepted_by_depth


def test_steps_are_typed_and_the_last_carries_the_result(model, tok):
    dec = SpecDecoder(model, tok, "pld")
    steps = list(dec.engine.run(list(PROMPTS[0]), sampling_params(max_new_tokens=12, ignore_eos=True)))
    assert all(isinstance(s, Step) for s in steps)
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
    result = steps[-1].result
    assert [t for s in steps for t in s.token_ids] == result.token_ids
    assert "".join(s.text for s in steps) == result.text
    assert result.stats.target_forwards == len(steps)  # one tree forward per step; the prefill is not one


def test_the_first_token_is_drafted_and_verified_like_every_other(model, tok):
    """The prompt's last token is the first tree's root: a perfect draft is accepted from the first step."""
    dec = SpecDecoder(model, tok, "draft", draft_model=model, num_tokens=4, adaptive=False, break_even=False)
    out = dec.generate(list(PROMPTS[0]), max_new_tokens=5, ignore_eos=True)
    assert out.token_ids == tiny.hf_greedy(model, list(PROMPTS[0]), 5)
    assert out.stats.target_forwards == 1 and out.stats.accepted_by_depth == [1, 1, 1, 1]


class Recorder(Drafter):
    """Asks for three layers' hidden states and records what it is handed."""

    name = "hidden-recorder"
    reads = Reads.HIDDEN_LAYERS

    def __init__(self) -> None:
        self.layers: tuple[int, ...] = ()

    def bind(self, model, runtime) -> None:
        self.layers = (0, 1, model.config.num_hidden_layers)

    def hidden_layers(self) -> tuple[int, ...]:
        return self.layers

    def start(self, request) -> dict:
        return {"prefill": None, "scored": []}

    def prefilled(self, state, hidden) -> None:
        state["prefill"] = hidden

    def propose(self, state, context, max_depth) -> DraftTree:
        root = context[-1]
        return DraftTree.from_sequences(root, [[(root + 1) % 50, 3], [(root + 2) % 50]]).truncate_depth(
            max_depth
        )

    def observe(self, state, scored) -> None:
        state["scored"].append(scored)
        self.last = state


def test_hidden_states_reach_the_drafter_for_the_prompt_and_every_node(model, tok):
    drafter = Recorder()
    prompt = list(PROMPTS[1])
    out = SpecDecoder(model, tok, drafter).generate(prompt, max_new_tokens=6, ignore_eos=True)
    state = drafter.last
    sequence = prompt + out.token_ids
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([sequence]), output_hidden_states=True).hidden_states
    for layer in drafter.layers:
        prefill = state["prefill"][layer]  # [P - 1, H]
        assert prefill.shape == (len(prompt) - 1, model.config.hidden_size)
        torch.testing.assert_close(prefill, full[layer][0, : len(prompt) - 1], rtol=1e-9, atol=1e-9)
    position = len(prompt) - 1  # the first tree's root
    for scored in state["scored"]:
        for layer in drafter.layers:
            hidden = scored.hidden[layer]  # [N, H], row i for node i
            assert hidden.shape == (len(scored.tree), model.config.hidden_size)
            for depth, node in enumerate(scored.verdict.accepted_nodes):  # on the accepted path: the truth
                torch.testing.assert_close(
                    hidden[node], full[layer][0, position + depth], rtol=1e-9, atol=1e-9
                )
        position += len(scored.verdict.tokens)


def test_drafters_that_need_no_hidden_states_do_not_ask_the_model_for_them(model, tok, monkeypatch):
    calls = []
    forward = type(model).forward

    @functools.wraps(forward)  # keeps the signature, which names the cache argument (`cache_keyword`)
    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("output_hidden_states"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    # the transformers runtime: it is the one whose forward takes that flag
    SpecDecoder(model, tok, "pld", runtime="transformers").generate(list(PROMPTS[0]), max_new_tokens=8)
    assert calls and not any(calls)


def test_capabilities_are_declared_on_the_class():
    for name, cls in REGISTRY.items():
        for flag in ("needs_draft_model", "samples_drafts", "mergeable"):
            assert isinstance(getattr(cls, flag), bool), (name, flag)
        assert isinstance(cls.reads, Reads), name
    assert REGISTRY["draft"].needs_draft_model and REGISTRY["draft"].samples_drafts
    assert {n for n, c in REGISTRY.items() if c.mergeable} >= {"pld", "suffix", "recycle"}
    assert not REGISTRY["lookahead"].mergeable  # it learns from its own window's logits only
    with pytest.raises(ValueError, match="lookahead"):
        Merge(members="pld,lookahead")
