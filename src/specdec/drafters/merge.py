"""Several training-free drafters at once: the union of their trees under one node budget.

Every member proposes its own tree; the trees are inserted node by node into one trie rooted at the last
token, so a continuation two members agree on is scored once. Members' nodes go in their own order (each
member lists its best guesses first), the member with the better recent record first: member m gets
`max_nodes * w_m / sum(w)` new nodes, then what is left goes to the members' remaining nodes in the same
order. w_m is a moving average of how many tokens m's own (uncut) tree would have had accepted, read off the
emitted tokens, so a member that lost budget can still win it back.

The merged tree is what the target scored, so it is what every member observes: members must learn from any
tree (`observes_any_tree = True`, as `recycle` does) or not learn at all (no `observe`, as `pld` and `suffix`).
Members must draft point masses (no `probs`): an i.i.d. sampled child cannot be merged into a trie losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.acceptance import Verdict
from specdec.drafters.base import REGISTRY, Drafter, Request, register
from specdec.tree import DraftTree

EMA = 0.2  # weight of the newest step in a member's accepted-length average
FLOOR = 0.25  # added to every weight, so a member never gets nothing


@dataclass
class MergeConfig:
    members: str | list = "suffix,recycle"  # registered names (comma-separated or a list), or Drafter objects
    max_nodes: int = 16  # drafted nodes of the merged tree

    def __post_init__(self) -> None:
        if isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int) or self.max_nodes < 0:
            raise ValueError(f"max_nodes must be an integer >= 0 (got {self.max_nodes!r})")


def _build(member) -> Drafter:
    if isinstance(member, Drafter):
        drafter = member
    else:
        cls = REGISTRY.get(str(member).strip())
        if cls is None:
            raise ValueError(f"unknown member {member!r}")
        if cls.needs_draft_model:
            raise ValueError(f"member {member!r} needs a draft model; merge takes training-free drafters")
        drafter = cls.create()
    if type(drafter).observe is not Drafter.observe and not getattr(drafter, "observes_any_tree", False):
        raise ValueError(
            f"member {drafter.name!r} learns from its own trees only; it cannot observe a merged one"
        )
    return drafter


@register
class Merge(Drafter):
    name = "merge"
    observes_any_tree = True

    def __init__(self, config: MergeConfig | None = None, **options) -> None:
        self.config = cfg = config or MergeConfig(**options)
        names = cfg.members.split(",") if isinstance(cfg.members, str) else list(cfg.members)
        self.members = [_build(m) for m in names if not (isinstance(m, str) and not m.strip())]
        if not self.members:
            raise ValueError("merge needs at least one member")
        self.weights = [1.0] * len(self.members)  # moving average of each member's accepted drafts
        self.last_trees: list[DraftTree] = []

    def bind(self, model) -> None:
        for m in self.members:
            m.bind(model)

    def reset(self, request: Request) -> None:
        for m in self.members:
            m.reset(request)

    def release(self) -> None:
        for m in self.members:
            m.release()

    def propose(self, context: list[int], max_depth: int) -> DraftTree:
        trees = [m.propose(context, max_depth) for m in self.members]
        for m, tree in zip(self.members, trees, strict=True):
            if tree.probs is not None:
                raise ValueError(f"merge member {m.name!r} drafted sampled nodes; merge needs point masses")
        self.last_trees = trees
        order = sorted(range(len(trees)), key=lambda i: -self.weights[i])
        total = sum(self.weights[i] + FLOOR for i in order)
        quotas = [round(self.config.max_nodes * (self.weights[i] + FLOOR) / total) for i in order]
        return union(context[-1], [trees[i] for i in order], quotas, self.config.max_nodes)

    def observe(self, tree: DraftTree, verdict: Verdict, logits: torch.Tensor) -> None:
        for i, (m, own) in enumerate(zip(self.members, self.last_trees, strict=True)):
            m.observe(tree, verdict, logits)
            self.weights[i] = (1 - EMA) * self.weights[i] + EMA * would_accept(own, verdict.tokens)


def union(root: int, trees: list[DraftTree], quotas: list[int], max_nodes: int) -> DraftTree:
    """Trie union of `trees` (all rooted at `root`): tree j first adds up to quotas[j] new nodes, in its own
    node order; then the rest of each tree, in the same tree order, while the budget lasts."""
    tokens, parents = [root], [-1]
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    maps = [[0] for _ in trees]  # per tree: own node -> merged node, for the nodes inserted so far

    def insert(j: int, limit: int) -> None:
        tree, node_map = trees[j], maps[j]
        added = 0
        while len(node_map) < len(tree):
            i = len(node_map)
            key = (node_map[tree.parents[i]], tree.tokens[i])
            if key not in index:
                if added >= limit or len(tokens) - 1 >= max_nodes:
                    return
                index[key] = len(tokens)
                tokens.append(key[1])
                parents.append(key[0])
                added += 1
            node_map.append(index[key])

    for j, quota in enumerate(quotas):
        insert(j, quota)
    for j in range(len(trees)):
        insert(j, max_nodes)
    return DraftTree(tokens, parents)


def would_accept(tree: DraftTree, emitted: list[int]) -> int:
    """How many of the emitted tokens form a path from the root of `tree` (what it alone would have had
    accepted, as far as the emitted tokens tell)."""
    node = 0
    for depth, tok in enumerate(emitted):
        child = next((c for c in tree.children[node] if tree.tokens[c] == tok), None)
        if child is None:
            return depth
        node = child
    return len(emitted)
