"""`one`: a single token per forward, the quality reference every faster policy is measured against."""

from __future__ import annotations

from specdec.dllm.policies.base import BlockView, Policy, Selection, most_confident
from specdec.errors import InputError


class One(Policy):
    name = "one"
    params = {
        "order": "which masked position each forward decodes: 'confidence' (the most confident one, as LLaDA's "
        "low-confidence remasking) or 'left' (the leftmost, the AR order)",
    }
    order = "confidence"

    def check(self) -> None:
        if self.order not in ("confidence", "left"):
            raise InputError(f"order must be 'confidence' or 'left' (got {self.order!r})")

    def select(self, view: BlockView) -> Selection:
        if self.order == "confidence":
            return Selection(most_confident(view))
        first = view.eligible.nonzero()[0, 0]
        commit = view.eligible.new_zeros(view.eligible.shape)
        commit[first] = True
        return Selection(commit)
