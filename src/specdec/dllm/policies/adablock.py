"""`adablock` (AdaBlock-dLLM): at the start of each block, end it at the most confident predicted line end
when that prediction reaches `delimiter_threshold` (blocks then follow the text's own units), else keep the
block length; inside the block, commit as `threshold` does."""

from __future__ import annotations

import torch

from specdec.dllm.policies.base import BlockView, Param, count, fraction
from specdec.dllm.policies.threshold import Threshold


class AdaBlock(Threshold):  # its blocks' ends are its own, what it commits inside them is threshold's
    name = "adablock"
    params = Threshold.params | {
        "delimiter_threshold": Param(
            "a predicted line end this likely ends the block, in (0, 1] (default 0.4)", fraction
        ),
        "min_block": Param("the shortest block it makes, >= 1 (default 4)", count),
    }
    delimiter_threshold = 0.4
    min_block = 4

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
