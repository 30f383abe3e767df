"""A smaller causal LM with the target's tokenizer drafts a chain, keeping its own KV cache in sync.

The draft cache holds the committed context plus the drafts it fed itself; after verification it is cut back
to the committed context plus the accepted drafts, so each step feeds only the tokens it has not seen (the
bonus token, and the last draft when all were accepted). Greedy runs draft the draft model's argmax; sampled
runs draw each draft token from the draft model's distribution q (processed like the target's) and report q
so the sampler can accept with min(1, p/q).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from specdec.drafters.base import Drafter, Request, Scored, register
from specdec.models.lean import LeanRunner
from specdec.runner import ModelRunner
from specdec.sampling import TargetDistribution
from specdec.tree import DraftTree


@dataclass
class DraftModelConfig:
    num_tokens: int = 4  # initial draft length
    adaptive: bool = True  # transformers' heuristic: all accepted -> +2, otherwise -1
    max_tokens: int = 12
    threshold: float = 0.0  # greedy: stop drafting when the draft's top-1 probability is below this (0 = off)
    lean: bool = True  # Llama drafts run `specdec.models.lean` (same weights, far less per-call overhead)


def make_runner(model, layers: list[int] | None, lean: bool) -> ModelRunner | LeanRunner:
    """The lean forward when it supports the model, else transformers' (`layers`: a subset, for layerskip)."""
    if lean and LeanRunner.supports(model):
        return LeanRunner(model, layers)
    if layers is not None:
        from specdec.drafters.layerskip import ViewRunner

        return ViewRunner(model, layers)
    return ModelRunner(model)


@dataclass
class DraftState:
    """One generation's draft-side state: its own runner view (shared weights, private cache)."""

    runner: ModelRunner | LeanRunner
    request: Request
    dist: TargetDistribution | None  # None: greedy drafts
    num_tokens: int  # current draft length (adapted within the generation only)
    fed: list[int] = field(default_factory=list)  # tokens whose KV is in the draft cache, in order
    fed_drafts: int = 0  # how many of the last step's drafts were fed (their KV ends `fed`)
    drafted: int = 0  # drafts proposed in the last step


@register
class DraftModel(Drafter):
    """Chain drafting with a cached model; `layerskip` reuses it with a view of the target as the model."""

    name = "draft"
    needs_draft_model = True
    samples_drafts = True

    def __init__(self, model, config: DraftModelConfig | None = None, **options) -> None:
        if model is None:
            raise ValueError("the draft method needs a draft model (--draft PATH, or --draft default)")
        self.config = config or DraftModelConfig(**options)
        self.runner = make_runner(model, None, self.config.lean)

    def start(self, request: Request) -> DraftState:
        runner = copy.copy(self.runner)  # shares the weights; the cache below is this generation's own
        runner.cache = None
        dist = None if request.params.greedy else TargetDistribution(request.params)
        # The draft length adapts within a generation only: carried over, it would change how many random
        # numbers a step draws, and the same seed would give different text depending on earlier calls.
        return DraftState(runner, request, dist, self.config.num_tokens)

    def release(self, state: DraftState) -> None:
        state.runner.cache = None

    def _feed(self, state: DraftState, tokens: list[int]) -> torch.Tensor:
        if state.runner.cache is None:
            positions = len(state.request.prompt_ids) + state.request.params.max_new_tokens
            logits = state.runner.start(tokens, positions, slack=self.config.max_tokens + 2)[None]
        else:
            logits = state.runner.extend(tokens)
        state.fed.extend(tokens)
        return logits[-1]

    def propose(self, state: DraftState, context: list[int], max_depth: int) -> DraftTree:
        state.fed_drafts = state.drafted = 0
        k = min(state.num_tokens, max_depth)
        if k <= 0:
            return DraftTree.root_only(context[-1])
        logits = self._feed(state, context[len(state.fed) :])
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        threshold = self.config.threshold
        for i in range(k):
            if state.dist is None:
                if (
                    i > 0
                    and threshold > 0
                    and torch.softmax(logits.double(), dim=-1).max().item() < threshold
                ):
                    break  # not confident: the rest would mostly be rejected
                tok = int(logits.argmax())
            else:
                q = state.dist(logits[None])[0]
                tok = int(torch.multinomial(q, 1, generator=state.request.generator))
                probs.append(q)
            drafts.append(tok)
            if i + 1 < k:  # the last draft is never fed: its KV is only needed if it is accepted
                logits = self._feed(state, [tok])
                state.fed_drafts += 1
        state.drafted = len(drafts)
        q = torch.stack([torch.zeros_like(probs[0]), *probs]) if probs else None  # row 0: the root, unused
        return DraftTree.chain(context[-1], drafts, q)

    def observe(self, state: DraftState, scored: Scored) -> None:
        accepted = scored.verdict.accepted_drafts
        # Keep the committed context plus the accepted drafts among those fed.
        keep = len(state.fed) - state.fed_drafts + min(accepted, state.fed_drafts)
        if keep < len(state.fed):
            del state.fed[keep:]
            state.runner.cache.crop(keep)
        if self.config.adaptive and state.drafted:
            if accepted == state.drafted:
                state.num_tokens = min(state.num_tokens + 2, self.config.max_tokens)
            else:
                state.num_tokens = max(1, state.num_tokens - 1)
