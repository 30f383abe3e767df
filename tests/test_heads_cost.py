"""Heads at size (`specdec.bench.heads_cost`): the heads a real model would use have its widths and the
published vocabularies, every kind's drafting step is timed on its packed path, and the projection is its
formula (a costlier head projects lower)."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.bench.heads_cost import (
    EAGLE_DRAFT_VOCAB,
    TITLE,
    YARDSTICK_TAU,
    HeadCost,
    build_head,
    head_costs,
    head_shapes,
    heads_at_size,
    heads_table,
    projection,
)
from specdec.costmodel import CostModel
from specdec.heads.eagle3 import default_aux_layer_ids
from specdec.heads.hydra import HydraConfig
from specdec.heads.medusa import MedusaConfig
from specdec.models.scale import build_scale_model, scale_config
from test_scale import TINY_CONFIG

KINDS = ["eagle", "medusa", "hydra"]
TINY = {**TINY_CONFIG, "num_hidden_layers": 6}  # deep enough for three distinct aux layers
CURVE = CostModel.fit((1, 17, 64), (0.010, 0.020, 0.050))  # seconds per target forward, by tree tokens


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("scale") / "config.json"
    path.write_text(json.dumps(TINY))
    return build_scale_model(scale_config(path=path), torch.bfloat16)


def test_the_heads_of_a_published_shape_have_its_widths_and_the_published_vocabularies():
    config = scale_config("qwen2.5-coder-0.5b")  # 24 layers, 14 heads over 2 kv heads, 151,936 tokens
    shapes = head_shapes(config)
    assert list(shapes) == KINDS
    eagle = shapes["eagle"]
    assert (eagle.hidden_size, eagle.target_hidden_size, eagle.intermediate_size) == (896, 896, 4864)
    assert (eagle.num_attention_heads, eagle.num_key_value_heads, eagle.head_dim) == (14, 2, 64)
    assert eagle.vocab_size == 151936 and eagle.draft_vocab_size == EAGLE_DRAFT_VOCAB == 32000
    assert eagle.aux_layer_ids == default_aux_layer_ids(24) == (2, 12, 21)  # low, middle, high
    for kind in ("medusa", "hydra"):
        heads = shapes[kind]
        assert isinstance(heads, MedusaConfig)
        assert (heads.hidden_size, heads.num_heads, heads.num_hidden_layers) == (896, 4, 1)
        assert heads.draft_vocab_size == heads.vocab_size == 151936  # the config default: the full vocabulary
    assert isinstance(shapes["hydra"], HydraConfig) and not isinstance(shapes["medusa"], HydraConfig)


def test_a_small_vocabulary_caps_eagles_and_the_heads_are_built_in_the_targets_dtype(tiny_model):
    shapes = head_shapes(tiny_model.config)
    assert shapes["eagle"].draft_vocab_size == 9000  # the target has fewer than 32,000 tokens
    assert shapes["eagle"].aux_layer_ids == default_aux_layer_ids(6)
    eagle = build_head(shapes["eagle"], tiny_model)
    assert eagle.fc.in_features == 3 * 64 and eagle.lm_head.weight.shape == (9000, 64)
    assert eagle.lm_head.weight.dtype == torch.bfloat16 and eagle.embed_tokens.shape == (9000, 64)
    medusa = build_head(shapes["medusa"], tiny_model)
    assert [m.weight.shape for m in medusa.lm_heads] == [(9000, 64)] * 4
    assert {p.dtype for p in medusa.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored after building


def test_every_kinds_drafting_step_is_timed_with_the_targets_forwards_from_the_curve(tiny_model):
    costs = head_costs(tiny_model, CURVE, repeats=2)
    assert [c.kind for c in costs] == KINDS
    for c in costs:
        assert c.draft_seconds > 0 and c.share > 0 and c.parameters > 0
        assert (c.one_token_seconds, c.tree_seconds, c.tree_nodes) == (0.010, 0.020, 16)
        assert c.share == c.draft_seconds / 0.010


def test_the_least_step_of_the_repeats_is_kept_by_the_clock_given(tiny_model):
    # per kind two timed steps (start, end pairs); the least per kind: 3, 2, 1 seconds
    ticks = iter([0, 5, 10, 13, 20, 24, 30, 32, 40, 47, 50, 51])
    costs = head_costs(tiny_model, CURVE, repeats=2, clock=lambda: next(ticks))
    assert [c.draft_seconds for c in costs] == [3, 2, 1]
    assert [c.share for c in costs] == [300, 200, 100]


def _cost(kind: str, draft: float) -> HeadCost:
    return HeadCost(kind, "", 1, draft, CURVE(1), CURVE(17), 16, CURVE)


def test_the_projection_is_tau_over_a_step_against_the_one_token_forward():
    [eagle, medusa] = projection([_cost("eagle", 0.005), _cost("medusa", 0.0)], {"eagle": 2.0, "medusa": 1.5})
    assert eagle.speedup == pytest.approx(2.0 * 0.010 / (0.020 + 0.005))  # 0.8
    assert medusa.speedup == pytest.approx(1.5 * 0.010 / 0.020)
    cheap, dear = projection([_cost("hydra", 0.001), _cost("hydra", 0.004)])
    assert cheap.tau == dear.tau == YARDSTICK_TAU["hydra"]
    assert dear.speedup < cheap.speedup  # a costlier head projects lower
    [bigger] = projection([_cost("hydra", 0.001)], tree_nodes=63)  # a bigger tree's forward: CURVE(64)
    assert bigger.speedup == pytest.approx(YARDSTICK_TAU["hydra"] * 0.010 / (0.050 + 0.001))
    assert set(YARDSTICK_TAU) == set(KINDS)


def test_the_table_says_projected_and_bench_scale_gets_rows_or_a_reason(tiny_model):
    rows = projection([_cost(kind, 0.002) for kind in KINDS])
    text = heads_table(rows)
    assert text.startswith(TITLE) and "PROJECTED" in text and "yardstick" in text
    assert sum(line.startswith(f"| {k} |") for line in text.splitlines() for k in KINDS) == 3
    assert rows[0].to_dict()["projected_speedup"] == rows[0].speedup and "curve" not in rows[0].to_dict()
    printed, data = heads_at_size(tiny_model)  # the native runtime's measured curve
    assert printed.startswith(TITLE) and data["projection"] is True
    assert [r["kind"] for r in data["rows"]] == KINDS and all(
        r["projected_speedup"] > 0 for r in data["rows"]
    )
    json.dumps(data)
