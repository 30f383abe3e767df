"""Choices made by timing, kept honest over a process's life.

A CPU's speed swings from minute to minute (other processes, frequency scaling, a laptop's power state), so
one timing sample at load can be off by a factor of two or more. Every timing-based choice in specdec (the
target runtime for a drafting method, the forward-cost curve that sizes trees) therefore

- is taken again on a back-off schedule of generations (`Recheck`), so that its cost amortises to nothing
  while a burst of noise at load is overruled within a few requests; a timing that takes over RECHECK_FREE
  seconds (auto's cost curves; any timing of a model of real size: requests must not pay for them) skips the
  early re-checks and is taken again only once it costs at most RECHECK_SHARE of the wall time since the
  timing before (the cost curve is refined by every verification between timings:
  `specdec.costmodel.OnlineCost`, and a real-size model's forwards are long enough that a burst moves them
  less);
- keeps, per option and size, the least time ever measured (`Fastest`): other load only ever slows a
  forward, so the minimum over samples converges on the machine's real speed whatever the noise;
- switches only when another option is cheaper by a margin (`prefer`), so that two options of about the same
  speed do not flip-flop from one re-check to the next.

What may still vary between runs is said in docs/runtime.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# generations after which a timing is taken again (then every RECHECK_EVERY): the early ones overrule a noisy
# start within the first requests (and within `specdec bench`'s warm-up, one generation per task), the later
# ones a burst that lasted through all of those
RECHECK_AT = (1, 2, 3)
RECHECK_EVERY = 128
# most of the wall time since the last timing that a re-check may cost: a due re-check waits until then, when
# the last timing took over RECHECK_FREE seconds (cheaper ones keep the schedule: the shipped model's takes
# well under a second, and its early re-checks land in the first requests, or in the bench's warm-up)
RECHECK_SHARE = 0.05
# a timing dearer than this is not repeated early: auto's cost curves (~1.5 s on the shipped model) made its
# first requests 2-4x slower than the later ones when they were (docs/runtime.md, What may vary between runs)
RECHECK_FREE = 0.1
# another option must be this much cheaper than the current one to replace it
SWITCH_MARGIN = 0.1


@dataclass
class Recheck:
    """Counts generations and says when a timing is due again (`RECHECK_AT`, then every `RECHECK_EVERY`); after
    a timing dearer than `RECHECK_FREE` (what `took` reports), only every `RECHECK_EVERY`, once it costs at most
    `RECHECK_SHARE` of the wall time since."""

    generations: int = 0
    clock: Callable[[], float] = time.perf_counter
    pending: bool = False  # the schedule asked for a re-check that was too dear so far
    cost: float = 0.0  # seconds the last timing took
    since: float | None = None  # when it ended (`clock`); None: no timing reported

    def tick(self) -> bool:
        """One more generation starts: True when the timing should be taken again before it."""
        self.generations += 1
        n = self.generations - 1  # generations finished before this one
        dear = self.since is not None and self.cost > RECHECK_FREE
        if (n in RECHECK_AT and not dear) or (n > RECHECK_AT[-1] and n % RECHECK_EVERY == 0):
            self.pending = True
        if not self.pending:
            return False
        since = self.since
        if dear and since is not None and self.cost > RECHECK_SHARE * (self.clock() - since):
            return False
        self.pending = False
        return True

    def took(self, seconds: float) -> None:
        """A timing that took `seconds` just ended."""
        self.cost, self.since = seconds, self.clock()


@dataclass
class Fastest:
    """Per key, the least of every sample seen (seconds)."""

    seconds: dict = field(default_factory=dict)

    def add(self, key, seconds: float) -> float:
        """Record a sample; returns the key's least."""
        best = min(seconds, self.seconds.get(key, seconds))
        self.seconds[key] = best
        return best

    def merge(self, keys: Sequence, seconds: Sequence[float]) -> list[float]:
        """Record one sample per key; returns the keys' leasts, in order."""
        return [self.add(k, s) for k, s in zip(keys, seconds, strict=True)]


def prefer(current: int, seconds: Sequence[float], margin: float = SWITCH_MARGIN) -> int:
    """The option to use, given each option's time: the cheapest, unless the current one is within `margin`
    of it (hysteresis: noise between two equal options must not flip the choice back and forth)."""
    best = min(range(len(seconds)), key=seconds.__getitem__)
    return best if seconds[best] < (1 - margin) * seconds[current] else current


__all__ = [
    "RECHECK_AT",
    "RECHECK_EVERY",
    "RECHECK_FREE",
    "RECHECK_SHARE",
    "SWITCH_MARGIN",
    "Fastest",
    "Recheck",
    "prefer",
]
