"""`specdec generate`: JSON and prompts-file output, and one-line errors (exit 2) for every user mistake."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM

from specdec import SpecDecoder, UnsupportedModelError
from specdec.cli import main

import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-draft"), seed=5, hidden=16, layers=1)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_matches_hf(capsys, model_dir):
    prompt = "def add(a, b):\n    return a + b\n"
    code, out, _ = run(capsys, "generate", prompt, "--model", model_dir, "--json", "--max-new-tokens", 12)
    assert code == 0
    row = json.loads(out)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = tiny.tokenizer()(prompt)["input_ids"]
    assert row["token_ids"] == tiny.hf_greedy(model, ids, 12)
    assert row["text"] == tiny.tokenizer().decode(row["token_ids"], skip_special_tokens=True)
    stats = row["stats"]
    assert stats["new_tokens"] == len(row["token_ids"])
    assert stats["target_forwards"] >= 1 and stats["mean_accepted_tokens"] > 0 and stats["wall_seconds"] > 0


def test_generate_streams_text(capsys, model_dir):
    code, out, err = run(capsys, "generate", "x = 1\n", "--model", model_dir, "--max-new-tokens", 8)
    assert code == 0
    ref = SpecDecoder.from_pretrained(str(model_dir)).generate("x = 1\n", max_new_tokens=8)
    assert out == ref.text + "\n"
    assert "tau" in err


@pytest.mark.slow
def test_prompts_file_in_order_with_overrides(capsys, model_dir, draft_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "import os\n"},
        {"prompt": "class A:\n", "max_new_tokens": 3},
        {"prompt": "def f():\n", "temperature": 0.8, "seed": 3, "max_new_tokens": 5},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = (
        "generate",
        "--model",
        model_dir,
        "--draft",
        draft_dir,
        "--prompts-file",
        f,
        "--max-new-tokens",
        6,
    )
    code, out, _ = run(capsys, *args)
    assert code == 0
    rows = [json.loads(x) for x in out.splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [6, 3, 5]
    code, again, _ = run(capsys, *args)
    assert [json.loads(x)["token_ids"] for x in again.splitlines()] == [
        r["token_ids"] for r in rows
    ]  # seeded


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model"], "not found"),
        (["--method", "bogus"], "unknown method"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--method", "draft"], "draft model"),
    ],
)
def test_bad_arguments_one_line_exit_2(capsys, model_dir, argv, message):
    argv = ["generate", "hi", *argv]
    if "--model" not in argv:
        argv += ["--model", str(model_dir)]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("specdec: error:") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads: must be >= 1 (got 0)"),
        (["--threads", "-1"], "--threads: must be >= 1 (got -1)"),
        (["--threads", "two"], "--threads: expected an integer >= 1"),
        (["--dtype", "float8"], "--dtype: invalid choice"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_options_one_line_exit_2(capsys, argv, message):
    """argparse's own errors are one line too (its default prints the usage block first), before any model."""
    code, out, err = run(capsys, "generate", "hi", "--model", "/nonexistent/model", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("specdec: error:") and message in err, err


def test_help_exits_0(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and "generate" in out and err == ""


@pytest.mark.slow
@pytest.mark.parametrize("temperature", ["1e-300", "5e-324"])
def test_tiny_temperature_is_greedy(capsys, model_dir, temperature):
    """Too small to sample from (logits / temperature overflow): greedy, as documented in --help."""
    prompt = "def add(a, b):\n"
    argv = ("generate", prompt, "--model", model_dir, "--json", "--max-new-tokens", 8)
    code, out, err = run(capsys, *argv, "--temperature", temperature, "--seed", 1)
    assert code == 0, err
    greedy = json.loads(out)["token_ids"]
    model = LlamaForCausalLM.from_pretrained(model_dir)
    assert greedy == tiny.hf_greedy(model, tiny.tokenizer()(prompt)["input_ids"], 8)


def test_not_a_causal_lm(capsys, tmp_path):
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", "hi", "--model", tmp_path)
    assert code == 2 and "not a causal LM" in err


def test_vocabularies_differ(capsys, model_dir, tmp_path):
    tiny.model("llama", vocab_size=400, dtype=torch.float32).save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", "hi", "--model", model_dir, "--draft", tmp_path)
    assert code == 2 and "vocabularies differ" in err


def test_prompt_longer_than_context(capsys, caplog, model_dir):
    """One line: transformers' own "Token indices sequence length is longer than..." warning is not logged
    before it."""
    code, _, err = run(capsys, "generate", "x = 1\n" * 400, "--model", model_dir, "--max-new-tokens", 4)
    assert code == 2 and "exceeds the model's context" in err
    assert err.count("\n") == 1 and err.startswith("specdec: error:"), err
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_huge_prompt_is_refused_before_it_is_tokenized(capsys, model_dir):
    """A 10 MB line once took 15 s and 2 GB to reject: a text longer than the context times the longest
    token's length cannot fit, whatever its tokens."""
    started = time.perf_counter()
    code, _, err = run(capsys, "generate", "x" * 10_000_000, "--model", model_dir, "--max-new-tokens", 4)
    assert code == 2 and "10000000 characters" in err and "exceeds the model's context of 512" in err
    assert err.count("\n") == 1, err
    assert time.perf_counter() - started < 5  # loading the tiny model included


@pytest.mark.parametrize("prompt", ["caf\udce9 ", "\udce9"])
def test_a_prompt_that_is_not_utf8_is_one_line(capsys, model_dir, prompt):
    """Python hands undecodable argv bytes over as lone surrogates ('caf\\xe9' in Latin-1 -> 'caf\\udce9')."""
    code, out, err = run(capsys, "generate", prompt, "--model", model_dir, "--max-new-tokens", 3)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "0xe9" in err, err


def stdin_of(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_stdin_that_is_not_utf8_is_one_line(capsys, model_dir, monkeypatch):
    stdin_of(monkeypatch, b"caf\xe9 ")
    code, out, err = run(capsys, "generate", "-", "--model", model_dir, "--max-new-tokens", 3)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "stdin is not valid UTF-8" in err and "0xe9" in err, err


@pytest.mark.slow
def test_a_utf8_bom_is_not_prompt_text(capsys, model_dir, monkeypatch, tmp_path):
    """Windows editors start UTF-8 files with a BOM: stripped on stdin and in prompts files alike."""
    argv = ("--model", model_dir, "--max-new-tokens", 4, "--json")
    code, out, _ = run(capsys, "generate", "x = 1\n", *argv)
    want = json.loads(out)
    assert code == 0 and want["stats"]["prompt_tokens"] == len(tiny.tokenizer()("x = 1\n")["input_ids"])
    stdin_of(monkeypatch, b"\xef\xbb\xbfx = 1\n")
    code, out, err = run(capsys, "generate", "-", *argv)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == want["token_ids"]
    assert json.loads(out)["stats"]["prompt_tokens"] == want["stats"]["prompt_tokens"]
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "x = 1\n"}).encode() + b"\n")
    code, out, err = run(capsys, "generate", "--prompts-file", f, *argv)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == want["token_ids"]


