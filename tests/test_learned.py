"""What drafters learn across requests on purpose (`Drafter.snapshot_learned` / `restore_learned`): a restore
brings every drafter kind that learns back to the state of its snapshot, so the same prompt then decodes as it
did right after the snapshot (the bench's repeated rounds rely on it), and a snapshot never holds a model."""

from __future__ import annotations

import pytest
import torch

from specdec.api import SpecDecoder
from specdec.costmodel import CostModel
from specdec.drafters import make_drafter

import tiny

PROMPT = list(range(5, 25))

# method -> (options, the attributes that hold timings: they differ from one generation to the next; None:
# what it learns depends on timings throughout, so only the restore itself is compared)
LEARNERS = {
    "recycle": ({}, ()),
    "suffix": ({}, ()),
    "merge": ({}, ()),
    "medusa": ({"max_nodes": 8}, ()),
    "hydra": ({"max_nodes": 8}, ()),
    "eagle": ({"max_nodes": 8}, ("level_seconds",)),
    "auto": ({"cost": CostModel.reference()}, None),
}


def same(a, b) -> bool:
    """Equal values, tensors and objects compared by their contents."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__"):
        return type(a) is type(b) and same(vars(a), vars(b))
    return a == b


def holds_module(value) -> bool:
    if isinstance(value, torch.nn.Module):
        return True
    if isinstance(value, dict):
        return any(holds_module(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_module(v) for v in value)
    return hasattr(value, "__dict__") and holds_module(vars(value))


def without(snapshot: dict, names: tuple[str, ...]) -> dict:
    return {k: v for k, v in snapshot.items() if k not in names}


@pytest.fixture(scope="module")
def model():
    return tiny.model("llama", seed=3, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_a_restore_brings_back_what_the_drafter_had_learned(model, method):
    options, timed = LEARNERS[method]
    if method in ("medusa", "hydra", "eagle", "auto"):  # (auto: its eagle member)
        options = {**options, "head": tiny.untrained_head("eagle" if method == "auto" else method, model)}
    decoder = SpecDecoder(model, tiny.tokenizer(), method, **options)
    drafter = decoder.engine.drafter

    def generate(prompt=PROMPT):
        return decoder.generate(prompt, max_new_tokens=24, ignore_eos=True)

    generate()  # something learned already: the snapshot is not the state bind left
    snapshot = drafter.snapshot_learned()
    assert snapshot and not holds_module(snapshot)  # models and heads are shared, not copied
    first = generate()
    after_first = drafter.snapshot_learned()
    generate(PROMPT[::-1])  # another request (suffix's history holds a repeated one already)
    assert not same(drafter.snapshot_learned(), after_first)  # it taught the drafter more
    drafter.restore_learned(snapshot)
    assert same(drafter.snapshot_learned(), snapshot)
    restored = generate()
    assert restored.token_ids == first.token_ids
    if timed is not None:
        assert restored.stats.target_forwards == first.stats.target_forwards
        assert same(without(drafter.snapshot_learned(), timed), without(after_first, timed))
    drafter.restore_learned(snapshot)  # neither the restore nor the generations since changed the snapshot
    assert same(drafter.snapshot_learned(), snapshot)


@pytest.mark.parametrize("method", ["pld", "lookahead", "vanilla"])
def test_a_drafter_that_learns_nothing_across_requests_copies_nothing(method):
    drafter = make_drafter(method)
    assert drafter.snapshot_learned() == {}
    drafter.restore_learned({})
