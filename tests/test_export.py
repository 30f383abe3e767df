"""`specdec export-drafter`: heads written for vLLM/SGLang load back into specdec with identical drafts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specdec import SpecDecoder
from specdec.cli import main
from specdec.heads import save_head
from specdec.heads.hydra import save_hydra
from specdec.heads.medusa import save_medusa

import tiny

TOKENIZER = tiny.tokenizer()


@pytest.mark.parametrize("method", ["eagle", "medusa"])
@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_export_round_trip(tmp_path, capsys, method, fmt):
    model = tiny.model("llama", seed=4, layers=4, dtype=torch.float32)
    head = tiny.untrained_head(method, model)
    src = tmp_path / "head"
    (save_medusa if method == "medusa" else save_head)(head, src, dtype=torch.float32)
    out = tmp_path / "out"
    code = main(["export-drafter", str(src), "--format", fmt, "--out", str(out), "--dtype", "float32"])
    if method == "medusa" and fmt == "sglang":  # SGLang has no Medusa loader: refused in one line
        assert code == 2 and "SGLang has no Medusa loader" in capsys.readouterr().err
        return
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    if method == "eagle":
        assert config["architectures"] == [
            {"vllm": "Eagle3LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle3"}[fmt]
        ]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(head.config.aux_layer_ids)
        names = set(load_file(str(out / "model.safetensors")))
        assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
        assert "midlayer.self_attn.q_proj.weight" in names and "embed_tokens.weight" not in names
    else:
        assert config["architectures"] == ["MedusaModel"]
        assert {"blocks.0.layers.0.weight", "lm_heads.0.weight", "token_map"} <= set(
            load_file(str(out / "model.safetensors"))
        )
    prompt = [5, 9, 14, 3, 77, 1]
    runs = []
    for where in (src, out):  # the same drafts: the same tree sizes and acceptance, step for step
        dec = SpecDecoder(model, TOKENIZER, method, head=str(where), max_nodes=8)
        runs.append(dec.generate(prompt, max_new_tokens=16, ignore_eos=True))
    assert runs[0].token_ids == runs[1].token_ids == tiny.hf_greedy(model, prompt, 16)
    assert runs[0].stats.accepted_by_depth == runs[1].stats.accepted_by_depth
    assert runs[0].stats.draft_nodes == runs[1].stats.draft_nodes


def test_export_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(["export-drafter", str(tmp_path / "nowhere"), "--format", "vllm", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a head directory" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert (
        main(["export-drafter", str(tmp_path / "model"), "--format", "vllm", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "not an EAGLE-3 or Medusa head" in err and err.count("\n") == 1

    save_hydra(tiny.random_hydra(tiny.model("llama", seed=4)), tmp_path / "hydra", dtype=torch.float32)
    assert (
        main(["export-drafter", str(tmp_path / "hydra"), "--format", "vllm", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "neither vLLM nor SGLang loads" in err and err.count("\n") == 1
