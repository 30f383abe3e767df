"""Choices made by timing, kept honest over a process's life.

A CPU's speed swings from minute to minute (other processes, frequency scaling, a laptop's power state), so
one timing sample at load can be off by a factor of two or more. Every timing-based choice in specdec (the
target runtime for a drafting method, the forward-cost curve that sizes trees) therefore

- is taken again on a back-off schedule of generations (`Recheck`), so that its cost amortises to nothing
  while a burst of noise at load is overruled within a few requests;
- keeps, per option and size, the least time ever measured (`Fastest`): other load only ever slows a
  forward, so the minimum over samples converges on the machine's real speed whatever the noise;
- switches only when another option is cheaper by a margin (`prefer`), so that two options of about the same
  speed do not flip-flop from one re-check to the next.

What may still vary between runs is said in docs/runtime.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# generations after which a timing is taken again (then every RECHECK_EVERY): the early ones overrule a noisy
# start within the first requests (and within `specdec bench`'s warm-up, one generation per task), the later
# ones a burst that lasted through all of those
RECHECK_AT = (1, 2, 3)
RECHECK_EVERY = 128
# another option must be this much cheaper than the current one to replace it
SWITCH_MARGIN = 0.1


@dataclass
class Recheck:
    """Counts generations and says when a timing is due again (`RECHECK_AT`, then every `RECHECK_EVERY`)."""

    generations: int = 0

    def tick(self) -> bool:
        """One more generation starts: True when the timing should be taken again before it."""
        self.generations += 1
        n = self.generations - 1  # generations finished before this one
        return n in RECHECK_AT or (n > RECHECK_AT[-1] and n % RECHECK_EVERY == 0)


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


__all__ = ["RECHECK_AT", "RECHECK_EVERY", "SWITCH_MARGIN", "Fastest", "Recheck", "prefer"]
