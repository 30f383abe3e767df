"""DraftTree construction and the KV cache's keep/crop/grow bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from specdec.runtime.kvcache import KVCache
from specdec.tree import DraftTree


def test_from_sequences_merges_prefixes_and_respects_budget():
    tree = DraftTree.from_sequences(9, [[1, 2, 3], [1, 2, 4], [5]], max_nodes=4)
    assert tree.tokens == [9, 1, 2, 3, 4]
    assert tree.parents == [-1, 0, 1, 2, 2]
    assert tree.depths == [0, 1, 2, 3, 3]
    assert tree.children[2] == [3, 4]


def test_invalid_trees_rejected():
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])
    with pytest.raises(ValueError):
        DraftTree([1, 2], [0, -1])


@given(st.lists(st.lists(st.integers(0, 5), max_size=5), max_size=6), st.integers(0, 5))
def test_mask_and_truncation_properties(seqs, max_depth):
    tree = DraftTree.from_sequences(7, seqs)
    mask = tree.ancestor_mask()
    for i in range(len(tree)):
        assert mask[i].nonzero().flatten().tolist() == tree.path_to(i)
    cut = tree.truncate_depth(max_depth)
    assert cut.depth <= max_depth
    kept = {tuple(cut.tokens[j] for j in cut.path_to(i)) for i in range(len(cut))}
    full = {
        tuple(tree.tokens[j] for j in tree.path_to(i))
        for i in range(len(tree))
        if tree.depths[i] <= max_depth
    }
    assert kept == full


def _write(cache: KVCache, values: list[float]) -> None:
    k = torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 2, -1, 3)
    for i in range(len(cache.layers)):
        cache.update(k, -k, i)


def test_keep_compacts_non_contiguous_nodes_and_grows():
    cache = KVCache(num_layers=2, capacity=4)
    _write(cache, [0, 1, 2])  # committed prefix
    _write(cache, [10, 11, 12, 13, 14])  # a 5-node tree at slots 3..7: exceeds capacity -> grows
    assert cache.length == 8
    cache.keep(3, [0, 2, 4])
    assert cache.length == 6
    k, v = cache.tensors(1)
    assert k[0, 1, :, 0].tolist() == [0, 1, 2, 10, 12, 14]
    assert torch.equal(v, -k)
    cache.keep(6, [])  # nothing new
    _write(cache, [20, 21])
    cache.keep(6, [0, 1])  # contiguous: just the length
    assert cache.tensors(0)[0][0, 0, :, 0].tolist() == [0, 1, 2, 10, 12, 14, 20, 21]
    cache.crop(2)
    assert cache.length == 2 and cache.get_seq_length() == 2
