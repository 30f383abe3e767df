"""`auto`: every step, choose which drafters contribute and how many nodes are verified, from measurements.

Members are ordinary drafters (default: `pld`, `suffix`, `recycle`, plus `draft` when a draft model is given
and `eagle` when a head exists for the model; a member that refuses the model at bind is left out). Each keeps
its own per-generation state inside auto's. A step (docs/methods.md, auto):

1. Run the members worth running, in the configured order (strongest first). A member runs when its lift, the
   factor by which running it raised a step's expected tokens per second over what the members before it
   offered (a moving average over the steps it ran), exceeds 1 + its drafting time / a plain step's; or when
   a probe is due: it has sat out long enough that running it costs at most `probe_overhead` of plain
   decoding's time (so a cheap member runs nearly always, a draft model every hundred steps or so).
2. Value every proposed node: the product, along its path, of the estimated chance that a child of that
   member, at that depth and sibling rank, is the next token given its parent was, times a calibration
   factor (`Acceptance.factor`). Point-mass trees are merged into one trie (a node several members propose
   takes the highest value; a child never outvalues its parent, so sorting by value lists parents first). A
   tree whose nodes carry q (`draft` under sampling) cannot share a trie: once drawn it is verified alone.
3. Verify the n most valuable nodes, n maximising expected emitted tokens per second (`plan`),

       (1 + sum of the n values) / (step overhead + cost(n + 1)),

   where cost is the target's forward time per tree size on the generation's runtime
   (`CostModel.for_runtime`, measured at the first generation, refined by every timed verification:
   `OnlineCost`), and the step overhead is what a step costs besides drafting and verification, measured
   separately for plain steps and steps with drafts. Drafting
   time is spent by then and does not count. n = 0 is plain decoding through the same engine. A tree is taken
   only when its rate beats plain decoding's by the bar (`Realized`: how much more steps with drafts fell
   short of their predicted rate, in wall time, than plain steps did).
4. Every member observes every verification, chosen or not (recycle's table, eagle's feature cache, the draft
   model's cache sync need each one); the estimates learn from each member's own tree against the emitted
   tokens (`trials`): at each depth the truth is known for, each child of the node on the true path is a
   trial of its cell.

What is learned across requests is kept per temperature (`Profile`: the shared counts, the members' lifts
and bench counts, the bar's sums, the usage). The timing it chooses by makes `auto` not bit-reproducible
under sampling with a seed; every emitted token still has exactly the target's distribution, since the
verifier is lossless for any tree, and greedy output is generate()'s whatever the choice.
`logging.getLogger("specdec.auto")` at DEBUG prints every step's choice; `report` gives the totals.

The parts, one module each: `config` (the options), `members` (construction, binding, benching: the member
lifecycle), `estimates` (step 2's acceptance estimates), `planner` (step 3, a pure function of the values and
the cost), `timing` (cost curves, step overheads, usage and the runtime choice, the realized bar), `state`
(what is kept per temperature, per generation and per step), `step` (a step's propose and observe, wiring
those) and `drafter` (the `Auto` drafter: the rest of the drafter protocol, around its steps).
"""

from specdec.drafters.auto.config import AutoConfig, member_options
from specdec.drafters.auto.drafter import Auto
from specdec.drafters.auto.estimates import (
    CALIBRATION_PRIOR,
    CALIBRATION_RANGE,
    DEPTHS,
    PRIOR_RATE,
    PRIOR_TRIALS,
    RANKS,
    Acceptance,
    node_values,
    trials,
)
from specdec.drafters.auto.members import GATE_EMA, LOG, RETRY_GENERATIONS, MemberTrack
from specdec.drafters.auto.planner import Offer, StepCost, Terms, Union, plan
from specdec.drafters.auto.state import AutoState, Choice, Profile, StepScratch, temperature_key
from specdec.drafters.auto.timing import (
    BAR_RANGE,
    REALIZED_DRIFT,
    REALIZED_IDLE,
    REALIZED_MEMORY,
    REALIZED_PRIOR,
    RUNTIME_MARGIN,
    SAMPLED_PRIOR,
    TIME_EMA,
    USAGE_EMA,
    USAGE_STEPS,
    Realized,
    Timing,
    Usage,
    fastest,
)

__all__ = [
    "BAR_RANGE",
    "CALIBRATION_PRIOR",
    "CALIBRATION_RANGE",
    "DEPTHS",
    "GATE_EMA",
    "LOG",
    "PRIOR_RATE",
    "PRIOR_TRIALS",
    "RANKS",
    "REALIZED_DRIFT",
    "REALIZED_IDLE",
    "REALIZED_MEMORY",
    "REALIZED_PRIOR",
    "RETRY_GENERATIONS",
    "RUNTIME_MARGIN",
    "SAMPLED_PRIOR",
    "TIME_EMA",
    "USAGE_EMA",
    "USAGE_STEPS",
    "Acceptance",
    "Auto",
    "AutoConfig",
    "AutoState",
    "Choice",
    "MemberTrack",
    "Offer",
    "Profile",
    "Realized",
    "StepCost",
    "StepScratch",
    "Terms",
    "Timing",
    "Union",
    "Usage",
    "fastest",
    "member_options",
    "node_values",
    "plan",
    "temperature_key",
    "trials",
]
