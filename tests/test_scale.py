"""`specdec bench --scale`: the published shapes build at their published sizes; forcing makes every method,
on both runtimes, and both baselines (generate(), llama.cpp's loop) emit exactly the reference; the command
runs end to end on a tiny config; bad input is one line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec.bench.forcing import ForceReference, forced_generation, lift, reference_ids
from specdec.bench.methods import ForwardCounter, HFMethod
from specdec.drafters import methods
from specdec.errors import InputError
from specdec.models.scale import SCALES, parameter_count, scale_config
from specdec.sampling import SamplingParams
from test_native import _decoder

import tiny

# the sizes the model cards publish (rounded as they round them)
PUBLISHED = {
    "smollm2-360m": 362e6,
    "qwen2.5-coder-0.5b": 0.49e9,
    "llama-3.2-1b": 1.23e9,
    "qwen2.5-coder-1.5b": 1.54e9,
}
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 9000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


@pytest.mark.parametrize("name", list(SCALES))
def test_every_scale_builds_at_its_published_size(name):
    config = scale_config(name)
    with torch.device("meta"):  # the architecture and every parameter's shape, no memory
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert abs(parameter_count(model) / PUBLISHED[name] - 1) < 0.02
    assert parameter_count(model) == SCALES[name].params


def test_a_scale_config_file_is_read_and_bad_ones_are_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    assert scale_config(path=path).hidden_size == 64
    (tmp_path / "bad.json").write_text('{"hidden_size": 3}')
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(InputError):
            scale_config(path=bad)
    with pytest.raises(InputError, match="unknown scale"):
        scale_config("gpt-5")


def test_lift_makes_each_rows_token_its_argmax_and_keeps_the_rest():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    lifted = lift(logits, [1, 2])
    assert lifted.argmax(-1).tolist() == [1, 2]
    assert lifted[0, 2] == 2.0 and lifted[1, 1] == 5.0 and logits[0, 1] == 1.0


def test_forcing_lifts_only_the_nodes_on_the_reference_path():
    """A verdict reveals the accepted tokens and the bonus, nothing further: a node off the reference path
    keeps the model's own logits (a drafter reading them must not learn later reference tokens)."""
    from specdec.bench.forcing import ForcedTarget
    from specdec.tree import DraftTree

    # prompt of 2 tokens, reference 5 6 7 8, one token emitted: the root (it, 5) sits at position 2 (the cache
    # holds the two before it) and the token after it should be 6
    forced = ForcedTarget(SimpleNamespace(name="stub"), prompt_len=2, reference=[5, 6, 7, 8])
    tree = DraftTree([5, 6, 9, 7, 3], [-1, 0, 0, 1, 2])  # 0 -> 1 (6) -> 3 (7): on; 2 (9) -> 4: off
    nodes, truth = forced.on_path(tree, start=2)
    assert nodes == [0, 1, 3] and truth == [6, 7, 8]
    logits = torch.zeros(5, 12)
    lifted = lift(logits, truth, nodes)
    assert lifted[[0, 1, 3]].argmax(-1).tolist() == [6, 7, 8]
    assert torch.equal(lifted[[2, 4]], logits[[2, 4]])


def _reference(tok, model, prompt: str, text: str, n: int) -> tuple[list[int], list[int]]:
    from specdec.engine import eos_token_ids

    ids = tok(prompt)["input_ids"]
    return ids, reference_ids(tok, prompt, text, n, eos_token_ids(model, tok))


PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
TEXT = "    return a - b\n\n\ndef mul(a, b):\n    return a * b\n\n\ndef add(a, b):\n    return a + b\n"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["native", "transformers"])
@pytest.mark.parametrize("method", methods())
def test_forcing_emits_exactly_the_reference(tok, method, runtime):
    """Whatever the model would write (an untrained tiny one), every method decodes exactly the reference."""
    model = tiny.model("llama", seed=2)
    prompt, reference = _reference(tok, model, PROMPT, TEXT, 32)
    assert len(reference) >= 16
    assert tiny.hf_greedy(model, prompt, len(reference)) != reference  # forcing is what makes it so
    decoder = _decoder(method, model, tok, runtime)
    run = forced_generation(decoder.engine, prompt, reference)
    assert run.generation.token_ids == reference
    assert run.generation.stats.runtime == runtime
    assert 0 < run.first_seconds <= run.seconds


