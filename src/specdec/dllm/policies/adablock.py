"""`adablock` (AdaBlock-dLLM): at the start of each block, end it at the most confident predicted line end
when that prediction reaches `delimiter_threshold` (blocks then follow the text's own units), else keep the
block length; inside the block, commit as `threshold` does."""

from __future__ import annotations

import torch

from specdec.dllm.policies.base import BlockView, Policy, Selection, at_least_one, positive_int, unit_interval


class AdaBlock(Policy):
    name = "adablock"
    params = {
        "threshold": "commit positions whose candidate's probability is >= this, in (0, 1] (default 0.9)",
        "delimiter_threshold": "a predicted line end this likely ends the block, in (0, 1] (default 0.4)",
        "min_block": "the shortest block it makes, >= 1 (default 4)",
    }
    threshold = 0.9
    delimiter_threshold = 0.4
    min_block = 4

    def check(self) -> None:
        unit_interval("threshold", self.threshold)
        unit_interval("delimiter_threshold", self.delimiter_threshold)
        positive_int("min_block", self.min_block)

    def block_length(self, view: BlockView) -> int | None:
        if view.delimiters is None:
            return None
        n = view.tokens.shape[0]
        is_delim = view.delimiters[view.tokens] & (view.confidence >= self.delimiter_threshold)
        is_delim[: self.min_block - 1] = False
        if not bool(is_delim.any()):
            return None
        conf = torch.where(is_delim, view.confidence, torch.full_like(view.confidence, -1.0))
        end = int(conf.argmax()) + 1
        return end if end < n else None

    def select(self, view: BlockView) -> Selection:
        return Selection(at_least_one(view, view.confidence >= self.threshold))
