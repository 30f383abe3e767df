"""EAGLE-3 head: shapes, the step API against the whole-sequence forward, checkpoints in the vLLM/SGLang layout,
bad checkpoints, and `specdec train-drafter` end to end on a tiny target and corpus."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdec.errors import InputError
from specdec.heads import Eagle3Head, config_for_target, default_aux_layer_ids, load_head, save_head
from specdec.heads.hydra import load_hydra
from specdec.heads.medusa import MedusaConfig, MedusaHeads, load_medusa, save_medusa

import tiny

HIDDEN = 32


def make_head(target, draft_vocab: int = 96, dtype=torch.float64, seed: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head(config_for_target(target, draft_vocab, aux_layer_ids=(1, 2, 3))).to(dtype)
    head.set_draft_vocab(torch.arange(0, 2 * draft_vocab, 2))
    head.bind_embedding(target.get_input_embeddings().weight)
    return head


@pytest.fixture(scope="module")
def target():
    return tiny.model(layers=4, hidden=HIDDEN)


def inputs(t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(1, t, 3 * HIDDEN, dtype=torch.float64, generator=g)
    tokens = torch.randint(0, 300, (1, t), generator=g)
    return aux, tokens


def test_default_aux_layers_are_distinct_low_middle_high():
    assert default_aux_layer_ids(32) == (2, 16, 29)  # vLLM's default where it is well defined
    assert default_aux_layer_ids(6) == (1, 3, 5)  # the shipped target: vLLM's would be (2, 3, 3)
    for layers in range(4, 40):
        low, mid, high = default_aux_layer_ids(layers)
        assert 0 < low < mid < high <= layers - 1


def test_shapes_and_draft_vocab(target):
    head = make_head(target)
    aux, tokens = inputs(10)
    outs = head.forward_train(aux, tokens, steps=3)
    assert [tuple(o.shape) for o in outs] == [(1, 10, 96)] * 3
    assert head.draft_to_target.tolist() == list(range(0, 192, 2))
    assert int(head.t2d.sum()) == 96 and bool(head.t2d[4]) and not bool(head.t2d[5])
    params = dict(head.named_parameters())
    assert params["fc.weight"].shape == (HIDDEN, 3 * HIDDEN)
    assert params["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * HIDDEN  # q/k/v read [emb, feature]
    assert params["lm_head.weight"].shape == (96, HIDDEN)


def test_step_api_equals_whole_sequence_forward(target):
    """Prefill a prefix, then step over the rest one entry at a time: the logits and features are those of
    forward_train; after a crop, re-stepping gives them again."""
    head = make_head(target)
    aux, tokens = inputs(14)
    full = head.forward_train(aux, tokens, steps=1)[0][0]  # [T, Vd]; row t's input token is tokens[t + 1]
    cache = head.new_cache(32, torch.float64)
    logits, _ = head.step(cache, aux[0, :5], tokens[0, 1:6], torch.arange(5))
    torch.testing.assert_close(logits, full[:5], rtol=0, atol=1e-12)
    for t in range(5, 13):
        logits, _ = head.step(cache, aux[0, t : t + 1], tokens[0, t + 1 : t + 2], torch.tensor([t]))
        torch.testing.assert_close(logits[0], full[t], rtol=0, atol=1e-12)
    cache.crop(7)
    assert cache.length == 7
    logits, _ = head.step(cache, aux[0, 7:10], tokens[0, 8:11], torch.arange(7, 10))
    torch.testing.assert_close(logits, full[7:10], rtol=0, atol=1e-12)


def test_training_time_test_is_chain_drafting(target):
    """Unroll step k of forward_train at row r == drafting k steps with the step API from anchor r, feeding
    the head's own features back (the inference the training-time test simulates)."""
    head = make_head(target)
    aux, tokens = inputs(16)
    outs = head.forward_train(aux, tokens, steps=4)
    for r in (3, 9):
        cache = head.new_cache(32, torch.float64)
        logits, feats = head.step(cache, aux[0, : r + 1], tokens[0, 1 : r + 2], torch.arange(r + 1))
        torch.testing.assert_close(logits[-1], outs[0][0, r], rtol=0, atol=1e-12)
        feat = feats[-1:]
        for k in range(1, 4):
            logits, feat = head.step(cache, feat, tokens[0, r + 1 + k : r + 2 + k], torch.tensor([r + k]))
            torch.testing.assert_close(logits[0], outs[k][0, r], rtol=0, atol=1e-12)


