"""`specdec export-drafter`: heads written for vLLM/SGLang load back into specdec with identical drafts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from specdec import SpecDecoder
from specdec.cli import main
from specdec.heads import Eagle3Head, config_for_target, load_config, save_head
from specdec.heads.hydra import save_hydra
from specdec.heads.layer_ids import FIELD, MARKER
from specdec.heads.medusa import save_medusa

import tiny


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eagle", "medusa"])
@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_export_round_trip(tok, tmp_path, capsys, method, fmt):
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
        hf = list(
            head.config.aux_layer_ids
        )  # each engine's own numbering, where it reads them (docs/export.md)
        assert config["eagle_config"][FIELD] == (hf if fmt == "vllm" else [i - 1 for i in hf])
        assert config.get(FIELD) == (hf if fmt == "vllm" else None) and config[MARKER] == fmt
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
        dec = SpecDecoder(model, tok, method, head=str(where), max_nodes=8)
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


# Each engine's capture rule restated from its code (the versions and lines docs/export.md cites), over HF's
# decoder layers: inputs[i] is what enters decoder layer i (HF's residual stream: what vLLM and SGLang hold as
# hidden_states + residual there), outputs[i] what leaves it.


def vllm_capture(config: dict, inputs: list, outputs: list) -> list:
    """vLLM 0.34: the ids are config.json's top-level field (get_eagle3_aux_layers_from_config), else
    (2, L // 2, L - 3); kept as a sorted set; LlamaModel.forward appends id 0 before the first layer and id
    idx + 1 after layer idx."""
    n = len(inputs)
    ids = sorted(set(config.get(FIELD) or (2, n // 2, n - 3)))
    return ([inputs[0]] if 0 in ids else []) + [outputs[i] for i in range(n) if i + 1 in ids]


def sglang_capture(config: dict, inputs: list, outputs: list) -> list:
    """SGLang 0.5.23: the ids are eagle_config's (_resolve_eagle_aux_hidden_state); set_eagle3_layers_to_capture
    makes them [a + 1 for a in ids] ([2, L // 2, L - 3] as they are without ids); LlamaModel.forward captures
    what enters layer i for each i in that list."""
    n = len(inputs)
    ids = (config.get("eagle_config") or {}).get(FIELD)
    capture = [a + 1 for a in ids] if ids is not None else [2, n // 2, n - 3]
    return [inputs[i] for i in range(n) if i in capture]


CAPTURE = {"vllm": vllm_capture, "sglang": sglang_capture}


@torch.no_grad()
def layer_states(model, ids: list[int]) -> tuple[list, list]:
    """What enters and leaves each of the HF model's decoder layers over `ids`: two lists of [T, H]."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def enter(_m, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"])[0])

    def leave(_m, _args, out):
        outputs.append((out[0] if isinstance(out, tuple) else out)[0])

    hooks = [
        h
        for layer in model.model.layers
        for h in (
            layer.register_forward_pre_hook(enter, with_kwargs=True),
            layer.register_forward_hook(leave),
        )
    ]
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def specdec_features(tok, model, head, prompt: list[int]) -> torch.Tensor:
    """The features specdec's own forward feeds the head at the prefill (positions 0 .. P-2): [P - 1, 3H]."""
    dec = SpecDecoder(model, tok, "eagle", head=head, max_nodes=4)
    packed = dec.drafter.packed
    fed = []
    step = packed.step
    packed.step = lambda cache, features, *a, **k: (fed.append(features), step(cache, features, *a, **k))[1]
    dec.generate(prompt, max_new_tokens=1, ignore_eos=True)
    return fed[0]


def eagle_head(model, ids: tuple[int, ...]) -> Eagle3Head:
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    head = Eagle3Head(config_for_target(model, vocab, aux_layer_ids=ids)).to(next(model.parameters()).dtype)
    head.set_draft_vocab(torch.arange(vocab))
    return head


def shifted(config: dict, by: int) -> dict:
    """The same config.json with every layer id one layer off."""
    out = {**config, "eagle_config": dict(config["eagle_config"])}
    for where in (out, out["eagle_config"]):
        if FIELD in where:
            where[FIELD] = [i + by for i in where[FIELD]]
    return out


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_each_engine_reads_the_export_as_the_layers_specdec_feeds_the_head(tok, tmp_path, fmt):
    """The export read through the engine's own capture rule feeds the head exactly the hidden states specdec's
    forward does; the same file one layer off does not (the bug this guards against: SGLang was given HF
    numbers, and read every layer one too deep)."""
    model = tiny.model("llama", seed=4, layers=6, dtype=torch.float32)
    head = eagle_head(model, (1, 2, 4))  # low, middle, high; one off either way still names real layers
    save_head(head, tmp_path / "head", dtype=torch.float32)
    out = tmp_path / fmt
    assert main(["export-drafter", str(tmp_path / "head"), "--format", fmt, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    prompt = list(range(20, 44))
    want = specdec_features(tok, model, head, prompt)
    inputs, outputs = layer_states(model, prompt[:-1])

    def fed(cfg: dict) -> torch.Tensor:
        return torch.cat(CAPTURE[fmt](cfg, inputs, outputs), dim=-1)

    torch.testing.assert_close(fed(config), want, rtol=1e-4, atol=1e-4)
    for by in (-1, 1):
        assert fed(shifted(config, by)).shape == want.shape
        assert not torch.allclose(fed(shifted(config, by)), want, rtol=1e-2, atol=1e-2)
    assert load_config(out).aux_layer_ids == (1, 2, 4)  # and specdec reads its own export back the same


def test_export_refuses_ids_an_engine_cannot_capture(tmp_path, capsys):
    model = tiny.model("llama", seed=4, layers=6, dtype=torch.float32)
    for name, ids in (("embeddings", (0, 2, 4)), ("unordered", (4, 1, 2))):
        save_head(eagle_head(model, ids), tmp_path / name, dtype=torch.float32)
    export = ["export-drafter", str(tmp_path / "embeddings"), "--out", str(tmp_path / "o")]
    assert (
        main([*export, "--format", "sglang"]) == 2
    )  # SGLang's ids name layer outputs: none is the embeddings
    err = capsys.readouterr().err
    assert "embeddings" in err and "--format vllm" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert main([*export, "--format", "vllm"]) == 0  # vLLM's id 0 is the embeddings
    assert json.loads((tmp_path / "o" / "config.json").read_text())[FIELD] == [0, 2, 4]
    capsys.readouterr()
    export = ["export-drafter", str(tmp_path / "unordered"), "--format", "vllm", "--out", str(tmp_path / "u")]
    assert main(export) == 2 and "layer order" in capsys.readouterr().err
