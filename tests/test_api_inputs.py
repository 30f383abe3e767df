"""The Python API's answer to bad input is specdec's InputError, never a TypeError/IndexError from deep inside;
temperatures too small to sample from are greedy; a distribution that is not one is a clear error."""

from __future__ import annotations

import math

import pytest
import torch

from specdec import SpecDecoder
from specdec.errors import InputError
from specdec.sampling import GREEDY_TEMPERATURE, SamplingParams, TargetDistribution

import tiny


@pytest.fixture(scope="module")
def dec(tok):
    return SpecDecoder(tiny.model("llama"), tok, method="pld")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"stop": 5}, "stop must be a list of non-empty strings"),
        ({"stop": [3]}, "stop must be a list of non-empty strings"),
        ({"stop": ["a", None]}, "stop must be a list of non-empty strings"),
        ({"ignore_eos": "yes"}, "ignore_eos must be True or False"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False"),
        ({"temperature": math.nan}, "temperature"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_parameters_are_input_errors(dec, params, message):
    with pytest.raises(InputError, match=message):
        dec.generate("def f():", max_new_tokens=4, **params)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([-1], r"token id -1 is outside the model's vocabulary \[0, 384\)"),
        ([10**6], r"token id 1000000 is outside the model's vocabulary \[0, 384\)"),
        ([5, 384], r"token id 384 is outside"),
        (None, "must be a string or a list of token ids"),
        (5, "must be a string or a list of token ids"),
        (b"def", "must be a string or a list of token ids"),
        ([1.5], "token ids must be integers"),
        ([1, True], "token ids must be integers"),
        ([[1, 2]], "token ids must be integers"),
        ([], "the prompt is empty"),
    ],
)
def test_bad_prompts_are_input_errors(dec, prompt, message):
    with pytest.raises(InputError, match=message):
        dec.generate(prompt, max_new_tokens=4)
    with pytest.raises(InputError, match=message):
        list(dec.stream(prompt, max_new_tokens=4))


def test_token_id_prompts_in_any_integer_sequence(dec, tok):
    ids = tok("def f():")["input_ids"]
    want = dec.generate(ids, max_new_tokens=6).token_ids
    for prompt in (tuple(ids), torch.tensor(ids), torch.tensor(ids).numpy()):
        assert dec.generate(prompt, max_new_tokens=6).token_ids == want


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, GREEDY_TEMPERATURE / 2])
def test_temperature_too_small_to_sample_is_greedy(tok, temperature):
    """Dividing logits by 1e-300 overflows float32 (torch then refuses the 'probability tensor'); every
    method, the draft model's own sampling included, decodes greedily instead."""
    assert SamplingParams(temperature=temperature).greedy
    target = tiny.model("llama")
    draft = tiny.model("llama", seed=5, hidden=16, layers=1)
    ids = tok("def add(a, b):\n")["input_ids"]
    want = tiny.hf_greedy(target, ids, 10)
    for method in ("pld", "draft"):
        dec = SpecDecoder(target, tok, method=method, draft_model=draft if method == "draft" else None)
        got = dec.generate(ids, max_new_tokens=10, temperature=temperature, seed=3)
        assert got.token_ids == want, method


def test_smallest_sampled_temperature_samples():
    """At the threshold itself the distribution is computed (and is finite) rather than replaced by argmax."""
    params = SamplingParams(temperature=GREEDY_TEMPERATURE)
    assert not params.greedy
    p = TargetDistribution(params)(torch.tensor([[0.0, 1e-6, -5.0]]))
    assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0)


def test_distribution_that_is_none_is_a_clear_error():
    """A row with nan or +inf anywhere, or masked entirely, has no distribution; any position is caught."""
    dist = TargetDistribution(SamplingParams(temperature=0.7, top_k=5))
    for column in (0, 1, 199, 399):
        for value in (math.nan, math.inf):
            logits = torch.randn(3, 400)
            logits[1, column] = value
            with pytest.raises(InputError, match="logits are not finite"):
                dist(logits)
    with pytest.raises(InputError, match="logits are not finite"):
        dist(torch.full((2, 400), -math.inf))
    # an overflowing temperature, for a caller that builds the distribution itself
    with pytest.raises(InputError, match="logits are not finite"):
        TargetDistribution(SamplingParams(temperature=1e-300))(torch.randn(2, 400) * 10)
    p = dist(torch.randn(3, 400))  # finite logits: untouched
    assert torch.allclose(p.sum(-1), torch.ones(3)) and ((p > 0).sum(-1) == 5).all()
