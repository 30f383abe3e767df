"""Token Recycling (Luo et al., ACL 2025; see docs/methods.md, recycle): the target's own top-k guesses, recycled.

An adjacency table A [V, k] holds, for every token, the top-k next tokens the target predicted the last time
that token sat at a scored tree node. After every verification each node's row is overwritten with the top-k
of the target's logits there, accepted or not (one batched topk and one index_put). Drafting walks a static
tree template breadth-first, one gather per level: the template node [i, j] is A[A[root, i], j]. The table
lives on the drafter, so it keeps learning across generations on the same model (`save`/`load` keep it).

The template is grown like Medusa's: a node's value is the product, along its path, of the probability that
the rank-r candidate of an accepted node at depth d is the next token, and the node with the highest value
among the unexplored "first child" and "next sibling" slots is added until the budget is spent. Those
probabilities start from an assumed prior (`PRIOR`, a guess: the top-1 candidate right about half the time)
and are re-estimated online from every step's true continuation, whatever tree was drafted, then the
template is re-grown. Its size: the paper's 80 nodes suit a GPU, where a forward costs about the same for 1 or
80 tokens; here a forward over n tokens costs `CostModel.reference()` (the 14M Llama target on this project's
2-core machine; its figures: docs/methods.md, The cost model). With that cost the expected tokens per
second peaks at 3-5 nodes for a top-1 acceptance of 0.45-0.9 (the prior's and better); the default of 8 nodes
(`RecycleConfig.max_nodes`) is within 3-7% of that peak everywhere in that range, and nearer still if the
real cost rises early and then flattens between the two measured points (1 and 8 tokens), which makes small
trees dearer than the linear interpolation assumes. `max_nodes="auto"` instead measures the bound target's cost per tree size once (at
the first generation) and re-picks the size with the current acceptance estimates whenever the template is
re-grown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import specdec.checks as checks
from specdec.acceptance import Verdict
from specdec.costmodel import CostModel
from specdec.drafters.base import Drafter, Request, Scored, register
from specdec.runtime import RuntimeChoice
from specdec.templates import Template, grow_template, rank_acceptance
from specdec.tree import DraftTree, Trie

PRIOR = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)  # assumed P(rank-r candidate is right), depth 1
PRIOR_DECAY = 0.9  # the prior shrinks by this factor per extra depth
PRIOR_WEIGHT = 32.0  # pseudo-observations behind the prior at each depth
AUTO_MAX_NODES = 64  # largest template "auto" considers


@dataclass
class RecycleConfig:
    k: int = 8  # candidates per token in the table
    # drafted nodes per step, or "auto" (measured cost model); see the docstring
    max_nodes: int | Literal["auto"] = 8
    max_depth: int = 8  # template levels
    adapt_every: int = 32  # re-grow the template from measured acceptance every this many steps (0 = never)

    def __post_init__(self) -> None:
        checks.integer("max_nodes", self.max_nodes, 0, also=("auto",))
        checks.integer("k", self.k, 1)
        checks.integer("max_depth", self.max_depth, 1)
        checks.integer("adapt_every", self.adapt_every, 0)


@register
class TokenRecycling(Drafter[None]):
    name = "recycle"
    mergeable = True  # learns from whatever tree was scored (the merge drafter relies on it)
    # the table, the acceptance counts and the template grown from them
    learned_attributes = ("table", "seen", "hits", "trials", "steps", "template", "levels", "stale")

    def __init__(self, config: RecycleConfig | None = None, **options) -> None:
        self.config = config or RecycleConfig(**options)
        self.model = None
        self.runtime: RuntimeChoice | None = None  # the target's, once bound: what "auto" measures
        self.stale = False  # the template must be re-grown before the next generation
        self.table: torch.Tensor | None = None  # [V, width] int32, width = min(k, V)
        self.seen: torch.Tensor | None = None  # [V] bool: rows written at least once (others draft nothing)
        # [max_depth, width]: times the rank-r candidate of an accepted node at depth d was the next token
        self.hits: torch.Tensor | None = None
        self.trials: torch.Tensor | None = None  # [max_depth]: accepted nodes whose next token is known
        self.steps = 0
        self._set_template()

    def _learned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(table, seen, hits, trials) once a table exists: `_ensure_table` and `load` set all four."""
        table, seen, hits, trials = self.table, self.seen, self.hits, self.trials
        assert table is not None and seen is not None and hits is not None and trials is not None
        return table, seen, hits, trials

    # -- table -------------------------------------------------------------------------------------------

    def bind(self, model, runtime: RuntimeChoice) -> None:
        self.model, self.runtime = model, runtime
        self.stale = self.config.max_nodes == "auto"  # measure the cost lazily, when a generation starts

    def start(self, request: Request) -> None:
        """No per-generation state: the table and the template are learned across requests on purpose."""
        moved = (
            request.runtime is not None
            and self.runtime is not None
            and request.runtime.name != self.runtime.name
        )
        if (
            moved and self.config.max_nodes == "auto"
        ):  # `--runtime auto` re-timed its choice: size for that one
            self.runtime, self.stale = request.runtime, True
        if self.stale:
            self.stale = False
            self._set_template()

    def _ensure_table(self, vocab: int) -> None:
        if self.table is not None and self.table.shape[0] == vocab:
            return
        width = min(self.config.k, vocab)
        self.table = torch.zeros(vocab, width, dtype=torch.int32)
        self.seen = torch.zeros(vocab, dtype=torch.bool)
        self.hits = torch.zeros(self.config.max_depth, width, dtype=torch.float64)
        self.trials = torch.zeros(self.config.max_depth, dtype=torch.float64)
        self._set_template()

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        if self.table is None:
            raise ValueError("the table is empty: nothing was observed yet")
        table, seen, hits, trials = self._learned()
        save_file({"table": table, "seen": seen, "hits": hits, "trials": trials}, path)

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path)
        vocab, width = state["table"].shape
        if width != min(self.config.k, vocab) or state["hits"].shape[0] != self.config.max_depth:
            raise ValueError(f"{path}: table saved with another k or max_depth")
        self.table, self.seen = state["table"], state["seen"]
        self.hits, self.trials = state["hits"], state["trials"]
        self._set_template()

    # -- template ----------------------------------------------------------------------------------------

    def acceptance(self) -> list[list[float]]:
        """Current estimate of P(rank-r candidate right | parent accepted at depth d), prior included."""
        cfg = self.config
        width = cfg.k if self.table is None else self.table.shape[1]
        measured = None if self.table is None else self._learned()[2:]
        return rank_acceptance(PRIOR, PRIOR_DECAY, PRIOR_WEIGHT, cfg.max_depth, width, measured)

    def _set_template(self) -> None:
        """(Re-)grow the template from the current acceptance estimates, and index it by level for drafting."""
        self.template = tpl = self._grow()
        by_depth: list[list[int]] = [[] for _ in range(max(tpl.depths))]
        for i in range(1, len(tpl)):
            by_depth[tpl.depths[i] - 1].append(i)
        # per depth 1, 2, ...: (template nodes, their parents, their ranks) as index tensors
        self.levels = [
            (
                torch.tensor(nodes),
                torch.tensor([tpl.parents[i] for i in nodes]),
                torch.tensor([tpl.ranks[i] for i in nodes]),
            )
            for nodes in by_depth
        ]

    def _grow(self) -> Template:
        if self.config.max_nodes != "auto":
            return grow_template(self.acceptance(), self.config.max_nodes)
        full = grow_template(self.acceptance(), AUTO_MAX_NODES)
        runtime = self.runtime  # set with the model, by `bind`
        cost = CostModel.reference() if runtime is None else CostModel.for_runtime(self.model, runtime)
        return full.prefix(cost.best_size(full.gains()))

    # -- drafting ----------------------------------------------------------------------------------------

    def propose(self, state: None, context: list[int], max_depth: int) -> DraftTree:
        root = context[-1]
        tpl = self.template
        if self.table is None or max_depth < 1 or len(tpl) == 1 or root >= self.table.shape[0]:
            return DraftTree.root_only(root)
        table, seen, _, _ = self._learned()
        tokens = torch.zeros(len(tpl), dtype=torch.long)  # [n]: the token at each template node
        valid = torch.zeros(len(tpl), dtype=torch.bool)  # [n]: every row on its path was ever written
        tokens[0], valid[0] = root, True
        for nodes, parents, ranks in self.levels[:max_depth]:
            parent_tokens = tokens[parents]
            tokens[nodes] = table[parent_tokens, ranks].long()  # one gather per level
            valid[nodes] = valid[parents] & seen[parent_tokens]
        return self._dedupe(tokens.tolist(), valid.tolist(), max_depth)

    def _dedupe(self, tokens: list[int], valid: list[bool], max_depth: int) -> DraftTree:
        """Template nodes -> a tree with distinct siblings: a node equal to an earlier sibling is merged into
        it (trie insertion), so its subtree hangs under the survivor."""
        tpl = self.template
        trie = Trie(tokens[0])
        node_of = [0] * len(tpl)  # template node -> tree node (-1: dropped)
        for i in range(1, len(tpl)):
            parent = node_of[tpl.parents[i]]
            if not valid[i] or parent < 0 or tpl.depths[i] > max_depth:
                node_of[i] = -1
                continue
            node_of[i] = trie.insert([tokens[i]], parent)
        return trie.tree()

    # -- learning ----------------------------------------------------------------------------------------

    def observe(self, state: None, scored: Scored) -> None:
        """Learn from any scored tree, not only ours (merge hands us the merged one)."""
        tree, verdict, logits = scored.tree, scored.verdict, scored.logits  # logits: [N, V]
        self._ensure_table(logits.shape[-1])
        table, seen, hits, trials = self._learned()
        if len(tree) == 1:  # a plain step (auto's, when no tree pays): one row, nothing to dedupe: cheaper
            root, truth = tree.tokens[0], verdict.tokens[0]
            trials[0] += 1
            if seen[root]:
                hits[0] += table[root] == truth
            # the table stays on the host, where drafting walks it every step: the top-k comes to it (on a GPU
            # target, this step's one read of the logits besides the verdict's)
            table[root] = logits[0].topk(table.shape[1]).indices.to(table.device, torch.int32)
            seen[root] = True
        else:
            tokens = torch.tensor(tree.tokens)  # [N]
            self._measure(tokens, verdict)  # before the update: with the rows this step drafted from
            n = len(tree.tokens)
            # A token at several nodes gets one row: the accepted node's if any, else the last node's.
            key = torch.arange(n)
            key[verdict.accepted_nodes] += n
            same = tokens[:, None] == tokens[None, :]  # [N, N]
            keep = ~(same & (key[None, :] > key[:, None])).any(dim=1)  # on the host: a GPU mask would sync
            top = logits[keep].topk(table.shape[1], dim=-1).indices  # [kept, width]
            table[tokens[keep]] = top.to(table.device, torch.int32)  # to the host table (see above)
            seen[tokens[keep]] = True
        self.steps += 1
        if self.config.adapt_every and self.steps % self.config.adapt_every == 0:
            self._set_template()

    def _measure(self, tokens: torch.Tensor, verdict: Verdict) -> None:
        """For each accepted node at depth d (root = 0) the next token is known (the next accepted draft or
        the bonus token): count which rank of the node's row it was, for template growth at depth d+1."""
        table, seen, hits, trials = self._learned()
        depth = min(len(verdict.accepted_nodes), self.config.max_depth)
        path = tokens[verdict.accepted_nodes[:depth]]  # [depth]
        truth = torch.tensor(verdict.tokens[:depth])  # [depth]
        hit = (table[path] == truth[:, None]) & seen[path][:, None]  # [depth, width]
        trials[:depth] += 1
        hits[:depth] += hit
