"""A smaller causal LM with the target's tokenizer drafts a chain, keeping its own KV cache in sync.

The draft cache holds the committed context plus the drafts it fed itself; after verification it is cut back
to the committed context plus the accepted drafts, so each step feeds only the tokens it has not seen (the
bonus token, and the last draft when all were accepted). Greedy runs draft the draft model's argmax; sampled
runs draw each draft token from the draft model's distribution q (processed like the target's) and report q
so the sampler can accept with min(1, p/q).

Draft length (`break_even`, SpecDec++-like): before each draft, the chance that it is accepted given the ones
before it is read off the draft's top-1 probability, calibrated online against what the target accepted, and
multiplied along the chain; drafting stops when that chance no longer pays for what one more draft adds to
the step (a draft forward plus one more token in the target's forward, both measured once per model: the
target's `CostModel` and `feed_seconds`) at the step's current expected tokens per second. The decision is
made before the token is drawn, so it cannot bias a sampled draft; and it depends on nothing timed during
the call, so a seeded call gives the same text in the same process.
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from specdec.costmodel import CostModel
from specdec.drafters.base import Drafter, Request, Scored, register
from specdec.models.gguf_target import GGUFTarget
from specdec.runtime import RuntimeChoice
from specdec.runtime.hf import ModelRunner
from specdec.runtime.llamacpp import LlamaCppRunner
from specdec.runtime.native import NativeModel, NativeRunner
from specdec.runtime.skipview import ViewRunner
from specdec.sampling import TargetDistribution
from specdec.tree import DraftTree


@dataclass
class DraftModelConfig:
    num_tokens: int = 4  # initial draft length
    adaptive: bool = True  # transformers' heuristic: all accepted -> +2, otherwise -1
    max_tokens: int = 12
    threshold: float = 0.0  # greedy: stop drafting when the draft's top-1 probability is below this (0 = off)
    # stop where one more draft stops paying by the measured costs (module docstring; the first is always
    # drafted); the length is then up to max_tokens and `num_tokens`/`adaptive` are unused
    break_even: bool = True
    lean: bool = True  # Llama-family drafts run the native forward (same weights, far less per-call overhead)


Runner = ModelRunner | NativeRunner | LlamaCppRunner


def make_runner(model, layers: list[int] | None, lean: bool) -> Runner:
    """llama.cpp's forward for a GGUF draft, else the native forward when it supports the model, else
    transformers' (`layers`: a subset, for layerskip)."""
    if isinstance(model, GGUFTarget):
        return LlamaCppRunner(model.shared)
    if lean and NativeModel.supports(model):
        return NativeRunner(NativeModel(model, layers))
    if layers is not None:
        return ViewRunner(model, layers)
    return ModelRunner(model)


CALIBRATION_BINS = 10  # confidence bins of width 0.1
CALIBRATION_PRIOR = 4.0  # pseudo-drafts per bin at the confidence itself: a few dozen real ones outweigh it
_FEED_SECONDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # draft model -> seconds per draft


@dataclass
class Calibration:
    """P(a draft is accepted | the drafts before it were), by its top-1 probability, learned online."""

    hits: list[float] = field(
        default_factory=lambda: [
            CALIBRATION_PRIOR * (b + 0.5) / CALIBRATION_BINS for b in range(CALIBRATION_BINS)
        ]
    )
    trials: list[float] = field(default_factory=lambda: [CALIBRATION_PRIOR] * CALIBRATION_BINS)

    @staticmethod
    def bin(confidence: float) -> int:
        return min(int(confidence * CALIBRATION_BINS), CALIBRATION_BINS - 1)

    def __call__(self, confidence: float) -> float:
        b = self.bin(confidence)
        return self.hits[b] / self.trials[b]

    def update(self, confidences: list[float], accepted: int) -> None:
        """The drafts up to the first rejected one were tested; the first `accepted` passed."""
        for i, c in enumerate(confidences[: accepted + 1]):
            b = self.bin(c)
            self.trials[b] += 1.0
            self.hits[b] += float(i < accepted)


