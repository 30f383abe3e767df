"""The eagle drafter through the engine: greedy equality with generate(), its tree and cache bookkeeping, and
bad heads. (Its sampled distribution is checked with every other method in test_sampling.py.)"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from specdec import SpecDecoder
from specdec.cli import main
from specdec.drafters.eagle import Eagle, shipped_head_dir
from specdec.errors import InputError
from specdec.heads import Eagle3Head, config_for_target, layer_ids, load_config, save_head
from specdec.heads.layer_ids import FIELD, MARKER
from specdec.models.loading import load_causal_lm

import tiny
from tiny import random_head


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("options", [{}, {"max_nodes": 12, "top_k": 3, "beam": 2, "depth": 4}])
def test_eagle_equals_generate(tok, arch, options):
    model = tiny.model(arch, seed=1, layers=4)
    dec = SpecDecoder(model, tok, "eagle", head=random_head(model), **options)
    for prompt in ([5], [5, 9, 14, 3, 77, 1], list(range(40, 70))):
        out = dec.generate(prompt, max_new_tokens=20, ignore_eos=True)
        assert out.token_ids == tiny.hf_greedy(model, prompt, 20)


def test_eagle_accepts_drafts_on_a_small_vocabulary(tok):
    """Vocabulary 8, top-8 children: the target's token is always among the root's children."""
    model = tiny.model("llama", seed=2, vocab_size=8, layers=2, eos=99)  # an EOS it never emits
    dec = SpecDecoder(model, tok, "eagle", head=random_head(model), max_nodes=16)
    out = dec.generate([1, 2, 3, 1, 2], max_new_tokens=30, ignore_eos=True)
    assert out.token_ids == tiny.hf_greedy(model, [1, 2, 3, 1, 2], 30)
    assert out.stats.accepted_by_depth[0] == out.stats.target_forwards  # depth 1 always right
    assert out.stats.mean_accepted_tokens > 1.5


def test_eagle_head_cache_keeps_one_entry_per_verified_position(tok):
    model = tiny.model("llama", seed=3, layers=4)
    drafter = Eagle(head=random_head(model), max_nodes=10)
    states = []
    release = drafter.release
    drafter.release = lambda s: (states.append(s), release(s))  # type: ignore[method-assign]
    prompt = [7, 8, 9, 10, 11]
    out = SpecDecoder(model, tok, drafter).generate(prompt, max_new_tokens=17, ignore_eos=True)
    state = states[0]
    # every position but the newest token's (the next root) has its verified entry, and nothing else
    assert state.committed == state.cache.length == len(prompt) + len(out.token_ids) - 1
    assert state.root_pos == len(prompt) + len(out.token_ids) - 1


def test_eagle_refuses_a_head_for_another_model(tok, tmp_path):
    model = tiny.model("llama", seed=1, layers=4)
    other = tiny.model("llama", seed=1, layers=4, hidden=64)
    head = random_head(other)
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "eagle", head=head)
    save_head(head, tmp_path / "head")
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "eagle", head=str(tmp_path / "head"))
    (tmp_path / "head" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="corrupt"):
        SpecDecoder(model, tok, "eagle", head=str(tmp_path / "head"))
    for bad in ({"top_k": 0}, {"max_nodes": "lots"}, {"depth": 1.5}):
        with pytest.raises(InputError):
            SpecDecoder(model, tok, "eagle", head=head, **bad)


@pytest.mark.slow
def test_a_head_directory_is_the_draft_of_from_pretrained(tmp_path):
    """`--draft HEAD_DIR` with a head method: the directory is loaded as the head, not as a draft model."""
    tiny.save(tmp_path / "model", layers=4)
    model, _ = load_causal_lm(str(tmp_path / "model"))
    save_head(random_head(model), tmp_path / "head", dtype=torch.float32)
    dec = SpecDecoder.from_pretrained(str(tmp_path / "model"), draft=str(tmp_path / "head"), method="eagle")
    prompt = [5, 9, 14, 3]
    assert dec.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == tiny.hf_greedy(
        model, prompt, 12
    )
    with pytest.raises(InputError, match="not a head directory|no config.json|head"):
        SpecDecoder.from_pretrained(str(tmp_path / "model"), draft=str(tmp_path / "nowhere"), method="eagle")


def test_drafting_stops_where_another_level_cannot_pay():
    """SpecDec++'s stop rule on the tree: a likely frontier node is expanded while a level is cheap beside the
    forward; an unlikely one never is (its children could not earn their verification), and a level costing
    more than it could add stops drafting."""
    import math

    from specdec.costmodel import CostModel, OnlineCost
    from specdec.runtime import select_runtime

    model = tiny.model("llama", seed=1, layers=4)
    drafter = Eagle(head=random_head(model))
    drafter.bind(model, select_runtime(model, hidden_states=True))  # the runtime an engine gives eagle
    drafter.cost = OnlineCost(CostModel.fit([1, 2, 64], [10e-3, 11e-3, 73e-3]), rate=0.0)  # 10 ms + 1 ms/node
    parents, scores = [-1, 0, 0], [0.0, math.log(0.9), math.log(0.05)]  # the root's two children
    drafter.level_seconds = 0.5e-3
    assert drafter._worth_expanding([1, 2], [0], parents, scores) == [1]
    drafter.level_seconds = 50e-3  # a level dearer than the forward it could shorten
    assert drafter._worth_expanding([1, 2], [0], parents, scores) == []


def sglang_style_head(model, path, hf_ids=(1, 2, 4)):
    """A head as SGLang's trainer (SpecForge) writes one: SGLang's architecture name and SGLang-numbered ids
    in eagle_config (hf_ids - 1), nothing else to say whose numbering they are in."""
    torch.manual_seed(0)
    head = Eagle3Head(config_for_target(model, model.config.vocab_size, aux_layer_ids=hf_ids))
    head.set_draft_vocab(torch.arange(model.config.vocab_size))
    save_head(head.to(next(model.parameters()).dtype), path, dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    del config[FIELD], config[MARKER]
    config["eagle_config"][FIELD] = [i - 1 for i in hf_ids]
    (path / "config.json").write_text(json.dumps(config))
    return path


def rewrite(path, **fields):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))


def test_layer_ids_are_read_in_the_numbering_the_file_says(tmp_path, caplog):
    model = tiny.model("llama", seed=1, layers=6)
    d = sglang_style_head(model, tmp_path / "head")
    with caplog.at_level(logging.WARNING, "specdec.heads"):
        config = load_config(d)  # nothing says: SGLang's reading, said in one line
    assert config.aux_layer_ids == (1, 2, 4) and config.layer_ids_reading.startswith("sglang (the default")
    (warning,) = caplog.records
    assert "[0, 1, 3]" in warning.getMessage() and "--layer-ids-from vllm" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "specdec.heads"):
        assert load_config(d, "vllm").aux_layer_ids == (0, 1, 3)  # asked: no warning
        assert load_config(d, "sglang").layer_ids_reading == "sglang (--layer-ids-from)"
    assert not caplog.records
    rewrite(d, architectures=["Eagle3LlamaForCausalLM"])  # a name only vLLM registers: its numbering
    assert load_config(d).aux_layer_ids == (0, 1, 3)
    with pytest.raises(InputError, match="contradicts"):
        load_config(d, "sglang")
    rewrite(
        d, architectures=["LlamaForCausalLMEagle3"], **{FIELD: [2, 3, 5]}
    )  # vLLM's own field: its numbering
    assert load_config(d).aux_layer_ids == (2, 3, 5)
    rewrite(d, **{MARKER: "sglang"})  # specdec's marker says, whatever else the file holds
    assert load_config(d).aux_layer_ids == (1, 2, 4)
    rewrite(d, **{MARKER: "hf"})
    with pytest.raises(InputError, match=MARKER):
        load_config(d)
    speculators = {"speculators_model_type": "eagle3", FIELD: [2, 16, 29]}  # vLLM's converter writes these
    assert layer_ids.read(speculators, "config.json").semantics == "vllm"


def test_the_shipped_head_is_read_by_its_training_record(tmp_path):
    """The shipped head predates the marker and carries SGLang's architecture name; its training record says
    it was trained on HF layers [1, 3, 5], which decides the reading and refuses any other."""
    config = load_config(shipped_head_dir())
    assert config.aux_layer_ids == (1, 3, 5) and "training record" in config.layer_ids_reading
    with pytest.raises(InputError, match="contradicts"):
        load_config(shipped_head_dir(), "sglang")
    d = tmp_path / "head"
    shutil.copytree(shipped_head_dir(), d)
    rewrite(d, eagle_config={FIELD: [0, 2, 4]})  # written in SGLang's numbering: the record says so
    assert load_config(d).aux_layer_ids == (1, 3, 5)
    rewrite(d, eagle_config={FIELD: [2, 3, 4]})
    with pytest.raises(InputError, match="training record"):
        load_config(d)


@pytest.mark.slow
def test_layer_ids_from_on_the_command_line(tmp_path, capsys):
    tiny.save(tmp_path / "model", layers=6)
    model, _ = load_causal_lm(str(tmp_path / "model"))
    head = sglang_style_head(model, tmp_path / "head")
    generate = ["generate", "def f", "--model", str(tmp_path / "model"), "--max-new-tokens", "4", "--json"]
    for given, ids in (("sglang", [1, 2, 4]), ("vllm", [0, 1, 3])):
        code = main([*generate, "--method", "eagle", "--draft", str(head), "--layer-ids-from", given])
        report = json.loads(capsys.readouterr().out)["stats"]["drafter"]
        assert code == 0 and report == {"layer_ids": ids, "layer_ids_read_as": f"{given} (--layer-ids-from)"}
    assert main([*generate, "--layer-ids-from", "vllm"]) == 2  # no head to read
    err = capsys.readouterr().err
    assert "EAGLE-3 head given as --draft" in err and err.count("\n") == 1
