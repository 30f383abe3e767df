"""What a bigger draft tree costs on this machine, and the tree size that pays off.

A target forward over n tree tokens costs cost(n): almost flat on a GPU, but on a CPU it grows with n (the
shipped target's figures: docs/methods.md, The cost model). A drafter that knows, for
each tree size n, the expected number of accepted drafted tokens gain(n) should draft the n that maximises

    tokens per second = (1 + gain(n)) / (t_draft(n) + cost(n + 1))          (the +1: the root is scored too)

(see docs/methods.md, The cost model). `CostModel.measure` times real tree forwards after a prefill on the running model
(well under a second for the shipped model) and fits a monotone piecewise-linear cost(n); `CostModel.reference()`
is a table measured once, for when measuring is not wanted. `CostModel.for_runtime` measures once per model object
and runtime, and `CostModel.recheck` measures again (on `specdec.timing`'s schedule, by its callers), keeping
per size the least time ever seen: a burst of load during the first measurement cannot shape the curve for the
process's life.
"""

from __future__ import annotations

import math
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specdec.timing import Fastest
from specdec.tree import DraftTree

if TYPE_CHECKING:  # for annotations only: choosing a runtime times forwards with this module
    from specdec.runtime import RuntimeChoice

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
# seconds of timed forwards per size after which `measure` stops at MIN_SAMPLES samples: a model of real size
# (forwards of 50-200 ms) would otherwise spend seconds per measurement, in its first requests; the shipped
# model's forwards take milliseconds, so it still gets every one of its `repeats`
SIZE_BUDGET = 0.15
MIN_SAMPLES = 2
# model -> {runtime name: (the fitted CostModel, the least seconds seen per size)}
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CostModel:
    """cost(n) in seconds for one target forward over n tree tokens (root included), n >= 1."""

    sizes: tuple[int, ...]  # ascending, distinct
    seconds: tuple[float, ...]  # non-decreasing (see `fit`)

    @classmethod
    def fit(cls, sizes: Sequence[int], seconds: Sequence[float]) -> CostModel:
        """Monotone least-squares fit (pool adjacent violators): timing noise must not make a bigger tree
        look cheaper than a smaller one."""
        if len(sizes) != len(seconds) or not sizes:
            raise ValueError("need one time per size, and at least one size")
        pairs = sorted(zip(sizes, seconds, strict=True))
        if any(n < 1 for n, _ in pairs) or len({n for n, _ in pairs}) != len(pairs):
            raise ValueError("sizes must be distinct and >= 1")
        blocks: list[list[float]] = []  # [mean, weight]
        for _, t in pairs:
            blocks.append([t, 1.0])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                mean, weight = blocks.pop()
                blocks[-1][0] = (blocks[-1][0] * blocks[-1][1] + mean * weight) / (blocks[-1][1] + weight)
                blocks[-1][1] += weight
        fitted = [mean for mean, weight in blocks for _ in range(int(weight))]
        return cls(tuple(n for n, _ in pairs), tuple(fitted))

    @classmethod
    def reference(cls) -> CostModel:
        """The 14M-parameter Llama target on this project's 2-core development machine (docs/methods.md)."""
        return cls.fit((1, 8, 16, 64), (7.4e-3, 10.8e-3, 12.2e-3, 20e-3))

    @classmethod
    def measure(
        cls,
        model,
        sizes: Sequence[int] = DEFAULT_SIZES,
        past: int = 512,
        repeats: int = 7,
        runtime: Callable | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> CostModel:
        """Time `repeats` forwards per tree size after a `past`-token prefill (fewer, at least MIN_SAMPLES,
        once they took SIZE_BUDGET seconds); the least per size is fitted.
        `runtime` makes the target runtime to time (default: transformers'). `past`: a typical request's
        context (attention's share of a forward grows with it, and differently per runtime: docs/methods.md,
        The cost model), capped by the model's positions.
        `clock`: what times the forwards (tests inject one)."""
        from specdec.models.support import attention_window
        from specdec.runtime.hf import ModelRunner

        config = model.config.get_text_config(decoder=True)
        limit = getattr(config, "max_position_embeddings", None) or past + max(sizes) + 1
        window = attention_window(config)  # a windowed model serves requests within its window only
        limit = min(limit, window[1]) if window else limit
        past = max(1, min(past, limit - max(sizes) - 1))
        vocab = config.vocab_size
        runner = ModelRunner(model) if runtime is None else runtime()
        with torch.inference_mode():
            runner.start([(7 * i + 1) % vocab for i in range(past)], past + max(sizes) + 1)
            trees = {n: _binary_tree(n, vocab) for n in sizes}
            runner.score(trees[min(sizes)])  # warm-up (first-call allocations)
            runner.crop(past)
            samples: dict[int, list[float]] = {n: [] for n in sizes}
            # one size at a time, as decoding uses them (tree sizes change slowly), each after two untimed
            # forwards of its size: a forward right after a much larger one costs more for a few calls
            # (allocator, caches; docs/methods.md, The cost model, says how much), which made
            # small trees look dear and large ones cheap beside them when sizes were timed round robin
            for n in sizes:
                spent = 0.0
                for timed in [False, False] + [True] * repeats:
                    start = clock()
                    runner.score(trees[n])
                    took = clock() - start
                    runner.crop(past)
                    if timed:
                        samples[n].append(took)
                        spent += took
                        if len(samples[n]) >= MIN_SAMPLES and spent >= SIZE_BUDGET:
                            break
            # the least: other load only ever slows a forward, and auto compares runtimes by these curves, so a
            # burst must not decide (medians moved llama.cpp's 1-token forward from run to run: docs/methods.md)
            times = [min(samples[n]) for n in sizes]
        return cls.fit(sizes, times)

    @classmethod
    def for_runtime(
        cls, model, runtime: RuntimeChoice, clock: Callable[[], float] = time.perf_counter
    ) -> CostModel:
        """`measure(model)` on a runtime once per model object and runtime (the latest `recheck` after that;
        kept while the model lives): a drafter measures the runtime its engine bound it to
        (`Drafter.bind`)."""
        measured = _MEASURED.setdefault(model, {})
        if runtime.name not in measured:
            return cls.recheck(model, runtime, clock)
        return measured[runtime.name][0]

    @classmethod
    def recheck(
        cls, model, runtime: RuntimeChoice, clock: Callable[[], float] = time.perf_counter
    ) -> CostModel:
        """Measure again and fit, per size, the least time of this and every earlier measurement on the runtime
        (other load only ever slows a forward); what `for_runtime` returns from now on."""
        measured = _MEASURED.setdefault(model, {})
        fastest = measured[runtime.name][1] if runtime.name in measured else Fastest()
        sample = cls.measure(model, runtime=runtime.new, clock=clock)
        curve = cls.fit(sample.sizes, fastest.merge(sample.sizes, sample.seconds))
        measured[runtime.name] = (curve, fastest)
        return curve

    def __call__(self, n: float) -> float:
        """Linear between measured sizes; beyond them, the nearest segment's slope (flat below the first)."""
        xs, ys = self.sizes, self.seconds
        if len(xs) == 1 or n <= xs[0]:
            return ys[0]
        i = min(max(bisect_left(xs, n), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def best_size(
        self, gains: Sequence[float], draft_seconds: float = 0.0, draft_seconds_per_node: float = 0.0
    ) -> int:
        """The number of drafted nodes n (an index into `gains`) maximising expected tokens per second.

        gains[n] = expected accepted drafted tokens when n nodes are drafted (gains[0] = 0: no draft). Drafting
        nothing skips the drafter entirely, so n = 0 costs only cost(1).
        """
        return best_size(self, gains, draft_seconds, draft_seconds_per_node)


REFINE_RATE = 0.1  # weight of one timed forward (in log space): about 10 steps of memory
REFINE_LOCAL = 0.2  # the share of a surprise that reshapes the curve near its size; the rest scales all sizes
REFINE_CLIP = 2.0  # a measurement counts at most this factor away from the prediction: one stall (a GC pause,
# another job's burst) must not move the curve far, a lasting change still does within a few dozen steps


class OnlineCost:
    """A measured `CostModel`, refined by the forward times seen while decoding.

    The measurement can be wrong for the rest of the run: taken while another job was busy, the machine's load
    changed since, or the requests' contexts differ from the 512 tokens it was measured after (a forward's cost
    grows with the context: docs/methods.md, The cost model, has the shipped target's figures). Such changes move every size alike, while decoding times only the sizes it uses (mostly
    small ones): so most of each surprise (log of measured / predicted, times `rate`) scales the whole curve,
    and for a tree (n > 1) a `REFINE_LOCAL` share moves the measured sizes around n, which fixes a shape the
    measurement got wrong without letting the sizes in use drift away from the ones not in use. (A root alone,
    the most frequent forward, only scales: the shape is relative to it, and is refitted only when it moves.)
    """

    def __init__(self, base: CostModel, rate: float = REFINE_RATE) -> None:
        self.base = base
        self.rate = rate
        self.scale = 1.0  # the whole curve's factor
        self.anchors = list(base.seconds)  # the measured sizes' seconds, reshaped, before `scale`
        self.shape = base  # the monotone fit of `anchors`
        self.one = base(1)  # cost(1), kept current: the most asked size (every plain step asks for it)

    def __call__(self, n: float) -> float:
        return self.scale * self.shape(n)

    @property
    def model(self) -> CostModel:
        """The current curve as a `CostModel`."""
        return CostModel(self.shape.sizes, tuple(self.scale * t for t in self.shape.seconds))

    def update(self, n: int, seconds: float) -> None:
        """One verification of `n` tree tokens (root included) took `seconds`."""
        if self.rate == 0 or seconds <= 0:
            return
        if n <= 1:  # the plain step's case, every step of plain decoding: as little work as it can be
            ratio = seconds / self.one
            ratio = (
                REFINE_CLIP if ratio > REFINE_CLIP else 1 / REFINE_CLIP if ratio < 1 / REFINE_CLIP else ratio
            )
            factor = ratio**self.rate  # exp(rate * log(ratio))
            self.scale *= factor
            self.one *= factor
            return
        surprise = math.log(min(max(seconds / self(n), 1 / REFINE_CLIP), REFINE_CLIP))
        self.scale *= math.exp(self.rate * (1 - REFINE_LOCAL) * surprise)
        xs = self.base.sizes
        i = bisect_left(xs, n)
        if i == 0 or i == len(xs) or xs[i] == n:  # at (or beyond) one measured size: it takes all
            weights = [(min(i, len(xs) - 1), 1.0)]
        else:
            w = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
            weights = [(i - 1, 1.0 - w), (i, w)]
        for j, w in weights:
            self.anchors[j] *= math.exp(self.rate * REFINE_LOCAL * w * surprise)
        self.shape = CostModel.fit(xs, self.anchors)
        self.one = self.scale * self.shape(1)

    def best_size(
        self, gains: Sequence[float], draft_seconds: float = 0.0, draft_seconds_per_node: float = 0.0
    ) -> int:
        """`CostModel.best_size` on the refined curve."""
        return best_size(self, gains, draft_seconds, draft_seconds_per_node)

    def report(self) -> dict[str, list]:
        """The fit, for stats: the measured and the current milliseconds per size."""
        return {
            "sizes": list(self.base.sizes),
            "measured_ms": [round(t * 1e3, 3) for t in self.base.seconds],
            "current_ms": [round(t * 1e3, 3) for t in self.model.seconds],
        }


def best_size(
    cost: Callable[[float], float],
    gains: Sequence[float],
    draft_seconds: float = 0.0,
    draft_seconds_per_node: float = 0.0,
) -> int:
    """`CostModel.best_size` for any curve."""
    best, best_rate = 0, 1.0 / cost(1)
    for n in range(1, len(gains)):
        rate = (1.0 + gains[n]) / (draft_seconds + draft_seconds_per_node * n + cost(n + 1))
        if rate > best_rate:
            best, best_rate = n, rate
    return best


def chain_gains(acceptance: Sequence[float]) -> list[float]:
    """gains for a chain: acceptance[d] = P(draft d+1 accepted | drafts 1..d accepted); gains[n] = sum of the
    first n cumulative products (expected accepted length of an n-token chain)."""
    gains, alive = [0.0], 1.0
    for a in acceptance:
        alive *= a
        gains.append(gains[-1] + alive)
    return gains


def _binary_tree(n: int, vocab: int) -> DraftTree:
    """A bushy n-node tree (node i's parent is (i-1)//2) with distinct sibling tokens, for timing."""
    return DraftTree([(3 * i + 2) % vocab for i in range(n)], [-1] + [(i - 1) // 2 for i in range(1, n)])
