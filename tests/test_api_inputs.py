"""The Python API's answer to bad input is specdec's InputError, never a TypeError/IndexError from deep inside;
temperatures too small to sample from are greedy; a distribution that is not one is a clear error."""

from __future__ import annotations

import math
import time
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from specdec import SpecDecoder
from specdec.errors import ContextLengthError, InputError
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
        # undecodable bytes as Python escapes them (surrogateescape), and a lone surrogate: no tokenizer
        # can encode either (a TypeError from inside the tokenizer once)
        ("caf\udce9", r"the prompt is not valid UTF-8 \(byte 0xe9 at character 3"),
        ("x \ud83d", r"the prompt is not valid Unicode \(a lone surrogate U\+D83D at character 2"),
    ],
)
def test_bad_prompts_are_input_errors(dec, prompt, message):
    with pytest.raises(InputError, match=message):
        dec.generate(prompt, max_new_tokens=4)
    with pytest.raises(InputError, match=message):
        list(dec.stream(prompt, max_new_tokens=4))


def test_a_prompt_no_tokenization_fits_is_refused_untokenized(dec):
    """A text longer than the context times the longest token cannot fit: refused at once (a 10 MB prompt
    once took 15 s and 2 GB of tokenizing to reject)."""
    started = time.perf_counter()
    with pytest.raises(
        ContextLengthError, match=r"the prompt \(3000000 characters, so at least \d+ tokens\)"
    ):
        dec.generate("x = 1\n" * 500_000, max_new_tokens=4)
    assert time.perf_counter() - started < 0.5


def _fast(model, normalizer=None, pre_tokenizer=None, added=()) -> PreTrainedTokenizerFast:
    t = Tokenizer(model)
    if normalizer is not None:
        t.normalizer = normalizer
    if pre_tokenizer is not None:
        t.pre_tokenizer = pre_tokenizer
    t.add_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=t)


BYTES = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}  # byte-level BPE, no merges
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)
FALLBACK = {f"<0x{b:02X}>": b for b in range(256)} | {"[UNK]": 256, "▁": 257, "ab": 258}


def test_length_bounds_of_tokenizers_that_keep_every_character():
    from specdec.text import MAX_COMPOSED, max_token_chars

    assert max_token_chars(_fast(models.BPE(BYTES, []), pre_tokenizer=BYTE_LEVEL)) == 1
    assert max_token_chars(_fast(models.BPE(BYTES, []), pre_tokenizer=BYTE_LEVEL, added=["<tool>"])) == 6
    nfc = _fast(models.BPE(BYTES, []), normalizers.NFC(), BYTE_LEVEL)
    assert max_token_chars(nfc) == MAX_COMPOSED  # "e" + U+0301 is one character after NFC
    # SentencePiece as Llama 2 has it: spaces as "▁", bytes for what no piece holds
    llama = _fast(
        models.BPE(FALLBACK, [], unk_token="[UNK]", byte_fallback=True, fuse_unk=True),
        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
    )
    assert max_token_chars(llama) == len("<0x00>")
    assert max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x3400)) == MAX_COMPOSED


@pytest.mark.parametrize(
    "tokenizer",
    [
        # whitespace or a delimiter dropped, a run of unknown characters as one [UNK] (or dropped), spaces
        # stripped around an added token or the text, combining marks stripped
        _fast(
            models.BPE(BYTES, []), None, pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), BYTE_LEVEL])
        ),
        _fast(
            models.BPE(BYTES, []),
            None,
            pre_tokenizers.Sequence([pre_tokenizers.CharDelimiterSplit("x"), BYTE_LEVEL]),
        ),
        _fast(models.BPE(BYTES, []), normalizers.Strip(), BYTE_LEVEL),
        _fast(models.BPE(BYTES, []), normalizers.StripAccents(), BYTE_LEVEL),
        _fast(models.BPE(BYTES, []), normalizers.Replace(" ", ""), BYTE_LEVEL),
        _fast(models.BPE(BYTES, []), None, BYTE_LEVEL, added=[AddedToken("<t>", rstrip=True)]),
        _fast(models.BPE(FALLBACK, [], unk_token="[UNK]", fuse_unk=True)),
        _fast(models.BPE({"a": 0, "b": 1}, [])),  # no unk token: unknown characters vanish
        _fast(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), pre_tokenizer=BYTE_LEVEL),
        _fast(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), pre_tokenizer=BYTE_LEVEL),
    ],
)
def test_no_length_bound_for_tokenizers_that_may_drop_or_fold_text(tokenizer):
    from specdec.text import max_token_chars

    assert max_token_chars(tokenizer) is None


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=200))
def test_the_length_bound_holds(tok, text):
    """Every token covers at most max_token_chars characters of the text (so n characters need at least
    n / max_token_chars tokens), whatever the text."""
    from specdec.text import max_token_chars

    bound = max_token_chars(tok)
    assert bound is not None
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates are refused before this
    assert len(text) <= bound * len(tok(text)["input_ids"])


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
