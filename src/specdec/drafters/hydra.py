"""Hydra (Ankner et al. 2024): Medusa's tree, drafted depth by depth by sequentially dependent heads.

Head k reads the target's hidden state h_t and the tokens on the draft path before the token it drafts (the
root included: specdec.heads.hydra). So a node's children are ranked for that node's own path: the tree is
Medusa's template of (depth, rank) slots, but filled one depth at a time, one batched head call per depth
over the template nodes there that have children. The template grows from how often the rank-r child of an
accepted node at depth d was the next token, and its size maximises expected tokens per second under the
target's measured cost per tree size, as for Medusa (docs/methods.md, trained heads).

Drafts are deterministic top-k guesses (point masses): greedy and sampled verification are the engine's usual
lossless rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.acceptance import Verdict
from specdec.drafters.base import Request, register
from specdec.drafters.medusa import HeadsDrafter, MedusaConfig, MedusaState
from specdec.heads.hydra import HydraHeads, PackedHydra, load_hydra
from specdec.tree import DraftTree, Trie


@dataclass
class HydraState(MedusaState):
    # per node of the last proposal whose children were drafted, by its path's tokens after the root: the
    # target ids its head ranked, best first (by path, not node id: `auto` verifies merged trees, whose ids
    # are not ours)
    ranked: dict[tuple[int, ...], list[int]] = field(default_factory=dict)


@register
class Hydra(HeadsDrafter[HydraState]):
    name = "hydra"
    shipped_head = "heads/hydra"
    learned_attributes = (*HeadsDrafter.learned_attributes, "children")  # `children` indexes the template

    def __init__(self, config: MedusaConfig | None = None, **options) -> None:
        super().__init__(config or MedusaConfig(**options))  # the same options: a head, width, max_nodes...
        self.children: list[list[int]] = []  # template node -> its child slots (`_grow`)

    def _load(self, path: Path, model, dtype: torch.dtype) -> HydraHeads:
        return load_hydra(path, model, dtype=dtype)

    def _pack(self, heads: HydraHeads) -> PackedHydra:
        return PackedHydra(heads)

    def _attach(self, heads: HydraHeads, model) -> None:
        heads.bind_embedding(model.get_input_embeddings().weight)

    def start(self, request: Request) -> HydraState:
        self._follow(request.runtime)
        return HydraState()

    def _grow(self) -> None:
        super()._grow()
        tpl = self.template
        assert tpl is not None
        self.children = [[] for _ in range(len(tpl))]
        for i in range(1, len(tpl)):
            self.children[tpl.parents[i]].append(i)

    def propose(self, state: HydraState, context: list[int], max_depth: int) -> DraftTree:
        root = context[-1]
        tpl, heads, packed = self.template, self.heads, self.packed
        assert tpl is not None and heads is not None and packed is not None and self.hits is not None
        state.ranked = {}
        if state.hidden is None or max_depth < 1:
            return DraftTree.root_only(root)
        width, children = self.hits.shape[1], self.children
        trie = Trie(root)
        node_of = {0: 0}  # template node -> trie node
        paths = {0: [root]}  # template node -> its path's tokens, root first
        frontier = [0]  # template nodes whose children are drafted at this depth
        for depth in range(min(max_depth, heads.config.num_heads)):
            # the root's children are ranked even with an empty template: the statistics keep learning
            if depth:
                frontier = [i for i in frontier if children[i]]
            if not frontier:
                break
            path = torch.tensor([paths[i] for i in frontier], device=state.hidden.device)  # [M, depth + 1]
            logits = packed.head(depth, state.hidden.expand(len(frontier), -1), path)  # [M, draft_vocab]
            top = logits.topk(width, dim=-1).indices  # [M, width] draft ids
            ranked = heads.draft_to_target[top].tolist()  # as target ids
            grown = []
            for i, row in zip(frontier, ranked, strict=True):
                state.ranked[tuple(paths[i][1:])] = row
                for j in children[i]:
                    token = row[tpl.ranks[j]]
                    node_of[j] = trie.insert([token], node_of[i])
                    paths[j] = paths[i] + [token]
                    grown.append(j)
            frontier = grown
        return trie.tree()

    def _learn(self, state: HydraState, verdict: Verdict) -> bool:
        """Along the emitted path: the rank the head gave the true next token at each node it ranked."""
        assert self.hits is not None and self.trials is not None
        if not state.ranked:
            return False
        width, tokens = self.hits.shape[1], verdict.tokens
        for depth in range(min(len(tokens), self.hits.shape[0])):
            ranked = state.ranked.get(tuple(tokens[:depth]))
            if ranked is None:
                break
            self.trials[depth] += 1
            if tokens[depth] in ranked[:width]:
                self.hits[depth, ranked.index(tokens[depth])] += 1
        state.ranked = {}  # counted: a step in which it did not propose (an `auto` member's) counts nothing
        return True
