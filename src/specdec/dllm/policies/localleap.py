"""`localleap`: positions above `threshold` are anchors; masked neighbours within `radius` of an anchor are
committed with it under the relaxed `relaxed_threshold` (a confident token makes its neighbours' guesses
more trustworthy than elsewhere in the block)."""

from __future__ import annotations

import torch.nn.functional as F

from specdec.dllm.policies.base import BlockView, Param, Policy, Selection, at_least_one, count, fraction
from specdec.errors import InputError


class LocalLeap(Policy):
    name = "localleap"
    params = {
        "threshold": Param("an anchor's probability, in (0, 1] (default 0.9)", fraction),
        "relaxed_threshold": Param(
            "a neighbour's probability, in (0, 1], at most threshold (default 0.6)", fraction
        ),
        "radius": Param("how far from an anchor a neighbour may be, in positions, >= 1 (default 2)", count),
    }
    threshold = 0.9
    relaxed_threshold = 0.6
    radius = 2

    def check(self) -> None:
        super().check()
        if self.relaxed_threshold > self.threshold:
            raise InputError("relaxed_threshold must not exceed threshold")

    def select(self, view: BlockView) -> Selection:
        anchors = view.eligible & (view.confidence >= self.threshold)
        width = 2 * self.radius + 1
        # near[j]: an anchor lies within `radius` of j (a max-pool of the anchor indicator)
        near = F.max_pool1d(anchors.float()[None, None], width, stride=1, padding=self.radius)[0, 0] > 0
        neighbours = near & (view.confidence >= self.relaxed_threshold)
        return Selection(at_least_one(view, anchors | neighbours))