def test_the_forced_baseline_emits_exactly_the_reference(tok):
    model = tiny.model("llama", seed=2)
    prompt, reference = _reference(tok, model, PROMPT, TEXT, 24)
    counter = ForwardCounter(model)
    params = SamplingParams(max_new_tokens=len(reference))
    for extra in ({}, {"prompt_lookup_num_tokens": 4}):  # generate() plain and with its prompt lookup
        run = HFMethod("hf", model, counter, **extra).run(prompt, params, reference)
        assert run.token_ids == reference
        assert run.first_seconds is not None and 0 < run.first_seconds <= run.seconds
    counter.close()


def test_llamacpps_forced_loop_emits_exactly_the_reference(tok):
    pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed")
    from specdec.bench.llamacpp import LlamaCppMethod

    model = tiny.model("llama", seed=2, dtype=torch.float32)
    prompt, reference = _reference(tok, model, PROMPT, TEXT, 24)
    method = LlamaCppMethod("llamacpp", model, tok, 2)
    run = method.run(prompt, SamplingParams(max_new_tokens=len(reference)), reference)
    assert run.token_ids == reference


def test_force_reference_follows_positions_in_both_array_kinds():
    import numpy as np

    force = ForceReference(prompt_len=3, reference=[7, 8, 9])
    scores = torch.zeros(1, 12)
    assert force(torch.zeros(1, 4, dtype=torch.long), scores).argmax().item() == 8
    assert force.first_call is not None
    assert int(np.argmax(force(np.zeros(5), np.zeros(12, dtype=np.float32)))) == 9
    assert int(np.argmax(force(np.zeros(9), np.zeros(12, dtype=np.float32)))) == 9  # past the end: the last


def test_bench_scale_runs_end_to_end_on_a_tiny_config(tmp_path, capsys):
    from specdec.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "scale.json"
    argv = ["bench", "--scale-config", str(config), "--tasks", "edit", "--prompts", "1", "--max-new-tokens"]
    argv += ["24", "--methods", "pld,suffix", "--warmup", "0", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "forced acceptance at real size" in printed and "NOT a trained model" in printed
    data = json.loads(out.read_text())
    rows = {(r["task"], r["method"]): r for r in data["results"]}
    assert {m for _, m in rows} == {"hf-vanilla", "vanilla", "pld", "suffix"}  # plain decoding joins
    assert all(r["exact"] for r in rows.values())
    assert rows[("edit", "vanilla")]["speedup_vs_plain"] == 1.0
    assert rows[("edit", "pld")]["mean_accepted_tokens"] > 1.0
    assert set(data["cost_curves"]) == {"transformers", "native", "llamacpp"}


def test_bench_scale_quantized_runs_on_the_gguf_file_against_llamacpps_loop(tmp_path, monkeypatch, capsys):
    """--scale with --quantize q8_0: the shape is written as GGUF and quantized, llama.cpp's forced loop over
    the file is the baseline, every method emits exactly the reference, and only llama.cpp's curve is taken."""
    from specdec.cli import main

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "scale.json"
    argv = ["bench", "--scale-config", str(config), "--quantize", "q8_0", "--tasks", "edit", "--prompts", "1"]
    argv += ["--max-new-tokens", "24", "--methods", "pld,suffix", "--warmup", "0", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs llama.cpp's loop e2e" in printed and "Q8_0" in printed
    data = json.loads(out.read_text())
    assert data["baseline"] == "llamacpp" and data["env"]["model"]["class"] == "GGUFTarget"
    rows = {(r["task"], r["method"]): r for r in data["results"]}
    assert {m for _, m in rows} == {"llamacpp", "vanilla", "pld", "suffix"}
    assert all(r["exact"] for r in rows.values())
    assert rows[("edit", "llamacpp")]["speedup_vs_generate"] == 1.0
    assert set(data["cost_curves"]) == {"llamacpp"} and "sizes" in data["cost_curves"]["llamacpp"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "0.7"], "--temperature 0"),
        (["--tasks", "multiturn"], "reference"),
        (["--yardstick"], "--yardstick"),
    ],
)
def test_bench_scale_refuses_what_it_cannot_force_in_one_line(tmp_path, capsys, argv, message):
    from specdec.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    code = main(["bench", "--scale-config", str(config), "--warmup", "0", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
