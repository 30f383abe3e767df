"""What auto's steps cost and how they went, in wall time: the forward per tree size and the step overhead
per target runtime (`Timing`), how the generations at a temperature used the runtime (`Usage`, which picks
the next request's runtime: `fastest`), and predicted against realized tokens per second (`Realized`, whose
`bar` a tree must clear). The measuring itself is the drafter's (its clock) and the engine's (the verify
time it hands over in `Scored.verify_seconds`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from specdec.costmodel import CostModel, OnlineCost
from specdec.runtime import RuntimeChoice

TIME_EMA = 0.1  # weight of the newest step in measured times
USAGE_EMA = 0.3  # weight of the newest generation in `Usage` (a full one: shorter ones weigh less)
USAGE_STEPS = 32  # steps a generation needs to count fully in `Usage`, and that `Usage` needs to be used
# another runtime must promise steps this much cheaper than the engine's default to be taken: the estimate
# holds auto's behaviour fixed, but on a runtime with dearer trees auto verifies smaller ones (fewer tokens a
# step), and llama.cpp's attention grows dearer with the context than the curve's (switching at no margin cost
# auto on completion and long prompts: docs/methods.md, auto)
RUNTIME_MARGIN = 0.15
REALIZED_MEMORY = 0.97  # discount per step of `Realized`'s sums: about the last 30 steps of each kind
REALIZED_PRIOR = 4.0  # steps' worth of "as predicted" behind `Realized`'s sums
# a kind of step (plain, drafted) not seen for REALIZED_IDLE steps of the other has its realized sums moved
# back to "as predicted" by REALIZED_DRIFT per further step: a kind that stopped being chosen (drafted steps,
# after a burst of load made them look slow) gets no new evidence, so its shortfall, and with it the bar, would
# otherwise hold for the process's life
REALIZED_IDLE = 32
REALIZED_DRIFT = 0.02
BAR_RANGE = (0.8, 3.0)  # `Realized.bar`'s bounds


@dataclass
class Timing:
    """What a step costs on one target runtime: the forward per tree size, and a step's time besides drafting
    and verification (the engine's bookkeeping, the members' observe, choosing), apart for plain steps and
    steps with drafts (learning from a tree, sampling along a path: a tree must pay for that too)."""

    cost: OnlineCost
    overhead: float = 0.0  # plain steps (moving average)
    tree_overhead: float = 0.0  # steps with drafts

    def plain_seconds(self) -> float:
        """A plain step's time: what running a member is weighed against."""
        return self.overhead + self.cost.one

    def learn_overhead(self, drafted: bool, sample: float) -> None:
        """One step's time besides drafting and verification."""
        if drafted:
            self.tree_overhead += TIME_EMA * (sample - self.tree_overhead)
        else:
            self.overhead += TIME_EMA * (sample - self.overhead)


def measured(model, runtime: RuntimeChoice, fixed: CostModel | None) -> Timing:
    """A runtime's timing: its forward cost per tree size measured now
    (`CostModel.for_runtime`) and refined by every timed verification; or `fixed` (`AutoConfig.cost`), neither
    measured nor refined."""
    return Timing(OnlineCost(fixed, rate=0.0) if fixed else OnlineCost(CostModel.for_runtime(model, runtime)))


def remeasure(timings: dict[str, Timing], model, runtimes: dict[str, RuntimeChoice]) -> None:
    """Every runtime's cost curve measured again, each size keeping its least time so far
    (`CostModel.recheck`); the online refinements start over from it."""
    for name, timing in timings.items():
        timing.cost = OnlineCost(CostModel.recheck(model, runtimes[name]))


@dataclass
class Usage:
    """How auto's generations at one temperature went, for choosing the runtime of the next: the share of
    plain steps and the mean verified tree when drafting (moving averages over generations)."""

    plain_share: float
    tree_nodes: float  # drafted nodes + the root, over drafted steps
    steps: int  # steps behind it

    def step_seconds(self, timing: Timing) -> float:
        """Expected time of a step on a runtime, at this usage. From the measured curves, not the refined
        ones: every runtime's was measured alike (same context, same moment), while a refined curve follows
        the contexts its runtime happened to serve (llama.cpp's after long prompts looked dearer than
        native's after short ones, and auto moved plain decoding onto the slower forward)."""
        cost = timing.cost.base
        drafted = timing.tree_overhead + cost(self.tree_nodes)
        plain = timing.overhead + cost(1)
        return self.plain_share * plain + (1 - self.plain_share) * drafted


