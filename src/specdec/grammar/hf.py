"""The same constraint as a transformers logits processor: plain constrained decoding with `generate()`, the
reference specdec's constrained output is checked against (tests, and the bench's constrained baseline)."""

from __future__ import annotations

from typing import cast

import torch
from transformers import LogitsProcessor

from specdec.grammar.constraint import Constraint
from specdec.grammar.matcher import GrammarState


class ConstraintLogitsProcessor(LogitsProcessor):
    """Masks each step's scores [1, V] by the grammar state after the tokens generated so far (batch size 1):
    the tokens after the prompt are fed to the matcher as they come."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self.state = GrammarState(constraint, tokenizer, vocab_size, eos_ids)
        self.prompt_length: int | None = None
        self.fed = 0  # generated tokens the matcher has consumed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError("ConstraintLogitsProcessor decodes one sequence at a time")
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[0, self.prompt_length :].tolist()
        self.state.advance(generated[self.fed :])
        self.fed = len(generated)
        masked = scores.clone()
        self.state.mask(masked, self.state.committed_mask())
        return cast(torch.FloatTensor, masked)
