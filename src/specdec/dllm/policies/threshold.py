"""`threshold` (Fast-dLLM): commit every decodable position whose candidate is at least `threshold` likely,
and the most confident one when none is."""

from __future__ import annotations

from specdec.dllm.policies.base import BlockView, Policy, Selection, at_least_one, unit_interval


class Threshold(Policy):
    name = "threshold"
    params = {
        "threshold": "commit positions whose candidate's probability is >= this, in (0, 1] (default 0.9)"
    }
    threshold = 0.9

    def check(self) -> None:
        unit_interval("threshold", self.threshold)

    def select(self, view: BlockView) -> Selection:
        return Selection(at_least_one(view, view.confidence >= self.threshold))