class BreakEven:
    """Whether one more draft pays: its chance of acceptance (the calibrated chances so far, multiplied) times
    the step's time must reach the step's expected tokens times what the draft adds to that time."""

    def __init__(self, cost: CostModel, draft_seconds: float) -> None:
        self.cost, self.draft_seconds = cost, draft_seconds
        self.alive = 1.0  # chance that the last draft so far is accepted
        self.gain = 0.0  # expected accepted drafts so far
        self.n = 0  # drafts so far

    def worth(self, accept: float) -> bool:
        """Would a next draft accepted with chance `accept` (given the ones before it) pay?"""
        time_so_far = self.cost(self.n + 1) + self.n * self.draft_seconds
        extra = self.cost(self.n + 2) - self.cost(self.n + 1) + self.draft_seconds
        return self.alive * accept * time_so_far >= (1.0 + self.gain) * extra

    def take(self, accept: float) -> None:
        self.alive *= accept
        self.gain += self.alive
        self.n += 1


def fresh(runner: Runner) -> Runner:
    """A copy of `runner` sharing its weights (or llama.cpp model) with no cache yet: its `start` makes one,
    its `free` lets it go."""
    view = copy.copy(runner)
    view.free()  # the template runner never starts: this drops nothing of its own
    return view


def feed_seconds(runner: Runner, model) -> float:
    """Median time of a one-token draft forward after a 32-token context, measured once per draft model."""
    if model not in _FEED_SECONDS:
        probe = fresh(runner)
        times = []
        with torch.inference_mode():
            probe.start([i % 2 for i in range(32)], 48)  # token ids 0 and 1 exist in any vocabulary
            for _ in range(7):
                start = time.perf_counter()
                probe.extend([1])
                times.append(time.perf_counter() - start)
        probe.free()
        _FEED_SECONDS[model] = statistics.median(times[1:])  # the first call pays one-off allocations
    return _FEED_SECONDS[model]


@dataclass
class DraftState:
    """One generation's draft-side state: its own runner view (shared weights, private cache)."""

    runner: Runner
    request: Request
    dist: TargetDistribution | None  # None: greedy drafts
    num_tokens: int  # current draft length (adapted within the generation only)
    fed: list[int] = field(default_factory=list)  # tokens whose KV is in the draft cache, in order
    fed_drafts: int = 0  # how many of this step's drafts were fed (their KV ends `fed`)
    drafts: list[int] = field(default_factory=list)  # this step's drafts (cleared once observed)
    confidence: list[float] = field(default_factory=list)  # their top-1 probabilities (for `calibration`)
    calibration: Calibration = field(default_factory=Calibration)  # per generation: a seed gives one text


DS = TypeVar("DS", bound=DraftState)  # a chain drafter's per-generation state (layerskip's adds to it)


