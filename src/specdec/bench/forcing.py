"""Forced acceptance: every method decodes a given reference text, so that its speed is that of a model which
writes that text, while every forward runs on the real model (`specdec bench --scale`, `--yardstick`).

- specdec's engine: `ForcedTarget` wraps a generation's runtime; its forwards (cache, hidden states, cost) are
  real, and each tree node on the reference path (its tokens from the root follow the reference) has its
  logits' reference token lifted above their maximum, so greedy acceptance takes exactly the drafted prefix
  that follows the reference and the bonus token is the reference's next. Every other node keeps the model's
  own logits: forcing reveals what a verdict reveals (the accepted tokens and the bonus), never a reference
  token further on, which a drafter that learns from the target's logits off the accepted path (lookahead's
  window, recycle's table) would otherwise copy. Those drafters see a random model's logits there, which
  predict nothing: their τ under forcing is a floor (docs/bench.md, Real scale).
- transformers' `generate()` and llama.cpp's own loop: a logits processor does the same to each row it scores.

Every forced run must emit exactly the reference (the bench checks it as it checks losslessness).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from specdec.runtime.base import Scores
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

if TYPE_CHECKING:  # the engine is imported where a generation runs (it imports much of specdec)
    from specdec.engine import Generation


def lift(logits: torch.Tensor, tokens: Sequence[int], rows: Sequence[int] | None = None) -> torch.Tensor:
    """logits [N, V] (a copy) with row rows[i]'s `tokens[i]` raised above that row's maximum, its argmax
    (rows: 0, 1, ... when not given); the other rows unchanged."""
    index = torch.tensor(list(range(len(tokens)) if rows is None else rows), device=logits.device)
    truth = torch.tensor(list(tokens), device=logits.device)
    out = logits.clone()
    out[index, truth] = logits[index].max(dim=-1).values + 1
    return out


class ForcedTarget:
    """A generation's runtime whose verdict follows `reference` (module docstring). The runtime protocol's
    tree surface, delegated to `inner`."""

    def __init__(self, inner, prompt_len: int, reference: list[int]) -> None:
        self.inner, self.prompt_len, self.reference = inner, prompt_len, reference
        self.name = inner.name

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    @property
    def max_positions(self) -> int | None:
        return self.inner.max_positions

    @property
    def cached_tokens(self) -> int:
        return self.inner.cached_tokens

    def reset(self, positions: int, slack: int = 0) -> None:
        self.inner.reset(positions, slack)

    def prefill(self, token_ids: list[int], layers=()) -> Scores:
        return self.inner.prefill(token_ids, layers)

    def score(self, tree: DraftTree, layers=()) -> Scores:
        """The inner runtime's scores, each node on the reference path lifted to the reference's next token."""
        start = self.inner.length
        scores = self.inner.score(tree, layers)
        nodes, truth = self.on_path(tree, start)
        return replace(scores, logits=lift(scores.logits, truth, nodes))

    def on_path(self, tree: DraftTree, start: int) -> tuple[list[int], list[int]]:
        """(the nodes whose root-to-node tokens follow the reference, the reference token after each). The
        root sits at position `start` (the cache holds every token before it), a node at depth d at start + d,
        and the reference token at position p is reference[p - prompt_len] (the last, past its end)."""
        last = len(self.reference) - 1

        def at(position: int) -> int:
            return self.reference[min(position - self.prompt_len, last)]

        on = [False] * len(tree)
        nodes, truth = [], []
        for i, (token, parent, depth) in enumerate(zip(tree.tokens, tree.parents, tree.depths, strict=True)):
            on[i] = parent < 0 or (on[parent] and token == at(start + depth))
            if on[i]:
                nodes.append(i)
                truth.append(at(start + depth + 1))
        return nodes, truth

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        self.inner.commit(scores, accepted_nodes)

    def keep_prefix(self) -> None:
        pass  # forced along a reference: its committed entries are not the model's own text to reuse

    def free(self) -> None:
        self.inner.free()


@dataclass
class ForcedRun:
    generation: Generation
    first_seconds: float  # from the call to the first emitted token (the prefill and the first step)
    seconds: float


def forced_generation(
    engine, prompt_ids: list[int], reference: list[int], clock: Callable[[], float] = time.perf_counter
) -> ForcedRun:
    """The engine's generation of `len(reference)` tokens after `prompt_ids`, forced along `reference`."""
    from specdec.engine import Decoding, check_request

    params = SamplingParams(max_new_tokens=len(reference), ignore_eos=True)
    check_request(prompt_ids, params, engine.max_positions)
    start = clock()
    run = Decoding(engine, prompt_ids, params)
    run.target = ForcedTarget(run.target, len(prompt_ids), reference)
    first = None
    try:
        with torch.inference_mode():
            run.prefill()
        while True:
            with torch.inference_mode():
                step = run.step()
            if first is None:
                first = clock() - start
            if step.done:
                break
    finally:
        run.close()
    assert first is not None and step.result is not None  # at least one step ran, the last has the result
    return ForcedRun(step.result, first, clock() - start)


class ForceReference:
    """A logits processor for transformers' `generate()` (and, called with numpy arrays, llama-cpp-python's):
    the token at each new position is the reference's. Records when it was first called (the first token's
    logits are ready: the prefill is done)."""

    def __init__(self, prompt_len: int, reference: list[int], clock: Callable[[], float] = time.perf_counter):
        self.prompt_len, self.reference, self.clock = prompt_len, reference, clock
        self.first_call: float | None = None

    def token(self, length: int) -> int:
        """The reference token after a sequence of `length` tokens (the last one past its end)."""
        return self.reference[min(length - self.prompt_len, len(self.reference) - 1)]

    def __call__(self, input_ids, scores):
        if self.first_call is None:
            self.first_call = self.clock()
        if isinstance(scores, torch.Tensor):  # transformers: input_ids [B, L], scores [B, V]
            token = self.token(input_ids.shape[-1])
            forced = torch.full_like(scores, float("-inf"))
            forced[:, token] = 0.0
            return forced
        # llama-cpp-python: input_ids [L] and scores [V], numpy arrays
        forced = scores.copy()
        forced[:] = -float("inf")
        forced[self.token(len(input_ids))] = 0.0
        return forced


def reference_ids(tokenizer, prompt: str, reference: str, limit: int, stop_ids: set[int]) -> list[int]:
    """The reference's first `limit` tokens as they follow `prompt` (the joint text's tokens after the
    prompt's, or the reference alone when the boundary merged two tokens), cut before any of `stop_ids` (an
    EOS would end the baseline's generation)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + reference[: 16 * limit])["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        ids = joint[len(prompt_ids) :]
    else:
        ids = tokenizer(reference[: 16 * limit], add_special_tokens=False)["input_ids"]
    for i, t in enumerate(ids[:limit]):
        if t in stop_ids:
            return ids[:i]
    return ids[:limit]