# the usage a sampling temperature starts from, before its own: plain decoding. Under sampling the copy
# members' trees seldom pay (auto decoded plainly at T = 0.7 and 1.0 on every bench task), so the first
# generation runs where plain steps are cheapest instead of spending ~USAGE_STEPS steps on the default's dearer
# forward; its plans for the default runtime (`AutoState.default`) are the usage that corrects the prior
SAMPLED_PRIOR = Usage(plain_share=1.0, tree_nodes=1.0, steps=0)


def record_usage(usage: Usage | None, steps: int, plain: int, verified: int) -> Usage:
    """`usage` (None: none yet) moved by a finished generation of `steps` steps (> 0), `plain` of them plain,
    that verified `verified` drafted nodes: a short generation moves the averages less."""
    drafted = steps - plain
    share = plain / steps
    nodes = 1 + verified / drafted if drafted else 1.0
    if usage is None:
        return Usage(share, nodes, steps)
    weight = USAGE_EMA * min(1.0, steps / USAGE_STEPS)
    usage.plain_share += weight * (share - usage.plain_share)
    if drafted:
        usage.tree_nodes += weight * (nodes - usage.tree_nodes)
    usage.steps += steps
    return usage


def usage_to_choose_by(usage: Usage | None, greedy: bool) -> Usage | None:
    """The usage a request's runtime is chosen by: its temperature's once it rests on USAGE_STEPS steps;
    before, none for greedy decoding (the default runtime) and `SAMPLED_PRIOR` under sampling."""
    if usage is None or usage.steps < USAGE_STEPS:
        return None if greedy else SAMPLED_PRIOR
    return usage


def fastest(usage: Usage, timings: list[Timing]) -> int:
    """Index of the runtime (the engine's default first) whose expected step time at `usage` is the least, if
    it beats the default's by RUNTIME_MARGIN; else 0."""
    # a runtime no generation ran on yet has no measured step overhead (engine bookkeeping and sampling,
    # about the same on every runtime): it takes one that has, else the comparison favours it by that much
    ran = next((t for t in timings if t.overhead), None)
    if ran is not None:
        timings = [
            t if t.overhead else replace(t, overhead=ran.overhead, tree_overhead=ran.tree_overhead)
            for t in timings
        ]
    times = [usage.step_seconds(t) for t in timings]
    best = min(range(len(timings)), key=times.__getitem__)
    return best if times[best] < (1 - RUNTIME_MARGIN) * times[0] else 0


@dataclass
class Realized:
    """Predicted against realized tokens per second, apart for steps with drafts and plain steps (discounted
    sums over recent steps at one temperature, carried across requests), and the bar they set.

    The plan's rates leave out what it cannot see coming: the members' drafting time (spent before the plan),
    a forward slower than its curve at this context, a tree's sampling walk. Whatever it is, it shows in the
    step's wall time. If steps with drafts fall short of their predicted rate by more than plain steps fall
    short of theirs, a tree must promise that much more than plain decoding before it is taken (`bar`), so
    drafting that does not pay in wall time stops; if they do better than predicted, the bar drops below 1.
    Both kinds are compared, not drafted steps against a fixed plain rate, so a machine or context that slows
    every forward alike leaves the bar at 1."""

    # per kind (0: plain, 1: drafted): discounted predicted tokens, predicted seconds, tokens, seconds
    sums: list[list[float]] = field(default_factory=lambda: [[0.0] * 4, [0.0] * 4])
    idle: list[int] = field(default_factory=lambda: [0, 0])  # per kind: steps of the other since its last

    def record(
        self, drafted: bool, tokens_expected: float, seconds_expected: float, tokens: int, seconds: float
    ) -> None:
        sums = self.sums[drafted]
        if not sums[1]:  # a prior of REALIZED_PRIOR steps that went as predicted
            sums[:] = [REALIZED_PRIOR * tokens_expected, REALIZED_PRIOR * seconds_expected] * 2
        m = REALIZED_MEMORY
        sums[0] = m * sums[0] + tokens_expected
        sums[1] = m * sums[1] + seconds_expected
        sums[2] = m * sums[2] + tokens
        sums[3] = m * sums[3] + seconds
        self.idle[drafted], self.idle[not drafted] = 0, self.idle[not drafted] + 1
        if self.idle[not drafted] > REALIZED_IDLE:
            other = self.sums[not drafted]
            other[2] += REALIZED_DRIFT * (other[0] - other[2])
            other[3] += REALIZED_DRIFT * (other[1] - other[3])

    def shortfall(self, drafted: bool) -> float:
        """Predicted over realized tokens per second (1: as predicted)."""
        pt, ps, t, s = self.sums[drafted]
        return (pt / ps) / (t / s) if ps and t else 1.0

    @property
    def bar(self) -> float:
        low, high = BAR_RANGE
        return min(high, max(low, self.shortfall(True) / self.shortfall(False)))
