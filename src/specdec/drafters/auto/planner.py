"""Step 3, the plan: which of the valued nodes are verified. Pure functions of the node values (`estimates`)
and the cost per tree size (`timing`); nothing here measures or learns.

The n most valuable nodes are verified, n maximising expected emitted tokens per second,

    (1 + sum of the n values) / (step overhead + cost(n + 1)),

n = 0 being plain decoding through the same engine. Drafting time is spent by then and does not count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from specdec.tree import DraftTree, Trie


def plan(
    values: list[float],
    cost,
    overhead: float,
    tree_overhead: float | None = None,
    bar: float = 1.0,
    base: float = 0.0,
) -> tuple[int, float, float]:
    """The choice rule. `values` are node values in descending order (a prefix is always a tree); returns
    (n, expected accepted drafts, expected tokens per second) for the best n, n = 0 being plain decoding. A
    tree is taken only when its rate exceeds `bar` times plain decoding's (`Realized.bar`). `base`: tokens the
    same forward gives besides this tree's (a batch's other rows, `specdec.batch.RowBudget`): the rate is the
    step's, so a node must pay for slowing theirs too."""
    tree_overhead = overhead if tree_overhead is None else tree_overhead
    plain = (1.0 + base) / (overhead + cost(1))
    best, best_gain, best_rate = 0, 0.0, bar * plain
    gain = 0.0
    for n, value in enumerate(values, start=1):
        gain += value
        rate = (1.0 + base + gain) / (tree_overhead + cost(n + 1))
        if rate > best_rate:
            best, best_gain, best_rate = n, gain, rate
    return best, best_gain, best_rate if best else plain


class Union:
    """Point-mass trees merged into one trie as members propose; per merged node its value (the highest any
    member gives it) and the members proposing it."""

    def __init__(self, root: int) -> None:
        self.trie = Trie(root)
        self.values, self.owners = [1.0], [0]  # owners: bit m set when member m proposed the node

    def add(self, member: int, tree: DraftTree, values: list[float]) -> None:
        node_map = self.trie.graft(tree)  # the trie has no budget: every node is in
        best, owners, bit = self.values, self.owners, 1 << member
        for i in range(1, len(node_map)):
            node = node_map[i]
            if node == len(best):  # new: trie nodes are numbered as they are added
                best.append(values[i])
                owners.append(bit)
            else:
                best[node] = max(best[node], values[i])
                owners[node] |= bit

    def order(self, cap: int) -> list[int]:
        """The `cap` most valuable drafted nodes, best first (ties: shallower first, so parents come first)."""
        parents, depth = self.trie.parents, [0] * len(self.values)
        for i in range(1, len(depth)):
            depth[i] = depth[parents[i]] + 1
        values = self.values
        return sorted(range(1, len(values)), key=lambda i: (-values[i], depth[i], i))[:cap]

    def plan(self, terms: Terms) -> tuple[list[int], float]:
        """(the nodes to verify, expected tokens per second)."""
        order = self.order(terms.cap)
        values = [self.values[i] for i in order]
        n, _, rate = plan(values, terms.cost, terms.overhead, terms.tree_overhead, terms.bar, terms.base)
        return order[:n], rate

    def owned(self, nodes: list[int]) -> int:
        """Bit m set when member m proposed one of `nodes`."""
        owners = 0
        for k in nodes:
            owners |= self.owners[k]
        return owners

    def tree(self, nodes: list[int]) -> DraftTree:
        """The merged tree of `nodes` (parents listed before their children, as `order` lists them)."""
        return DraftTree(self.trie.tokens, self.trie.parents).subtree(nodes)


class StepCost:
    """cost(k) for integer k, each computed once per step (plans ask for the same sizes again and again)."""

    def __init__(self, cost: Callable[[int], float]) -> None:  # an `OnlineCost`, or a batch step's
        self.cost, self.known = cost, [0.0]

    def __call__(self, k: int) -> float:
        known = self.known
        while len(known) <= k:
            known.append(self.cost(len(known)))
        return known[k]


@dataclass(slots=True)
class Terms:
    """What one step's plans are weighed with."""

    cost: Callable[[int], float]  # the forward's seconds per tree size (a `StepCost`)
    overhead: float  # a plain step's time besides its forward (`Timing`)
    tree_overhead: float  # the same for a step with drafts
    bar: float  # how much more than plain decoding's rate a tree must promise (`Realized.bar`)
    base: float  # tokens the same forward gives besides this tree's (a batch's other rows)
    cap: int  # most drafted nodes verified (`AutoConfig.max_nodes`)


@dataclass(slots=True)
class Offer:
    """What the members run this step offered, in the order they ran: their point-mass trees merged, the
    nodes the plan picked from them, and the member whose tree carries q (it is verified whole and alone)."""

    union: Union
    best_rate: float  # the step's best expected tokens per second so far (first: plain decoding's)
    picked: list[int] = field(default_factory=list)
    alone: int | None = None

    def add(self, member: int, tree: DraftTree, values: list[float], terms: Terms) -> float:
        """A member's tree and node values join; returns the step's best rate with it (`best_rate` is the
        caller's to move: what the member did to it is its lift)."""
        if len(tree) == 1:  # nothing to offer (no match, say): no help this step
            return self.best_rate
        if tree.probs is None:
            self.union.add(member, tree, values)
            self.picked, rate = self.union.plan(terms)
            return rate
        # it cannot share a trie, and drawn once it is verified (what it learns must come from its own
        # verification: another tree's emitted token is a draw from p, not the acceptance test)
        self.alone = member
        return (1.0 + terms.base + sum(values[1:])) / (terms.tree_overhead + terms.cost(len(tree)))
