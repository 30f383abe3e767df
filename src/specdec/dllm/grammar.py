"""A constraint on a block-diffusion generation (docs/structured.md, Diffusion LMs).

A position's mask is the grammar state after every position before it, so it is known only once they are
all decided. Under a constraint the block is therefore committed in order: each forward, the masked run
from the first undecided position on is read left to right, each row masked by the state after the
candidates before it (a candidate drawn from its masked row), and a policy's choice is cut to the run it
commits from that first position (at least that one: the floor). Positions after an undecided one wait, so
a policy that decodes out of order loses that freedom here, and the text is always a valid prefix.
"""

from __future__ import annotations

import torch

from specdec.grammar import GrammarState
from specdec.grammar.matcher import ALL, fill


class BlockGrammar:
    """The constraint's state at the committed text, and what each forward asks of it."""

    def __init__(self, state: GrammarState) -> None:
        self.state = state
        self.row = torch.full((1, state.words), ALL, dtype=torch.int32)

    def candidates(self, logits: torch.Tensor, first: int, hi: int, pick):
        """Rows first..hi-1 of logits [n, V] masked in order, each by the state after the candidates
        before it; returns (the logits, candidates [n], their probabilities [n], `end`: the rows
        first..end-1 are a legal run)."""
        state, matcher = self.state, self.state.matcher
        logits = logits.clone()
        cand = torch.zeros(len(logits), dtype=torch.long)
        conf = torch.zeros(len(logits))
        consumed, end = 0, first
        for j in range(first, hi):
            fill(matcher, self.row, 0)
            state.mask(logits[j : j + 1], self.row)
            token, probability = pick(logits[j : j + 1])
            cand[j], conf[j], end = token[0], probability[0], j + 1
            if int(token[0]) in state.eos_ids or not matcher.consume_token(int(token[0])):
                break  # nothing follows an end of text
            consumed += 1
        matcher.rollback(consumed)
        return logits, cand, conf, end

    def in_order(self, chosen: torch.Tensor, values: torch.Tensor, cand: torch.Tensor, first: int):
        """(the positions to commit: the chosen run from `first` as far as its tokens are legal, at least
        `first`; the tokens there, the candidate at `first` where the policy's own is not legal)."""
        run = first
        while run < len(chosen) and bool(chosen[run]):
            run += 1
        tokens = [int(t) for t in values[first:run]]
        legal = self.state.matcher.validate_tokens(tokens) if tokens else 0
        values = values.clone()
        if legal == 0:
            values[first], legal = cand[first], 1
        commit = torch.zeros_like(chosen)
        commit[first : first + legal] = True
        return commit, values

    def advance(self, tokens: list[int]) -> None:
        self.state.advance(tokens)
