"""The seam between the diffusion engine and a parallel-decoding policy.

After every forward over a block the engine shows the policy a `BlockView`: for each position of the block its
candidate token and that token's probability (the confidence), which positions are still masked and which may
be decoded now (`eligible`: masked, in the current sub-block, before an end-of-text already decided). The policy
answers with a `Selection`: the positions to commit (at least one, all eligible) and, if it re-ranked the
candidates, the tokens to commit there. Committed tokens are final: the engine never asks again about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import specdec.checks as checks
from specdec.errors import InputError

# Picks a candidate per row of logits [n, V]: (tokens [n], their probabilities [n]) under the request's
# sampling settings (the argmax when greedy, else a draw from the temperature/top-k/top-p distribution).
Picker = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockView:
    logits: torch.Tensor  # [n, V] float32: row j is the model's prediction for block position j
    tokens: torch.Tensor  # [n] long: the candidate at each position (picked from `logits`)
    confidence: torch.Tensor  # [n] float32: the candidate's probability
    masked: torch.Tensor  # [n] bool: not yet decoded
    eligible: torch.Tensor  # [n] bool: masked and decodable now (current sub-block, before a decided EOS)
    forward: int  # forwards over this block so far, this one included (1 = the block's first)
    pick: Picker  # the request's token choice, for policies that re-rank logits (credit)
    delimiters: torch.Tensor | None = None  # [V] bool: tokens that end a line (adablock), from the engine
    floor: str = "confidence"  # what a forward commits when the rule picks nothing: "left" or "confidence"


@dataclass(frozen=True)
class Selection:
    commit: torch.Tensor  # [n] bool, a non-empty subset of `eligible`
    tokens: torch.Tensor | None = None  # [n] long: what to commit there (None: the view's candidates)


def most_confident(view: BlockView, confidence: torch.Tensor | None = None) -> torch.Tensor:
    """[n] bool with only the most confident eligible position set: every policy's floor of one per forward."""
    conf = view.confidence if confidence is None else confidence
    best = torch.where(view.eligible, conf, torch.full_like(conf, -1.0)).argmax()
    out = torch.zeros_like(view.eligible)
    out[best] = True
    return out


def leftmost(view: BlockView) -> torch.Tensor:
    """[n] bool with only the leftmost eligible position set (the AR order)."""
    out = torch.zeros_like(view.eligible)
    out[view.eligible.nonzero()[0, 0]] = True
    return out


def at_least_one(
    view: BlockView, chosen: torch.Tensor, confidence: torch.Tensor | None = None
) -> torch.Tensor:
    """`chosen` among the eligible positions, or when that is none the engine's floor: the leftmost eligible
    position ("left") or the most confident one ("confidence", Fast-dLLM's rule)."""
    chosen = chosen & view.eligible
    if bool(chosen.any()):
        return chosen
    return leftmost(view) if view.floor == "left" else most_confident(view, confidence)


# checks a parameter's value, named for the message: InputError in one line
Rule = Callable[[str, Any], object]


def fraction(name: str, value: Any) -> object:
    """In (0, 1]: a probability threshold."""
    return checks.fraction(name, value, error=InputError)


def share(name: str, value: Any) -> object:
    """In [0, 1]: a share kept or a decay."""
    return checks.fraction(name, value, open_low=False, error=InputError)


def count(name: str, value: Any) -> object:
    """An integer >= 1 (a bool is no integer here)."""
    return checks.integer(name, value, 1, error=InputError)


def nonnegative(name: str, value: Any) -> object:
    """A finite number >= 0."""
    return checks.number(name, value, 0, error=InputError)


@dataclass(frozen=True)
class Param:
    help: str  # what it means, its range and its default (the CLI help says it)
    rule: Rule | None = None  # its check; None where the policy's own `check` does it (a file that must load)


class Policy:
    """One parallel-decoding rule. Subclasses set `name`, their parameters (dataclass-style class attributes
    listed in `params` with the rule each must meet, which `check` applies), and `select`. A policy object
    serves one generation at a time (the engine makes a fresh one per generation with `fresh`)."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise InputError(f"policy {self.name!r} takes no option {unknown[0]!r} (its options: {known})")
        for key, value in options.items():
            if value is not None:
                setattr(self, key, value)
        self.check()

    def check(self) -> None:
        """Every parameter meets its rule (InputError in one line); subclasses add what spans several."""
        for key, param in self.params.items():
            if param.rule is not None:
                param.rule(key, getattr(self, key))

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.params}

    def fresh(self) -> Policy:
        return type(self)(**self.settings())

    def start_block(self, length: int) -> None:
        """A new block of `length` positions begins."""

    def block_length(self, view: BlockView) -> int | None:
        """After the first forward over a block: a shorter length to end the block at (adablock), or None."""
        return None

    def select(self, view: BlockView) -> Selection:
        raise NotImplementedError

    def end_block(self, tokens: list[int]) -> None:
        """The block is over: `tokens` is what it committed (learn2pd's trace collection labels with it)."""
