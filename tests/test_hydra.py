"""The hydra drafter through the engine: path-dependent drafts, what it learns, bad heads (greedy equality
with generate() and rank learning: test_medusa.py). (Its sampled distribution is checked with every other method in test_sampling.py.)"""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.drafters.base import Request
from specdec.drafters.hydra import Hydra
from specdec.errors import InputError
from specdec.heads.hydra import PackedHydra, load_hydra, save_hydra
from specdec.heads.medusa import save_medusa
from specdec.sampling import SamplingParams

import tiny
from tiny import random_hydra


def test_a_nodes_children_are_ranked_for_its_own_path(tok):
    """Two depth-1 siblings get their children from head 1 run on their own paths: what Medusa's
    independent heads cannot do. Each child equals head 1's ranking for that path."""
    model = tiny.model("llama", seed=3)
    heads = random_hydra(model)
    drafter = Hydra(head=heads, max_nodes=12, width=4)
    SpecDecoder(model, tok, drafter)  # binds
    state = drafter.start(Request([1, 2, 3], SamplingParams(), torch.Generator()))
    state.hidden = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        model.dtype
    )
    tree = drafter.propose(state, [1, 2, 3], max_depth=4)
    depth1 = tree.children[0]
    assert len(depth1) >= 2 and any(tree.children[c] for c in depth1)
    for node in depth1:
        path = torch.tensor([[3, tree.tokens[node]]])
        expect = heads.draft_to_target[heads.head(1, state.hidden[None], path).topk(4).indices[0]].tolist()
        assert state.ranked[(tree.tokens[node],)] == expect  # by its path's tokens after the root
        for child in tree.children[node]:
            assert tree.tokens[child] in expect
    rankings = [tuple(state.ranked[(tree.tokens[n],)]) for n in depth1]
    assert len(set(rankings)) > 1  # the rankings depend on the path (a Medusa head gives one for all)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_heads_compute_what_the_heads_compute(dtype):
    """Drafting's packed heads (oneDNN on prepacked weights from two rows on, for one row where timed faster; MKL otherwise) against
    the module every head is trained as, for each head and 1-4 rows."""
    model = tiny.model("llama", seed=3, dtype=dtype)
    heads = random_hydra(model, num_heads=3).to(dtype)
    heads.bind_embedding(model.get_input_embeddings().weight)
    packed = PackedHydra(heads)
    assert (packed.lm_heads[0].packed is not None) == (dtype == torch.float32)
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        for rows in (1, 2, 4):
            hidden = torch.randn(rows, model.config.hidden_size, generator=g).to(dtype)
            path = torch.randint(0, model.config.vocab_size, (rows, k + 1), generator=g)
            with torch.inference_mode():
                want = heads.head(k, hidden, path)
            torch.testing.assert_close(packed.head(k, hidden, path), want)


def test_hydra_round_trip_and_bad_heads(tok, tmp_path):
    model = tiny.model("llama", seed=1).float()
    heads = random_hydra(model)
    save_hydra(heads, tmp_path / "h", dtype=torch.float32)
    loaded = load_hydra(tmp_path / "h", model)
    prompt = [5, 9, 14, 3, 77, 1]
    a = SpecDecoder(model, tok, "hydra", head=heads).generate(prompt, max_new_tokens=16)
    b = SpecDecoder(model, tok, "hydra", head=str(tmp_path / "h")).generate(prompt, max_new_tokens=16)
    assert a.token_ids == b.token_ids and a.stats.target_forwards == b.stats.target_forwards
    assert torch.equal(loaded.fcs[1].weight, heads.fcs[1].weight)

    other = tiny.model("llama", seed=1, hidden=64)
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "hydra", head=random_hydra(other))
    save_hydra(random_hydra(other), tmp_path / "wide", dtype=torch.float32)
    with pytest.raises(InputError, match="hidden size"):
        SpecDecoder(model, tok, "hydra", head=str(tmp_path / "wide"))
    (tmp_path / "h" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="corrupt"):
        load_hydra(tmp_path / "h", model)
    save_medusa(tiny.random_medusa(model), tmp_path / "m", dtype=torch.float32)
    with pytest.raises(InputError, match="not a Hydra head"):
        load_hydra(tmp_path / "m", model)
    for bad in ({"width": 0}, {"max_nodes": "lots"}, {"regrow_every": 0}):
        with pytest.raises(InputError):
            SpecDecoder(model, tok, "hydra", head=random_hydra(model), **bad)
