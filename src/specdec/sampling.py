"""Generation parameters and the target distribution p at every tree node.

p is built with transformers' own logits warpers, in the order `generate()` applies them (temperature, top-k,
top-p), so "lossless" means lossless with respect to exactly the distribution a user of `generate()` samples
from with the same settings. Temperature 0 means greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import specdec.checks as checks
from specdec.errors import InputError
from specdec.grammar.constraint import Constraint

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
    # what the output must match (JSON Schema, regex, grammar...): every position is decoded from the target's
    # distribution masked by it and renormalised (docs/structured.md); None: unconstrained
    constraint: Constraint | None = None

    def validate(self) -> None:
        checks.integer("max_new_tokens", self.max_new_tokens, 1, error=InputError)
        checks.number("temperature", self.temperature, 0, error=InputError)
        checks.integer("top_k", self.top_k, 0, error=InputError)
        checks.fraction("top_p", self.top_p, error=InputError)
        if self.seed is not None:  # what torch.Generator.manual_seed takes
            checks.integer(
                "seed", self.seed, -(2**63), 2**64 - 1, error=InputError, shown="in [-2**63, 2**64)"
            )
        if not isinstance(self.stop, list | tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop must be a list of non-empty strings (got {self.stop!r})")
        checks.flag("ignore_eos", self.ignore_eos, error=InputError)
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise InputError(
                    f"constraint must be a specdec.Constraint (got {type(self.constraint).__name__})"
                )
            if self.ignore_eos:
                raise InputError(
                    "ignore_eos cannot be combined with a constraint: the grammar says where the output ends"
                )
            self.constraint.check()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class TargetDistribution:
    """Turns raw target logits [N, V] into the processed distribution p [N, V] (float32).

    Raises InputError when a row is no distribution at all (logits with nan or +inf, or every token masked),
    which torch would otherwise report from deep inside sampling as "probability tensor contains inf/nan".
    """

    def __init__(self, params: SamplingParams) -> None:
        # A plain list: LogitsProcessorList.__call__ inspects every processor's signature on every call (a cost
        # per step that docs/methods.md gives), and these warpers take (input_ids, scores) only.
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
