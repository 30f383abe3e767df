"""Self-speculation by layer skipping (Draft & Verify, SWIFT; see docs/methods.md, layerskip): the target drafts for
itself with some of its decoder layers skipped. No extra weights.

The draft model is a view of the target: shallow copies of the causal-LM module and of its decoder module
that share every parameter, with the decoder's layer list replaced by the kept layers and a copied config
(`num_hidden_layers`, `layer_types`) to match. The user's model and config objects are never modified. HF
attention modules write their keys and values with `past_key_values.update(k, v, self.layer_idx)` using
their ORIGINAL index, so the view's cache (one preallocated slot per kept layer, `specdec.runtime.kvcache.KVCache`)
maps original indices to its slots. The cache is kept in sync the way `draft_model.py` keeps a draft
model's: committed context plus accepted drafts, each step feeding only what it has not seen.
For plain Llama targets the kept layers instead run through `specdec.runtime.native` (fused copies of their
weights, built when the skipped set changes): the view's per-call overhead would eat most of what skipping
saves on a CPU. The view still scores the search's trials, and drafts for every other architecture.

Drafting: a chain, up to `max_tokens`. Greedy runs stop early when the view's top-1 probability falls below
`threshold` (Draft & Verify's confidence exit; the first token is always drafted); sampled runs draw each
token from the view's processed distribution q and report q, so acceptance is min(1, p/q) (lossless). The
draft length also follows transformers' heuristic (all accepted: +2, otherwise -1), reset per generation.

Which layers to skip (SWIFT-like, on the fly). Start: skip `skip_ratio` of the middle layers (first and last
are always kept), evenly spread; or the `skip` list given. Every `adapt_every` steps, once the generation has
`adapt_window` target predictions recorded, try one candidate set: the current one with one skipped and one
kept middle layer swapped at random. Both sets are scored on the same recent window by the fraction of the
target's argmaxes (recorded from the verification logits) their view reproduces, running the view over the
window's tokens alone (no cache: cheap and bounded, an approximation of the real context that treats both
sets alike). The candidate replaces the current set when it scores higher; the draft cache is then rebuilt at
the next step. Adaptation stops when the current set scores >= `stop_at`, or after `max_trials` trials. The
skipped set restarts from the initial one each generation (as the draft length does: both live in the
generation's state) so that a seed gives the same text whatever ran before; `persist=True` carries the
learned set across generations instead.

Defaults (not tuned by measurement; the machine was busy): skip half of the middle layers (SWIFT skips ~45%
of all sublayers), confidence 0.6 (between HF's 0.4 and SWIFT's 0.8), up to 8 drafted tokens, a trial every
16 steps on the last 32 predictions, stop at 0.9 match (SWIFT: 0.93).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

import specdec.checks as checks
from specdec.drafters.base import Request, Scored, register
from specdec.drafters.draft_model import (
    ChainDrafter,
    DraftModelConfig,
    DraftState,
    Runner,
    fresh,
    make_runner,
)
from specdec.errors import InputError
from specdec.runtime import RuntimeChoice
from specdec.runtime.skipview import decoder_layers, skipping_view
from specdec.sampling import TargetDistribution
from specdec.tree import DraftTree


@dataclass
class LayerSkipConfig(DraftModelConfig):
    skip: tuple[int, ...] | str | None = (
        None  # layers to skip at the start ("2,4" or [2, 4]); None: skip_ratio
    )
    skip_ratio: float = 0.5  # fraction of the middle layers skipped when `skip` is None
    max_tokens: int = 8
    threshold: float = 0.6  # greedy: stop drafting when the view's top-1 probability is below this
    adapt: bool = True  # search the skipped set on the fly
    adapt_every: int = 16  # steps between two trials
    adapt_window: int = 32  # recent target predictions a trial is scored on
    stop_at: float = 0.9  # stop adapting once the current set reproduces this fraction
    max_trials: int = 32
    persist: bool = False  # keep the learned set across generations (a seed then depends on earlier calls)
    seed: int = 0  # RNG of the search (never of the output)

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            try:
                self.skip = tuple(int(s) for s in self.skip.replace(",", " ").split())
            except ValueError:
                raise ValueError(f"skip must list layer indices, e.g. '2,4' (got {self.skip!r})") from None
        elif self.skip is not None:
            self.skip = tuple(self.skip)
        for name in ("skip_ratio", "threshold", "stop_at"):
            checks.fraction(name, getattr(self, name), open_low=False)
        for name, least in (("num_tokens", 1), ("max_tokens", 1), ("adapt_every", 1), ("adapt_window", 2)):
            checks.integer(name, getattr(self, name), least)
        checks.integer("max_trials", self.max_trials, 0)
        if self.num_tokens > self.max_tokens:
            raise ValueError(f"need num_tokens <= max_tokens (got {self.num_tokens} > {self.max_tokens})")


def default_skip(num_layers: int, ratio: float) -> tuple[int, ...]:
    """`ratio` of the middle layers (never the first or last), evenly spread."""
    middle = list(range(1, num_layers - 1))
    k = round(ratio * len(middle))
    if k == 0:
        return ()
    step = len(middle) / k
    return tuple(middle[int((i + 0.5) * step)] for i in range(k))


def match_rate(model, keep: list[int], tokens: list[int], start: int, targets: list[int]) -> float:
    """Fraction of positions where the view's argmax after tokens[: i + 1] equals targets[i] (no cache)."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)[None]
    with torch.inference_mode():
        logits = skipping_view(model, keep)(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    hits = logits.argmax(dim=-1) == torch.tensor(targets, device=device)
    return hits.double().mean().item()


@dataclass
class LayerSkipState(DraftState):
    """A chain drafter's per-generation state plus the layer-set search of this generation."""

    skip: tuple[int, ...] = ()
    rng: random.Random = field(default_factory=random.Random)
    adapting: bool = True
    trials: int = 0
    steps: int = 0
    predictions: list[tuple[int, int, int]] = field(default_factory=list)  # recent, consecutive positions
    root_pos: int = 0


@register
class LayerSkip(ChainDrafter[LayerSkipState]):
    """`draft`'s chain drafting, with a weight-sharing view of the target (some layers skipped) as the model."""

    name = "layerskip"
    needs_target_weights = True
    learned_attributes = ("learned",)  # the skipped set carried across generations (`persist`)
    config: LayerSkipConfig

    def __init__(self, config: LayerSkipConfig | None = None, **options) -> None:
        self.config = config or LayerSkipConfig(**options)
        self.model = None
        self.runners: dict[tuple[int, ...], Runner] = {}  # by skipped set, newest last
        # with `persist`: (skipped set, still adapting, trials, search RNG) carried to the next generation
        self.learned: tuple[tuple[int, ...], bool, int, random.Random] | None = None

    def bind(self, model, runtime: RuntimeChoice) -> None:
        n = len(decoder_layers(model))
        skip = self.config.skip
        if skip is None:
            skip = default_skip(n, self.config.skip_ratio)
        assert not isinstance(skip, str)  # LayerSkipConfig.__post_init__ parsed it
        bad = [i for i in skip if not 0 <= i < n]
        if bad or len(set(skip)) == n:
            raise InputError(f"layerskip: cannot skip layers {list(skip)} of a {n}-layer model")
        self.model, self.num_layers = model, n
        self.initial_skip = tuple(sorted(set(skip)))
        self.runners, self.learned = {}, None  # the search starts over for a newly bound model

    def kept(self, skip: tuple[int, ...]) -> list[int]:
        return [i for i in range(self.num_layers) if i not in skip]

    def _runner(self, skip: tuple[int, ...]) -> Runner:
        """A private view (own cache) of the shared runner for `skip`; the lean runner's fused weight copies
        are built once per set and a few sets are kept."""
        shared = self.runners.pop(skip, None) or make_runner(self.model, self.kept(skip), self.config.lean)
        self.runners[skip] = shared
        while len(self.runners) > 4:
            del self.runners[next(iter(self.runners))]
        return fresh(shared)

    def start(self, request: Request) -> LayerSkipState:
        if self.model is None:
            raise RuntimeError(
                "layerskip drafts with the target: Engine binds it (call bind(model, runtime) first)"
            )
        cfg = self.config
        if cfg.persist and self.learned is not None:
            skip, adapting, trials, rng = self.learned
        else:
            skip, adapting, trials, rng = self.initial_skip, cfg.adapt, 0, random.Random(cfg.seed)
        dist = None if request.params.greedy else TargetDistribution(request.params)
        return LayerSkipState(
            self._runner(skip),
            request,
            dist,
            cfg.num_tokens,
            skip=skip,
            rng=rng,
            adapting=adapting,
            trials=trials,
        )

    def release(self, state: LayerSkipState) -> None:
        state.runner.free()
        if self.config.persist:
            self.learned = (state.skip, state.adapting, state.trials, state.rng)

    def propose(self, state: LayerSkipState, context: list[int], max_depth: int) -> DraftTree:
        state.root_pos = len(context) - 1
        return super().propose(state, context, max_depth)

    def observe(self, state: LayerSkipState, scored: Scored) -> None:
        super().observe(state, scored)
        nodes = scored.verdict.accepted_nodes
        argmax = scored.logits[nodes].argmax(dim=-1).tolist()
        # (position, token there, the target's argmax after it) for the accepted path
        state.predictions.extend(
            (state.root_pos + i, scored.tree.tokens[node], nxt)
            for i, (node, nxt) in enumerate(zip(nodes, argmax, strict=True))
        )
        del state.predictions[: -self.config.adapt_window]
        state.steps += 1
        if state.adapting and state.steps % self.config.adapt_every == 0:
            self._trial(state)

    def _trial(self, state: LayerSkipState) -> None:
        """Score the current set and one neighbour on the recent predictions; keep the better one."""
        cfg = self.config
        if len(state.predictions) < cfg.adapt_window:
            return
        kept_middle = [i for i in range(1, self.num_layers - 1) if i not in state.skip]
        if state.trials >= cfg.max_trials or not state.skip or not kept_middle:
            state.adapting = False  # out of trials, or no neighbour skipping as many layers
            return
        state.trials += 1
        start = state.predictions[0][0]
        tokens = [tok for _, tok, _ in state.predictions]
        targets = [nxt for _, _, nxt in state.predictions]
        current = match_rate(self.model, self.kept(state.skip), tokens, start, targets)
        if current >= cfg.stop_at:
            state.adapting = False
            return
        swap_out, swap_in = state.rng.choice(state.skip), state.rng.choice(kept_middle)
        candidate = tuple(sorted({*state.skip, swap_in} - {swap_out}))
        if match_rate(self.model, self.kept(candidate), tokens, start, targets) > current:
            state.skip = candidate
            state.runner = self._runner(candidate)  # the next step re-prefills the context with the new set
            state.fed, state.fed_drafts = [], 0
