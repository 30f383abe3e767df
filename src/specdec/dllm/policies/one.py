"""`one`: a single token per forward, the quality reference every faster policy is measured against."""

from __future__ import annotations

from specdec.dllm.policies.base import BlockView, Policy, Selection, leftmost, most_confident
from specdec.errors import InputError


class One(Policy):
    name = "one"
    params = {
        "order": "which masked position each forward decodes: 'left' (the leftmost, the AR order; default) or "
        "'confidence' (the most confident one, LLaDA's low-confidence remasking)",
    }
    order = "left"

    def check(self) -> None:
        if self.order not in ("confidence", "left"):
            raise InputError(f"order must be 'confidence' or 'left' (got {self.order!r})")

    def select(self, view: BlockView) -> Selection:
        return Selection(most_confident(view) if self.order == "confidence" else leftmost(view))
