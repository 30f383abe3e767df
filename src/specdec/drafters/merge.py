"""Several training-free drafters at once: the union of their trees under one node budget.

Every member proposes its own tree; the trees are inserted node by node into one trie rooted at the last
token, so a continuation two members agree on is scored once. Members' nodes go in their own order (each
member lists its best guesses first), the member with the better recent record first: member m gets
`max_nodes * w_m / sum(w)` new nodes, then what is left goes to the members' remaining nodes in the same
order. w_m is a moving average of how many tokens m's own (uncut) tree would have had accepted, read off the
emitted tokens, so a member that lost budget can still win it back.

The merged tree is what the target scored, so it is what every member observes: members must declare
`mergeable` (they draft point masses, since an i.i.d. sampled child cannot be merged into a trie losslessly,
and learn from any scored tree or not at all: `recycle`, `pld`, `suffix`). Each member keeps its own
per-generation state inside merge's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import specdec.checks as checks
from specdec.drafters.base import REGISTRY, Drafter, Request, Scored, register
from specdec.runtime import RuntimeChoice
from specdec.tree import DraftTree, Trie

EMA = 0.2  # weight of the newest step in a member's accepted-length average
FLOOR = 0.25  # added to every weight, so a member never gets nothing


@dataclass
class MergeConfig:
    members: str | list = "suffix,recycle"  # registered names (comma-separated or a list), or Drafter objects
    max_nodes: int = 16  # drafted nodes of the merged tree

    def __post_init__(self) -> None:
        checks.integer("max_nodes", self.max_nodes, 0)


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
    if not drafter.mergeable:
        raise ValueError(
            f"member {drafter.name!r} cannot join a merged tree (it drafts sampled nodes or learns from its "
            "own trees only)"
        )
    return drafter


@dataclass
class MergeState:
    members: list[Any]  # each member's own per-generation state
    weights: list[float]  # moving average of each member's accepted drafts (this generation)
    trees: list[DraftTree] = field(default_factory=list)  # the members' own trees of the last step


@register
class Merge(Drafter[MergeState]):
    name = "merge"
    mergeable = True

    def __init__(self, config: MergeConfig | None = None, **options) -> None:
        self.config = cfg = config or MergeConfig(**options)
        names = cfg.members.split(",") if isinstance(cfg.members, str) else list(cfg.members)
        self.members = [_build(m) for m in names if not (isinstance(m, str) and not m.strip())]
        if not self.members:
            raise ValueError("merge needs at least one member")

    def bind(self, model, runtime: RuntimeChoice) -> None:
        for m in self.members:
            m.bind(model, runtime)

    def snapshot_learned(self) -> dict[str, Any]:
        """Its members' (merge's own weights are per generation)."""
        return {"members": [m.snapshot_learned() for m in self.members]}

    def restore_learned(self, snapshot: dict[str, Any]) -> None:
        for m, learned in zip(self.members, snapshot["members"], strict=True):
            m.restore_learned(learned)

    def start(self, request: Request) -> MergeState:
        return MergeState([m.start(request) for m in self.members], [1.0] * len(self.members))

    def release(self, state: MergeState) -> None:
        for m, s in zip(self.members, state.members, strict=True):
            m.release(s)

    def propose(self, state: MergeState, context: list[int], max_depth: int) -> DraftTree:
        trees = [m.propose(s, context, max_depth) for m, s in zip(self.members, state.members, strict=True)]
        state.trees = trees
        order = sorted(range(len(trees)), key=lambda i: -state.weights[i])
        total = sum(state.weights[i] + FLOOR for i in order)
        quotas = [round(self.config.max_nodes * (state.weights[i] + FLOOR) / total) for i in order]
        return union(context[-1], [trees[i] for i in order], quotas, self.config.max_nodes)

    def observe(self, state: MergeState, scored: Scored) -> None:
        for i, (m, own) in enumerate(zip(self.members, state.trees, strict=True)):
            m.observe(state.members[i], scored)
            accepted = would_accept(own, scored.verdict.tokens)
            state.weights[i] = (1 - EMA) * state.weights[i] + EMA * accepted


def union(root: int, trees: list[DraftTree], quotas: list[int], max_nodes: int) -> DraftTree:
    """Trie union of `trees` (all rooted at `root`): tree j first adds up to quotas[j] new nodes, in its own
    node order; then the rest of each tree, in the same tree order, while the budget lasts."""
    trie = Trie(root, max_nodes)
    maps = [[0] for _ in trees]  # per tree: own node -> merged node, for the nodes inserted so far
    for tree, node_map, quota in zip(trees, maps, quotas, strict=True):
        trie.graft(tree, node_map, limit=quota)
    for tree, node_map in zip(trees, maps, strict=True):
        trie.graft(tree, node_map)
    return trie.tree()


def would_accept(tree: DraftTree, emitted: list[int]) -> int:
    """How many of the emitted tokens form a path from the root of `tree` (what it alone would have had
    accepted, as far as the emitted tokens tell)."""
    return len(tree.follow(emitted)) - 1