class ChainDrafter(Drafter[DS]):
    """Chain drafting with a cached model, on a `DraftState`: the draft length (or its break-even stop) and the
    cache kept in sync with the context. `draft` drafts with a second model, `layerskip` with a view of the
    target."""

    samples_drafts = True
    config: DraftModelConfig
    cost: CostModel | None = None  # the target's, when the length stops at the break-even point
    draft_seconds: float = 0.0  # one draft forward
    costed = ""  # the runtime `cost` was measured on (a generation on another one measures that one's)

    def _feed(self, state: DS, tokens: list[int]) -> torch.Tensor:
        if not state.fed:  # the generation's first forward
            positions = len(state.request.prompt_ids) + state.request.params.max_new_tokens
            logits = state.runner.start(tokens, positions, slack=self.config.max_tokens + 2)[None]
        else:
            logits = state.runner.extend(tokens)
        state.fed.extend(tokens)
        return logits[-1]

    def propose(self, state: DS, context: list[int], max_depth: int) -> DraftTree:
        state.fed_drafts, state.drafts, state.confidence = 0, [], []
        stop = BreakEven(self.cost, self.draft_seconds) if self.cost is not None else None
        k = min(self.config.max_tokens if stop is not None else state.num_tokens, max_depth)
        if k <= 0:
            return DraftTree.root_only(context[-1])
        logits = self._feed(state, context[len(state.fed) :])
        drafts, probs = state.drafts, []
        threshold = self.config.threshold
        for i in range(k):
            q = None if state.dist is None else state.dist(logits[None])[0]  # sampled: the processed q
            confidence = 1.0  # the top-1 probability of the distribution drafted from, when a rule reads it
            if stop is not None or threshold > 0:
                confidence = float((torch.softmax(logits.double(), dim=-1) if q is None else q).max())
            if state.dist is None and i > 0 and confidence < threshold:
                break  # not confident: the rest would mostly be rejected
            if (
                stop is not None
            ):  # decided before the draw: which tokens are drafted never depends on their value
                accept = state.calibration(confidence)
                if i > 0 and not stop.worth(accept):
                    break  # the first is always drafted: whether to speculate at all is for `auto` to decide
                stop.take(accept)
            if q is None:
                tok = int(logits.argmax())
            else:
                tok = int(torch.multinomial(q, 1, generator=state.request.generator))
                probs.append(q)
            drafts.append(tok)
            state.confidence.append(confidence)
            if i + 1 < k:  # the last draft is never fed: its KV is only needed if it is accepted
                logits = self._feed(state, [tok])
                state.fed_drafts += 1
        q = torch.stack([torch.zeros_like(probs[0]), *probs]) if probs else None  # row 0: the root, unused
        return DraftTree.chain(context[-1], drafts, q)

    def observe(self, state: DS, scored: Scored) -> None:
        """Works after any scored tree, ours or not (`auto` merges our chain, skips us for a step, or verifies
        another tree than our sampled one): our drafts count as accepted as far as they agree with the emitted
        tokens but the last, which keeps `fed` a prefix of the context without its last token, the next root
        (whose logits the next step needs; a rejected sampled draft never equals the token emitted in its
        place)."""
        emitted = scored.verdict.tokens
        accepted = 0
        while (
            accepted < min(len(state.drafts), len(emitted) - 1)
            and state.drafts[accepted] == emitted[accepted]
        ):
            accepted += 1
        # Keep the committed context plus the accepted drafts among those fed.
        keep = len(state.fed) - state.fed_drafts + min(accepted, state.fed_drafts)
        if keep < len(state.fed):
            del state.fed[keep:]
            state.runner.crop(keep)
        if self.cost is not None:
            state.calibration.update(state.confidence, accepted)
        elif self.config.adaptive and state.drafts:
            if accepted == len(state.drafts):
                state.num_tokens = min(state.num_tokens + 2, self.config.max_tokens)
            else:
                state.num_tokens = max(1, state.num_tokens - 1)
        state.fed_drafts, state.drafts, state.confidence = 0, [], []


@register
class DraftModel(ChainDrafter[DraftState]):
    """Chain drafting with a second causal LM of the target's vocabulary."""

    name = "draft"
    needs_draft_model = True

    def __init__(self, model, config: DraftModelConfig | None = None, **options) -> None:
        if model is None:
            raise ValueError("the draft method needs a draft model (--draft PATH, or --draft default)")
        self.config = config or DraftModelConfig(**options)
        self.draft = model
        self.runner = make_runner(model, None, self.config.lean)

    def bind(self, model, runtime: RuntimeChoice) -> None:
        self.target, self.runtime = model, runtime

    def start(self, request: Request) -> DraftState:
        runtime = (
            request.runtime or self.runtime
        )  # a generation may run elsewhere than bound (`--runtime auto`)
        if self.config.break_even and (self.cost is None or runtime.name != self.costed):
            # measured here: the engine has checked the target
            self.cost, self.costed = CostModel.for_runtime(self.target, runtime), runtime.name
            if not self.draft_seconds:
                self.draft_seconds = feed_seconds(self.runner, self.draft)
        runner = fresh(self.runner)  # shares the weights; its cache is this generation's own
        dist = None if request.params.greedy else TargetDistribution(request.params)
        # The draft length adapts within a generation only: carried over, it would change how many random
        # numbers a step draws, and the same seed would give different text depending on earlier calls.
        return DraftState(runner, request, dist, self.config.num_tokens)

    def release(self, state: DraftState) -> None:
        state.runner.free()
