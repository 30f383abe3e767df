"""`threshold` (Fast-dLLM): commit every decodable position whose candidate is at least `threshold` likely,
and the most confident one when none is."""

from __future__ import annotations

from specdec.dllm.policies.base import BlockView, Param, Policy, Selection, at_least_one, fraction


class Threshold(Policy):
    name = "threshold"
    params = {
        "threshold": Param(
            "commit positions whose candidate's probability is >= this, in (0, 1] (default 0.9)", fraction
        )
    }
    threshold = 0.9

    def select(self, view: BlockView) -> Selection:
        return Selection(at_least_one(view, view.confidence >= self.threshold))