@pytest.mark.slow
def test_a_stop_string_may_be_dashes(capsys, model_dir):
    """argparse drops a '--' value even in --stop=-- (it takes it for the end of the options)."""
    code, out, err = run(capsys, "generate", "x = 1\n", "--model", model_dir, "--stop=--", "--json")
    assert code == 0, err
    assert (
        json.loads(out)["text"]
        == SpecDecoder.from_pretrained(str(model_dir)).generate("x = 1\n", stop=["--"]).text
    )


def test_a_gguf_file_is_read_as_one_by_its_magic_whatever_its_name(capsys, tmp_path):
    """A file starting with GGUF's magic goes to llama.cpp (a header with nothing after it: refused in one
    line, as llama.cpp cannot load it), under any name, as a target or as a draft."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(32))
    for where in (gguf, tmp_path / "renamed.bin"):
        where.write_bytes(gguf.read_bytes())
        code, out, err = run(capsys, "generate", "hi", "--model", where)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "llama.cpp cannot load" in err, err
    code, _, err = run(capsys, "generate", "hi", "--draft", gguf, "--method", "draft")
    assert code == 2 and err.count("\n") == 1 and "llama.cpp cannot load" in err, err


@pytest.fixture
def no_hub(monkeypatch):
    """A hub that cannot be reached (a closed port on loopback), whatever this machine's network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_name_offline_fails_fast(capsys, no_hub, monkeypatch, offline):
    """Not in the cache and no hub: one line at once (the hub's client retried for ~20 s), saying why."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code, out, err = run(capsys, "generate", "hi", "--model", "some-org/some-model")
    assert time.perf_counter() - started < 3
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "'some-org/some-model' is not available offline" in err, err
    assert ("HF_HUB_OFFLINE" in err) == offline


def test_docs_say_what_runs_by_default():
    """The default method is auto (docs/serve.md once said pld); `draft` takes the shipped draft by itself
    with the shipped model (the README once said it needs --draft)."""
    from specdec.api import default_method
    from specdec.models.loading import load_models

    root = Path(__file__).resolve().parents[1]
    serve = (root / "docs" / "serve.md").read_text()
    assert re.search(r"specdec serve +# shipped code model, (\w+),", serve).group(1) == default_method(False)
    assert '"method": "pld"' not in serve
    row = next(line for line in (root / "README.md").read_text().splitlines() if line.startswith("| `draft`"))
    needs = row.rstrip(" |").rsplit("|", 1)[-1]
    assert "shipped" in needs and "--draft" in needs, row
    assert load_models("default", None, with_draft=True).draft is not None


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\nnot json\n', ":2: not valid JSON"),
        ('{"prompt": 3}\n', ":1: expected an object"),
        ('{"prompt": "a", "max_new_tokens": 0}\n', ":1: max_new_tokens"),
        ('{"prompt": "a", "colour": 1}\n', ":1: unknown key"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompts_file(capsys, model_dir, tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompts-file", f)
    assert code == 2 and message in err and out == ""


def test_unreadable_prompts_file(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "generate", "--model", model_dir, "--prompts-file", tmp_path / "missing.jsonl")
    assert code == 2 and "cannot read prompts file" in err


class IgnoresMask(LlamaForCausalLM):
    """A model whose attention silently ignores custom masks: tree scoring would be wrong."""

    def forward(self, *args, attention_mask=None, **kwargs):
        return super().forward(*args, attention_mask=None, **kwargs)


def test_model_ignoring_4d_masks_is_refused(tok):
    m = tiny.model("llama")
    m.__class__ = IgnoresMask
    with pytest.raises(UnsupportedModelError, match="IgnoresMask"):
        SpecDecoder(m, tok, method="pld").generate("def f():", max_new_tokens=4)


@pytest.mark.slow
def test_auto_takes_a_head_directory_and_verbose_shows_each_step(capsys):
    """--draft HEAD_DIR with auto hands the head to its eagle member (it once tried to load it as a draft
    model); --verbose prints the runtime and every step's choice."""
    from specdec.drafters.eagle import shipped_head_dir

    argv = ["generate", "def add(a, b):", "--method", "auto", "--draft", shipped_head_dir(), "--verbose"]
    code, out, err = run(capsys, *argv, "--max-new-tokens", 8)
    assert code == 0, err
    assert "specdec: target runtime native" in err
    assert "specdec.auto: step 1: ran" in err
    assert not logging.getLogger("specdec.auto").handlers  # for this command only: nothing left behind
