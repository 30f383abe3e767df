"""Streaming deltas and stop strings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from specdec import SpecDecoder
from specdec.text import IncrementalText

import tiny


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é日本🙂\nñ")), min_size=1, max_size=30))
def test_deltas_never_split_a_character(text):
    tok = tiny.tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok, [])
    deltas = [inc.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == inc.finish() == tok.decode(ids)


def test_stream_concatenation_equals_generate(tok):
    dec = SpecDecoder(tiny.model("qwen2"), tok, method="pld")
    stream = dec.stream("def main():\n", max_new_tokens=30)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text == dec.generate("def main():\n", max_new_tokens=30).text


def test_stop_string_cuts_text_and_tokens(tok):
    m = tiny.model("llama")
    dec = SpecDecoder(m, tok, method="vanilla")
    full = dec.generate("import sys\n", max_new_tokens=40)
    text = full.text
    # a stop string of plain characters from the second half (random models also emit invalid UTF-8)
    start = next(
        i
        for i in range(len(text) // 2, len(text) - 2)
        if text[i : i + 3].isascii() and text[i : i + 3].strip()
    )
    stop = text[start : start + 3]
    stream = dec.stream("import sys\n", max_new_tokens=40, stop=[stop])
    streamed = "".join(stream)
    out = stream.result
    assert out.stats.finish_reason == "stop"
    assert out.text == text[: text.index(stop)] == streamed
    # tokens end with the token that completed the stop string, and are a prefix of the free run
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])
