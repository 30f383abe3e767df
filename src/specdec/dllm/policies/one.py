"""`one`: a single token per forward, the quality reference every faster policy is measured against."""

from __future__ import annotations

import specdec.checks as checks
from specdec.dllm.policies.base import BlockView, Param, Policy, Selection, leftmost, most_confident
from specdec.errors import InputError


def _order(name: str, value: object) -> object:
    return checks.choice(name, value, ("confidence", "left"), error=InputError)


class One(Policy):
    name = "one"
    params = {
        "order": Param(
            "which masked position each forward decodes: 'left' (the leftmost, the AR order; default) or "
            "'confidence' (the most confident one, LLaDA's low-confidence remasking)",
            _order,
        ),
    }
    order = "left"

    def select(self, view: BlockView) -> Selection:
        return Selection(most_confident(view) if self.order == "confidence" else leftmost(view))
