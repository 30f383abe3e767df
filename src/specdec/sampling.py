"""Generation parameters and the target distribution p at every tree node.

p is built with transformers' own logits warpers, in the order `generate()` applies them (temperature, top-k,
top-p), so "lossless" means lossless with respect to exactly the distribution a user of `generate()` samples
from with the same settings. Temperature 0 means greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specdec.errors import InputError

# Temperatures below this are greedy (as in vLLM). Sampling at such a temperature is the argmax anyway (bar
# exact ties), and dividing logits by it overflows float32 long before the smallest positive floats (1e-300,
# 5e-324), which leaves no distribution to sample from. Treating it as greedy rather than refusing it keeps
# clients that send a tiny temperature to mean "deterministic" working.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or anything below GREEDY_TEMPERATURE = 1e-5) = greedy: the target's argmax
    top_k: int = 0  # 0 = off (note: transformers' generate() defaults to 50 when sampling)
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # a private torch.Generator per call; never the global RNG
    stop: list[str] = field(default_factory=list)  # stop strings; the text is cut before them
    ignore_eos: bool = False

    def validate(self) -> None:
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens < 1
        ):
            raise InputError(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise InputError(f"temperature must be a finite number >= 0 (got {self.temperature!r})")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (got {self.top_k!r})")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64
        ):
            raise InputError(f"seed must be an integer in [-2**63, 2**64) (got {self.seed!r})")
        if not isinstance(self.stop, list | tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop must be a list of non-empty strings (got {self.stop!r})")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"ignore_eos must be True or False (got {self.ignore_eos!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class TargetDistribution:
    """Turns raw target logits [N, V] into the processed distribution p [N, V] (float32).

    Raises InputError when a row is no distribution at all (logits with nan or +inf, or every token masked),
    which torch would otherwise report from deep inside sampling as "probability tensor contains inf/nan".
    """

    def __init__(self, params: SamplingParams) -> None:
        # A plain list: LogitsProcessorList.__call__ inspects every processor's signature on every call
        # (~0.1 ms each), and these warpers take (input_ids, scores) only.
        self.warpers: list = []
        if params.temperature not in (0, 1.0):
            self.warpers.append(TemperatureLogitsWarper(float(params.temperature)))  # it rejects an int
        if params.top_k:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warper in self.warpers:  # input_ids are unused by these three
            scores = warper(None, scores)
        probs = torch.softmax(scores, dim=-1)
        # Softmax turns a row holding any nan or +inf, or only -inf, into nan everywhere in that row (its max is
        # nan, +inf or -inf), so the first column tells for the whole row: a check of N values per step, not N*V.
        if torch.isnan(probs[:, 0]).any():
            raise InputError(
                "the model's logits are not finite (nan or inf), so there is no distribution to sample from; "
                "this usually means the weights overflow in this dtype (try float32)"
            )
        return probs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
