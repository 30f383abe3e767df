"""Step 2's estimates: how likely each drafted node is to be accepted, learned from every verification.

The estimates are discounted counts per (member, whether its last first token was right, depth, rank):
acceptance comes in runs (a copied block, then new text), and a generation's counts (`AutoConfig.memory`)
start from the drafter's shared ones (`shared_memory`, carried across requests on purpose, one set per
temperature in its `Profile`, at most `warm_weight` pseudo-trials per cell). Each member's own tree, walked
along the emitted tokens (`trials`), says for every child of a node on the true path whether it was right.
"""

from __future__ import annotations

from collections.abc import Iterator

from specdec.tree import DraftTree

DEPTHS = 16  # depths estimated separately (deeper nodes share the last cell)
RANKS = 8  # sibling ranks estimated separately (later siblings share the last cell)
PRIOR_TRIALS = 2.0  # pseudo-trials behind a cell's prior (see `Acceptance.table`)
PRIOR_RATE = 0.3  # the prior of the root's first child when nothing was learned; a later sibling r: / (r + 1)
CALIBRATION_PRIOR = 16.0  # pseudo-tokens behind a calibration factor of 1 (see `Acceptance.factor`)
CALIBRATION_RANGE = (0.25, 2.0)  # the factor's bounds


class Acceptance:
    """Discounted counts per (cells, depth, sibling rank) of how often a drafted node was the next token when
    its parent was, and the rates they give (`table`). Member i has cells 2i and 2i + 1 (`MemberTrack.streak`).
    The drafter's shared sets also keep the calibration `factor`."""

    def __init__(self, members: int) -> None:
        self.hits = [[[0.0] * RANKS for _ in range(DEPTHS)] for _ in range(members)]
        self.trials = [[[0.0] * RANKS for _ in range(DEPTHS)] for _ in range(members)]
        self.tables: list[list[list[float]] | None] = [None] * members  # cached rates, dropped on `record`
        # discounted sums over steps (plain ones only discount): the chosen trees' accepted drafts, and what
        # the cell rates expected of them before calibration
        self.accepted = 0.0
        self.expected = 0.0

    @property
    def factor(self) -> float:
        """accepted / expected, with CALIBRATION_PRIOR pseudo-tokens at 1: each cell's rate is right on average,
        but the trees that get verified are picked for their high values and a node two members propose takes
        the higher one, so the sums that decide come out optimistic (docs/methods.md, auto, says by how much
        on the shipped model). Every value is multiplied by this."""
        low, high = CALIBRATION_RANGE
        return min(high, max(low, (self.accepted + CALIBRATION_PRIOR) / (self.expected + CALIBRATION_PRIOR)))

    def calibrate(self, expected: float, accepted: int, memory: float) -> None:
        self.expected = memory * self.expected + expected
        self.accepted = memory * self.accepted + accepted

    def table(self, member: int, depth: int = DEPTHS) -> list[list[float]]:
        """rates[d][rank] for d < depth at least (d = 0: the root's children). A cell's rate is its hits over
        its trials with PRIOR_TRIALS pseudo-trials at the rate of the same rank one level up (at depth 0:
        PRIOR_RATE / (rank + 1)): a deep cell seldom reached borrows what its member does one level up, which
        tells more than a fixed guess (copying continues once it started; at a high temperature little is
        accepted at any depth). Rows are computed as far down as asked, and kept until the next `record`."""
        rates = self.tables[member]
        if rates is None:
            rates = self.tables[member] = []
        while len(rates) < min(depth, DEPTHS):
            above = rates[-1] if rates else [PRIOR_RATE / (r + 1) for r in range(RANKS)]
            hits, trials = self.hits[member][len(rates)], self.trials[member][len(rates)]
            rates.append(
                [
                    (h + PRIOR_TRIALS * a) / (t + PRIOR_TRIALS)
                    for h, t, a in zip(hits, trials, above, strict=True)
                ]
            )
        return rates

    def record(self, member: int, depth: int, rank: int, hit: bool, memory: float) -> None:
        d, r = min(depth, DEPTHS - 1), min(rank, RANKS - 1)
        hits, trials = self.hits[member][d], self.trials[member][d]
        hits[r] = memory * hits[r] + float(hit)
        trials[r] = memory * trials[r] + 1.0
        self.tables[member] = None

    def warm_copy(self, weight: float) -> Acceptance:
        """The same counts, each cell carrying at most `weight` trials (a new generation's start)."""
        new = Acceptance(len(self.hits))
        for m, (hits, trials) in enumerate(zip(self.hits, self.trials, strict=True)):
            for d, (hr, tr) in enumerate(zip(hits, trials, strict=True)):
                for r, (h, t) in enumerate(zip(hr, tr, strict=True)):
                    if t > 0:
                        scale = min(1.0, weight / t)
                        new.hits[m][d][r], new.trials[m][d][r] = h * scale, t * scale
        return new


def node_values(tree: DraftTree, member: int, acceptance: Acceptance) -> list[float]:
    """Per node: the estimated chance that it is accepted (product of its path's cell rates); root 1."""
    values = [1.0] * len(tree)
    rates = acceptance.table(member, tree.depth)
    for parent, children in enumerate(tree.children):
        if not children:
            continue
        row = rates[min(tree.depths[parent], DEPTHS - 1)]
        for rank, child in enumerate(children):
            values[child] = values[parent] * row[min(rank, RANKS - 1)]
    return values


def trials(tree: DraftTree, emitted: list[int]) -> Iterator[tuple[int, int, bool]]:
    """(depth, rank, hit) for every child of a node on the true path (`DraftTree.follow`), at the depths the
    truth is known for (the emitted tokens: accepted drafts, then the target's own)."""
    children, tokens = tree.children, tree.tokens
    # per depth: the node on the true path there, and the token that came next
    for depth, (node, token) in enumerate(zip(tree.follow(emitted), emitted, strict=False)):
        for rank, child in enumerate(children[node]):
            yield depth, rank, tokens[child] == token
