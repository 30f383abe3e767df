"""Acceptance: which path of a scored tree the target agrees with, and the one token it adds after it.

Greedy: walk from the root, descending into the child whose token equals the target's argmax at the current
node; the argmax at the last accepted node is the bonus token. The output is the target's own greedy output.

Sampling (Leviathan et al. 2023 / Chen et al. 2023, generalised to trees as in SpecInfer; see
docs/methods.md, Lossless acceptance under sampling). At node u with target distribution p_u the residual
starts as r = p_u. Children c_1..c_k are tested in order with fresh uniforms U:
  - child drawn from q_j (a drafter distribution): accept if U <= r(c_j) / q_j(c_j), else r <- norm(max(0, r - q_j));
  - deterministic child (point mass): accept with probability r(c_j), else r(c_j) <- 0 and renormalise.
If no child is accepted (or u is a leaf) the bonus token is drawn from r. Either way the emitted token at every
position has exactly the target's distribution. For a node whose children are all point masses the sequential
rule equals drawing y ~ p_u once and descending into the child whose token is y (the bonus token is y
otherwise), which is what the probs=None path does. It draws one token per emitted position, in order, so a
seeded run of a point-mass drafter (prompt lookup, any probs=None tree) emits exactly the tokens of a seeded
vanilla run, which are those of generate(do_sample=True) after torch.manual_seed(seed).

p is computed only at the nodes the walk visits (at most depth + 1 rows): top-k and top-p sort the whole
vocabulary, so processing every row of a 64-node tree would cost more than the tree's forward on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdec.sampling import TargetDistribution
from specdec.tree import DraftTree


@dataclass
class Verdict:
    accepted_nodes: list[int]  # root-to-node path of tree indices, starting with 0 (the root)
    tokens: list[int]  # emitted: the accepted drafted tokens, then the bonus token

    @property
    def accepted_drafts(self) -> int:
        return len(self.accepted_nodes) - 1


def _descend(tree: DraftTree, choose: Callable[[int], int]) -> Verdict:
    """Follow the child whose token equals `choose(node)` from the root (called once per visited node, in
    order: a sampled choice is a draw at that node). `DraftTree.follow` walks a known token list; here the
    next token is known only once its node is reached, so the walk is its own, by the same step."""
    node, path = 0, [0]
    while True:
        want = choose(node)
        child = tree.child_with(node, want)
        if child is None:
            return Verdict(path, [tree.tokens[i] for i in path[1:]] + [want])
        node = child
        path.append(child)


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    """logits: [N, V] raw target logits, row i for node i."""
    return _descend(tree, logits.argmax(dim=-1).tolist().__getitem__)


def verify_sampled(
    tree: DraftTree, logits: torch.Tensor, dist: TargetDistribution, generator: torch.Generator
) -> Verdict:
    def p(node: int) -> torch.Tensor:  # [V], the processed target distribution at `node`
        return dist(logits[node : node + 1])[0]

    if tree.probs is None:
        # Point-mass children everywhere: an independent draw y ~ p at each visited node, then descend.
        return _descend(tree, lambda node: int(torch.multinomial(p(node), 1, generator=generator)))
    return _walk_distributions(tree, p, tree.probs, generator)


def _walk_distributions(
    tree: DraftTree, p: Callable[[int], torch.Tensor], q: torch.Tensor, generator: torch.Generator
) -> Verdict:
    """The general recursive rule; q[c] is the distribution child c was drawn from (one-hot = point mass)."""
    node, path = 0, [0]
    while True:
        r = p(node)
        accepted = None
        for child in tree.children[node]:
            x = tree.tokens[child]
            qc = q[child].float()
            # NOTE: float64 uniform, and a strict `<`: a token with r(x) = 0 is never accepted, even at U = 0.
            # U is drawn where the generator is (the target's device: r's); q(x) and r(x) are read together
            # (two host syncs on a GPU where four were), as the same float32 values
            u = torch.rand((), generator=generator, dtype=torch.float64, device=r.device).item()
            qx, rx = torch.stack([qc[x], r[x]]).tolist()
            if qx > 0 and u * qx < rx:
                accepted = child
                break
            residual = (r - qc).clamp_min_(0)
            total = residual.sum()
            if total > 0:  # total == 0 only when r == q, and then x was accepted with probability 1
                r = residual / total
        if accepted is None:
            cut = tree.cut_q.get(node)
            if cut is not None:  # a sampled child the grammar cut: its certain rejection's residual step
                residual = (r - cut.float()).clamp_min_(0)
                r = residual / residual.sum()  # > 0: r is 0 where the cut child's token is, q is not
            bonus = int(torch.multinomial(r, 1, generator=generator))
            return Verdict(path, [tree.tokens[i] for i in path[1:]] + [bonus])
        node = accepted
        path.append(accepted)
