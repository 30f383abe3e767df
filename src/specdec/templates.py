"""Tree templates grown from measured acceptance (Medusa's method; see docs/methods.md, Token Recycling).

A template is a tree of (depth, rank) slots: node [r1, r2, ...] is the rank-r1 candidate at depth 1, then the
rank-r2 candidate after it, and so on. Drafters whose candidates come ranked per depth (Token Recycling's
table rows, Medusa's heads) draft by filling a template, and grow it from how often each rank at each depth
turned out to be the next token.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Template:
    """Nodes in growth order (parents first); node 0 is the root. Node i>0 is the ranks[i]-th candidate of
    its parent's token."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    depths: tuple[int, ...]
    values: tuple[float, ...]  # expected acceptance: product of per-(depth, rank) probabilities on the path

    def __len__(self) -> int:
        return len(self.parents)

    def prefix(self, n: int) -> Template:
        """The first n drafted nodes (a prefix of the growth order is a tree)."""
        m = n + 1
        return Template(self.parents[:m], self.ranks[:m], self.depths[:m], self.values[:m])

    def gains(self) -> list[float]:
        """gains[n] = expected accepted drafted tokens with the first n nodes."""
        out = [0.0]
        for v in self.values[1:]:
            out.append(out[-1] + v)
        return out


def grow_template(acceptance: list[list[float]], max_nodes: int) -> Template:
    """Medusa-style greedy growth. acceptance[d][r] = P(the rank-r candidate of an accepted node at depth d is
    the next token); its length bounds the depth, its rows' length the ranks."""
    parents, ranks, depths, values = [-1], [-1], [0], [1.0]
    # heap of (-value, order, parent, rank): the slots a new node may fill
    heap = [(-acceptance[0][0], 0, 0, 0)] if acceptance and max_nodes > 0 else []
    order = 1
    while heap and len(parents) <= max_nodes:
        neg, _, parent, rank = heapq.heappop(heap)
        node, depth = len(parents), depths[parent] + 1
        parents.append(parent)
        ranks.append(rank)
        depths.append(depth)
        values.append(-neg)
        if depth < len(acceptance):  # first child
            heapq.heappush(heap, (neg * acceptance[depth][0], order, node, 0))
            order += 1
        if rank + 1 < len(acceptance[depth - 1]):  # next sibling
            heapq.heappush(heap, (-values[parent] * acceptance[depth - 1][rank + 1], order, parent, rank + 1))
            order += 1
    return Template(tuple(parents), tuple(ranks), tuple(depths), tuple(values))


def rank_acceptance(
    prior: Sequence[float],
    decay: float,
    weight: float,
    depth: int,
    width: int,
    measured: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[list[float]]:
    """P(the rank-r candidate of an accepted node at depth d is the next token), d < depth, r < width: the
    measured rate (`measured` = (hits [depth, width], trials [depth])) pulled toward a prior that takes
    `prior[r]` at depth 0 and shrinks by `decay` per depth, worth `weight` observations."""
    est = []
    for d in range(depth):
        guess = [prior[min(r, len(prior) - 1)] * decay**d for r in range(width)]
        if measured is None:
            est.append(guess)
            continue
        hits, trials = measured
        n = float(trials[d])
        est.append([(float(hits[d, r]) + weight * guess[r]) / (n + weight) for r in range(width)])
    return est
