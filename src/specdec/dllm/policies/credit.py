"""`credit` (CreditDecoding): every position keeps a credit per token, decayed by `decay` at each forward and
raised by sqrt(p) for the token currently ranked first; the candidates are then re-ranked on
logits + weight * log(1 + credit), and positions whose re-ranked candidate reaches `threshold` are committed.
A token a position has predicted steadily over several forwards becomes committable before its single-forward
probability says so."""

from __future__ import annotations

import torch

from specdec.dllm.policies.base import (
    BlockView,
    Param,
    Policy,
    Selection,
    at_least_one,
    fraction,
    nonnegative,
    share,
)


class Credit(Policy):
    name = "credit"
    params = {
        "threshold": Param(
            "commit where the re-ranked candidate's probability is >= this, in (0, 1] (default 0.9)", fraction
        ),
        "decay": Param("credit kept from one forward to the next, in [0, 1] (default 0.65)", share),
        "weight": Param("how much credit moves the logits, >= 0 (default 0.7)", nonnegative),
    }
    threshold = 0.9
    decay = 0.65
    weight = 0.7
    credit: torch.Tensor | None = None  # [n, V]: this block's credits, per position and token

    def start_block(self, length: int) -> None:
        self.credit = None

    def select(self, view: BlockView) -> Selection:
        probs = torch.softmax(view.logits, dim=-1)  # [n, V]
        if self.credit is None or self.credit.shape != probs.shape:
            self.credit = torch.zeros_like(probs)
        self.credit.mul_(self.decay)
        top_p, top = probs.max(dim=-1)
        self.credit.scatter_add_(1, top[:, None], top_p.sqrt()[:, None])
        fused = view.logits + self.weight * torch.log1p(self.credit)
        tokens, confidence = view.pick(fused)
        commit = at_least_one(view, confidence >= self.threshold, confidence)
        return Selection(commit, tokens)