def test_tree_mask_step_sees_only_ancestors(target):
    """Two sibling entries appended at once with a mask that hides them from each other equal each appended
    alone on the same prefix."""
    head = make_head(target)
    aux, tokens = inputs(8)
    cache = head.new_cache(16, torch.float64)
    _, feats = head.step(cache, aux[0, :6], tokens[0, 1:7], torch.arange(6))
    feat = feats[-1:].expand(2, -1)
    siblings = torch.tensor([11, 12])
    visible = torch.ones(2, 8, dtype=torch.bool)
    visible[0, 7] = visible[1, 6] = False
    both, _ = head.step(cache, feat, siblings, torch.tensor([6, 6]), visible=visible)
    for i in range(2):
        cache.crop(6)
        alone, _ = head.step(cache, feat[:1], siblings[i : i + 1], torch.tensor([6]))
        torch.testing.assert_close(both[i], alone[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("norm_before_residual", "dtype"),
    [(False, torch.float64), (True, torch.float64), (False, torch.float32)],
)
def test_packed_head_step_equals_the_reference_step(target, norm_before_residual, dtype):
    """Drafting's packed kernel computes Eagle3Head.step: prefill, a tree level with a sibling mask, a chain.
    In float64 any difference beyond rounding is a bug (a wrong rotary pairing, norm or residual); float32
    runs its products of 2+ rows through oneDNN's prepacked weights (`Matrix`), a different rounding."""
    from specdec.heads.eagle3_packed import PackedHead

    head = make_head(target, dtype=dtype)
    head.config.norm_before_residual = norm_before_residual
    packed = PackedHead(head)
    assert (packed.wqkv.packed is not None) == (dtype == torch.float32)
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    aux, tokens = inputs(12)
    aux = aux.to(dtype)
    ref_cache, cache = head.new_cache(32, dtype), head.new_cache(32, dtype)
    calls = [
        (aux[0, :7], tokens[0, 1:8], torch.arange(7), None),
        (torch.randn(3, HIDDEN, dtype=dtype), tokens[0, 8:11], torch.tensor([7, 7, 8]), None),
        (
            aux[0, 7:9],
            tokens[0, 9:11],
            torch.tensor([7, 8]),
            torch.tensor([[1] * 7 + [1, 0, 1, 1, 0], [1] * 12]).bool(),
        ),
    ]
    for features, toks, positions, visible in calls:
        want = head.step(ref_cache, features, toks, positions, visible)
        got = packed.step(cache, features, toks, positions, visible)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert cache.length == ref_cache.length == 12


def test_save_load_round_trip_in_the_engines_layout(target, tmp_path):
    head = make_head(target, dtype=torch.float32)
    save_head(head, tmp_path / "h", dtype=torch.float32)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == 96 and config["target_hidden_size"] == HIDDEN
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["tie_word_embeddings"] is False
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert set(tensors) == {
        *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "midlayer.input_layernorm.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.post_attention_layernorm.weight",
        "fc.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
    }
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    loaded = load_head(tmp_path / "h", target.float())
    aux, tokens = inputs(9)
    a = head.forward_train(aux.float(), tokens, steps=2)
    b = loaded.forward_train(aux.float(), tokens, steps=2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    # bf16 on disk (shipping), float32 in memory
    save_head(head, tmp_path / "bf16")
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16
    assert load_head(tmp_path / "bf16").fc.weight.dtype == torch.float32


def one_line_error(fn) -> str:
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_checkpoints_are_one_line_errors(target, tmp_path):
    head = make_head(target, dtype=torch.float32)
    save_head(head, tmp_path / "h")
    other_width = tiny.model(layers=4, hidden=48)
    assert "hidden size 32" in one_line_error(lambda: load_head(tmp_path / "h", other_width))
    other_vocab = tiny.model(layers=4, hidden=HIDDEN, vocab_size=500)
    assert "vocabulary" in one_line_error(lambda: load_head(tmp_path / "h", other_vocab))
    shallow = tiny.model(layers=2, hidden=HIDDEN)
    assert "layers" in one_line_error(lambda: load_head(tmp_path / "h", shallow))

    (tmp_path / "h" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "corrupt" in one_line_error(lambda: load_head(tmp_path / "h"))
    (tmp_path / "h" / "config.json").write_text("{not json")
    assert "config.json" in one_line_error(lambda: load_head(tmp_path / "h"))
    assert "no config.json" in one_line_error(lambda: load_head(tmp_path / "missing"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert "not an EAGLE-3 head" in one_line_error(lambda: load_head(tmp_path / "llama"))


def test_shape_mismatch_in_checkpoint_is_one_line_error(target, tmp_path):
    save_head(make_head(target, dtype=torch.float32), tmp_path / "h")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    config["draft_vocab_size"] = 50
    (tmp_path / "h" / "config.json").write_text(json.dumps(config))
    assert "config.json implies" in one_line_error(lambda: load_head(tmp_path / "h"))


@pytest.mark.slow
def test_train_drafter_smoke(tmp_path):
    """prepare features -> train -> interrupt -> resume -> export -> load, on a tiny target and corpus."""
    from specdec.train import drafter as d

    target = tiny.model(layers=4, hidden=HIDDEN, dtype=torch.float32)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in ("bisect.py", "heapq.py", "textwrap.py")]
    work = tmp_path / "work"
    corpus = d.prepare_corpus(work, "tiny", tiny.tokenizer(), files)
    assert (corpus / "train.bin").stat().st_size > 0 and (corpus / "heldout.bin").stat().st_size > 0
    data = d.DataConfig(
        seq_len=64,
        feature_tokens=64 * 6,
        heldout_windows=2,
        greedy_prompts=2,
        greedy_prompt_len=16,
        greedy_new_tokens=16,
    )
    aux_ids = [1, 2, 3]
    stores = d.prepare_features(work, target, corpus, aux_ids, data)
    assert stores["train"].limit == 6 and stores["greedy"].spec.seq_len == 32
    w = stores["train"].window(0)
    ids = w["ids"][None]
    ref = d.target_features(target, ids, aux_ids)
    torch.testing.assert_close(w["aux"], ref["aux"][0].float(), rtol=2e-3, atol=2e-3)  # float16 on disk
    assert torch.equal(w["top"], ref["top"][0])

    cfg = d.HeadTrainConfig(
        tokens=64 * 2 * 4, batch_seqs=2, segment_len=32, ttt_steps=2, draft_vocab_size=80, eval_depth=3
    )
    ckpt = d.train_head(work, target, stores["train"], cfg, stop_after=2)  # "interrupted" after 2 steps
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    d.train_head(work, target, stores["train"], cfg)  # the same call resumes and finishes
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 64
    log = [json.loads(x) for x in (work / "eagle.log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in log)

    out = tmp_path / "head"
    about = {"target": "tiny", "data": "three stdlib files", "command": "specdec train-drafter ..."}
    metrics = d.export_head(work, target, stores, out, data, about)
    assert metrics["steps"] == 4
    card = (out / "MODEL_CARD.md").read_text()
    assert "tau" in card and "greedy" in card
    for name in ("greedy", "heldout"):
        acc = metrics["acceptance"][name]["acceptance_by_depth"]
        assert len(acc) == 3 and all(1 >= a >= b >= 0 for a, b in zip(acc, acc[1:], strict=False))
    loaded = load_head(out, target)
    trained, _ = d.load_trained(work, target, stores["train"])
    b = stores["heldout"].batch([0])
    got = loaded.forward_train(b["aux"], b["ids"], steps=2)
    want = trained.forward_train(b["aux"], b["ids"], steps=2)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0.05, atol=0.05)  # bf16 weights on disk
    assert torch.equal(loaded.d2t, trained.d2t)

    # Medusa heads train on the same cached features (their own checkpoint in the same working directory)
    d.train_head(work, target, stores["train"], cfg, method="medusa", stop_after=1)
    d.train_head(work, target, stores["train"], cfg, method="medusa")
    assert torch.load(work / "medusa.ckpt", weights_only=False)["step"] == 4
    metrics = d.export_head(work, target, stores, tmp_path / "medusa", data, about, method="medusa")
    assert metrics["acceptance"]["greedy"]["depth"] == 3
    assert "Medusa" in (tmp_path / "medusa" / "MODEL_CARD.md").read_text()
    medusa = load_medusa(tmp_path / "medusa", target)
    assert len(medusa(b["final"])) == cfg.medusa_heads

    # Hydra heads too; what is loaded back drafts like what was trained (teacher-forced on the text)
    hydra_cfg = d.HeadTrainConfig(**{**asdict(cfg), "hydra_heads": 3})
    d.train_head(work, target, stores["train"], hydra_cfg, method="hydra", stop_after=1)
    d.train_head(work, target, stores["train"], hydra_cfg, method="hydra")
    assert torch.load(work / "hydra.ckpt", weights_only=False)["step"] == 4
    metrics = d.export_head(work, target, stores, tmp_path / "hydra", data, about, method="hydra")
    assert metrics["acceptance"]["greedy"]["depth"] == 3 and metrics["latency_ms"]["head_step_8"] > 0
    assert "Hydra heads" in (tmp_path / "hydra" / "MODEL_CARD.md").read_text()
    hydra = load_hydra(tmp_path / "hydra", target)
    trained, _ = d.load_trained(work, target, stores["train"], method="hydra")
    got = hydra.forward_train(b["final"], b["ids"], 3)
    want = trained.forward_train(b["final"], b["ids"], 3)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0.05, atol=0.05)  # bf16 weights on disk


def test_chain_acceptance_counts_leading_matches(target, tmp_path):
    """A head whose logits are rigged to the target's greedy tokens accepts every depth on the target's own
    greedy text; the same head with one depth wrong stops there."""
    from specdec.train import drafter as d

    spec = d.FeatureSpec(seq_len=12, n_seqs=1, hidden_size=HIDDEN, aux_layer_ids=[1, 2, 3])
    store = d.FeatureStore(tmp_path / "f", spec)
    g = [5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]  # top[p] = the target's greedy token after p
    ids = [3] + g[:-1]  # greedy text: every token is the greedy token of the position before
    store.arrays["ids"][0] = ids
    store.arrays["top"][0] = g
    store.flush(1)

    class Rigged(torch.nn.Module):
        draft_to_target = torch.arange(64)

        def __init__(self, wrong_at: int | None):
            super().__init__()
            self.wrong_at = wrong_at

        def forward_train(self, aux, tokens, steps):
            outs = []
            for k in range(steps):
                pred = torch.tensor(g[1 + k :] + [0] * (1 + k))[None]  # row t drafts top[t + 1 + k]
                if k == self.wrong_at:
                    pred = pred + 1
                outs.append(torch.nn.functional.one_hot(pred, 64).float())
            return outs

    perfect = d.chain_acceptance(Rigged(None), store, depth=3)
    assert perfect["acceptance_by_depth"] == [1.0, 1.0, 1.0] and perfect["tau"] == 4.0
    stops = d.chain_acceptance(Rigged(1), store, depth=3)
    assert stops["acceptance_by_depth"] == [1.0, 0.0, 0.0] and stops["tau"] == 2.0


def test_chain_acceptance_medusa_needs_the_bonus_token_to_be_the_targets(tmp_path):
    """Where the text leaves the target's greedy path at position p, an EAGLE anchor at p - 1 still reads the
    text's token p as given (a verified state), but a Medusa anchor there drafts after the target's own token,
    which the text's features do not describe: not counted."""
    from specdec.train import drafter as d

    spec = d.FeatureSpec(seq_len=10, n_seqs=1, hidden_size=HIDDEN, aux_layer_ids=[1, 2, 3])
    store = d.FeatureStore(tmp_path / "f", spec)
    g = [5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    ids = [3] + g[:-1]
    ids[4] = 40  # the text leaves the greedy path at position 4
    store.arrays["ids"][0] = ids
    store.arrays["top"][0] = g
    store.flush(1)

    def perfect(rows):
        return [
            torch.nn.functional.one_hot(torch.tensor(g[1 + k :] + [0] * (1 + k))[None], 64).float()
            for k in rows
        ]

    class Eagle(torch.nn.Module):
        draft_to_target = torch.arange(64)

        def forward_train(self, aux, tokens, steps):
            return perfect(range(steps))

    class Medusa(torch.nn.Module):
        draft_to_target = torch.arange(64)

        def forward(self, final):
            return perfect(range(2))

    eagle = d.chain_acceptance(Eagle(), store, depth=1, method="eagle")
    medusa = d.chain_acceptance(Medusa(), store, depth=1, method="medusa")
    assert eagle["anchors"] == medusa["anchors"] == 8
    assert eagle["acceptance_by_depth"] == [1.0]  # depth 1 never needs the text to agree
    assert medusa["acceptance_by_depth"] == [7 / 8]  # anchor 3 reads token 4, which is not the target's


def test_medusa_round_trip_in_vllms_layout(target, tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(HIDDEN, 384, num_heads=3, num_hidden_layers=1, truncated_vocab_size=50))
    heads.set_draft_vocab(torch.arange(100, 150))
    for p in heads.parameters():  # not the zero init, so the round trip compares real values
        torch.nn.init.normal_(p)
    save_medusa(heads, tmp_path / "m", dtype=torch.float32)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["MedusaModel"] and config["truncated_vocab_size"] == 50
    assert set(load_file(str(tmp_path / "m" / "model.safetensors"))) == {
        *(f"blocks.{i}.layers.0.{w}" for i in range(3) for w in ("weight", "bias")),
        *(f"lm_heads.{i}.weight" for i in range(3)),
        "token_map",
    }
    loaded = load_medusa(tmp_path / "m", target.float())
    x = torch.randn(5, HIDDEN)
    for a, b in zip(heads(x), loaded(x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.draft_to_target, torch.arange(100, 150))
    wide = tiny.model(layers=4, hidden=48)
    assert "hidden size 32" in one_line_error(lambda: load_medusa(tmp_path / "m", wide))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x01" * 40)
    assert "corrupt" in one_line_error(lambda: load_medusa(tmp_path / "m"))
