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

   where cost is the target's forward time per tree size (`CostModel.for_model`, measured at the first
   generation, refined by every timed verification: `OnlineCost`), and the step overhead is what a step costs
   besides drafting and verification, measured separately for plain steps and steps with drafts. Drafting
   time is spent by then and does not count. n = 0 is plain decoding through the same engine. A tree is taken
   only when its rate beats plain decoding's by the bar (`Realized`: how much more steps with drafts fell
   short of their predicted rate, in wall time, than plain steps did).
4. Every member observes every verification, chosen or not (recycle's table, eagle's feature cache, the draft
   model's cache sync need each one); the estimates learn from each member's own tree against the emitted
   tokens (`would_accept`'s walk): at each depth the truth is known for, each child of the node on the true
   path is a trial of its cell.

The estimates are discounted counts per (member, whether its last first token was right, depth, rank):
acceptance comes in runs (a copied block, then new text), and this generation's counts (`memory`) start from
the drafter's shared ones (`shared_memory`, carried across requests on purpose, one set per temperature, at
most `warm_weight` pseudo-trials per cell). The timing it chooses by makes `auto` not bit-reproducible under
sampling with a seed; every emitted token still has exactly the target's distribution, since the verifier is
lossless for any tree, and greedy output is generate()'s whatever the choice.
`logging.getLogger("specdec.auto")` at DEBUG prints every step's choice; `report` gives the totals.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from specdec.costmodel import CostModel, OnlineCost
from specdec.drafters.base import REGISTRY, Drafter, Request, Scored, register
from specdec.errors import InputError
from specdec.timing import Recheck
from specdec.tree import DraftTree, Trie

LOG = logging.getLogger("specdec.auto")

DEPTHS = 16  # depths estimated separately (deeper nodes share the last cell)
RANKS = 8  # sibling ranks estimated separately (later siblings share the last cell)
PRIOR_TRIALS = 2.0  # pseudo-trials behind a cell's prior (see `Acceptance.table`)
PRIOR_RATE = 0.3  # the prior of the root's first child when nothing was learned; a later sibling r: / (r + 1)
GATE_EMA = 0.2  # weight of the newest step in a member's lift
TIME_EMA = 0.1  # weight of the newest step in measured times
USAGE_EMA = 0.3  # weight of the newest generation in `Usage` (a full one: shorter ones weigh less)
USAGE_STEPS = 32  # steps a generation needs to count fully in `Usage`, and that `Usage` needs to be used
# another runtime must promise steps this much cheaper than the engine's default to be taken: the estimate
# holds auto's behaviour fixed, but on a runtime with dearer trees auto verifies smaller ones (fewer tokens a
# step), and llama.cpp's attention grows dearer with the context than the curve's (greedy bench: switching at
# no margin cost auto 14% on completion and long prompts)
RUNTIME_MARGIN = 0.15
RETRY_GENERATIONS = 8  # a member benched for not paying its keep is tried again after this many generations
CALIBRATION_PRIOR = 16.0  # pseudo-tokens behind a calibration factor of 1 (see `Acceptance.factor`)
CALIBRATION_RANGE = (0.25, 2.0)  # the factor's bounds
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
class AutoConfig:
    # candidate members: registered names (comma-separated or a list) or Drafter objects; one needing a draft
    # model joins only when one is given, one refusing the model at bind (InputError) is left out
    # they run in this order, each judged by what it adds to the ones before it: the strongest retrieval member
    # first (suffix finds every match pld does, and more: it was ahead of pld on every bench task), then the
    # cheaper ones as add-ons, then the model drafters, which cost a forward per token
    members: str | list = "suffix,pld,recycle,draft,eagle"
    max_nodes: int = 32  # most drafted nodes verified in one step (the cost model usually picks fewer)
    # nodes each retrieval member offers: more than their own defaults (auto cuts), fewer than max_nodes (the
    # steps here verified 9 nodes on average, and valuing and merging a node costs Python time every step)
    member_nodes: int = 16
    max_depth: int = 8  # deepest node a member is asked for
    head: Any = None  # the eagle member's head (directory or Eagle3Head); None: the shipped target's, if any
    memory: float = 0.95  # discount per trial of this generation's counts: about the last 20 trials per cell
    shared_memory: float = 0.99  # the same for the counts carried across requests
    warm_weight: float = 8.0  # most pseudo-trials per cell a generation starts with from the shared counts
    probe_overhead: float = 0.002  # share of plain decoding's time a member not worth running may still cost
    # a fixed forward cost per tree size for every runtime (no measuring, no online refinement): for tests, or
    # where measuring at the first generation is unwanted; None: measured per runtime (the default)
    cost: Any = None

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_depth", "member_nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")
        for name in ("memory", "shared_memory", "probe_overhead"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.warm_weight < 0:
            raise ValueError("warm_weight must be >= 0")


def member_options(name: str, config: AutoConfig) -> dict:
    """Members offer more nodes than their fixed budgets: auto picks how many are verified."""
    if name in ("pld", "suffix", "recycle"):
        return {"max_nodes": max(1, config.member_nodes)} | ({"max_candidates": 4} if name == "pld" else {})
    if name == "eagle":
        return {"head": config.head}
    return {}


class Acceptance:
    """Discounted counts per (cells, depth, sibling rank) of how often a drafted node was the next token when
    its parent was, and the rates they give (`table`). Member i has cells 2i and 2i + 1 (`MemberTrack.streak`).
    The drafter's shared sets also keep the calibration `factor`."""

    def __init__(self, members: int) -> None:
        self.hits = [[[0.0] * RANKS for _ in range(DEPTHS)] for _ in range(members)]
        self.trials = [[[0.0] * RANKS for _ in range(DEPTHS)] for _ in range(members)]
        self.tables: list[list[list[float]] | None] = [None] * members  # cached rates, dropped on `record`
        # discounted sums over steps (plain ones only discount): the chosen trees' accepted drafts, and what
        # the cell rates expected of them before calibration
        self.accepted = 0.0
        self.expected = 0.0

    @property
    def factor(self) -> float:
        """accepted / expected, with CALIBRATION_PRIOR pseudo-tokens at 1: each cell's rate is right on average,
        but the trees that get verified are picked for their high values and a node two members propose takes
        the higher one, so the sums that decide come out optimistic (by about 1.4x at T = 1 on the shipped
        model). Every value is multiplied by this."""
        low, high = CALIBRATION_RANGE
        return min(high, max(low, (self.accepted + CALIBRATION_PRIOR) / (self.expected + CALIBRATION_PRIOR)))

    def calibrate(self, expected: float, accepted: int, memory: float) -> None:
        self.expected = memory * self.expected + expected
        self.accepted = memory * self.accepted + accepted

    def table(self, member: int, depth: int = DEPTHS) -> list[list[float]]:
        """rates[d][rank] for d < depth at least (d = 0: the root's children). A cell's rate is its hits over
        its trials with PRIOR_TRIALS pseudo-trials at the rate of the same rank one level up (at depth 0:
        PRIOR_RATE / (rank + 1)): a deep cell seldom reached borrows what its member does one level up, which
        tells more than a fixed guess (copying continues once it started; at a high temperature little is
        accepted at any depth). Rows are computed as far down as asked, and kept until the next `record`."""
        rates = self.tables[member]
        if rates is None:
            rates = self.tables[member] = []
        while len(rates) < min(depth, DEPTHS):
            above = rates[-1] if rates else [PRIOR_RATE / (r + 1) for r in range(RANKS)]
            hits, trials = self.hits[member][len(rates)], self.trials[member][len(rates)]
            rates.append(
                [
                    (h + PRIOR_TRIALS * a) / (t + PRIOR_TRIALS)
                    for h, t, a in zip(hits, trials, above, strict=True)
                ]
            )
        return rates

    def record(self, member: int, depth: int, rank: int, hit: bool, memory: float) -> None:
        d, r = min(depth, DEPTHS - 1), min(rank, RANKS - 1)
        hits, trials = self.hits[member][d], self.trials[member][d]
        hits[r] = memory * hits[r] + float(hit)
        trials[r] = memory * trials[r] + 1.0
        self.tables[member] = None

    def warm_copy(self, weight: float) -> Acceptance:
        """The same counts, each cell carrying at most `weight` trials (a new generation's start)."""
        new = Acceptance(len(self.hits))
        for m, (hits, trials) in enumerate(zip(self.hits, self.trials, strict=True)):
            for d, (hr, tr) in enumerate(zip(hits, trials, strict=True)):
                for r, (h, t) in enumerate(zip(hr, tr, strict=True)):
                    if t > 0:
                        scale = min(1.0, weight / t)
                        new.hits[m][d][r], new.trials[m][d][r] = h * scale, t * scale
        return new


def node_values(tree: DraftTree, member: int, acceptance: Acceptance) -> list[float]:
    """Per node: the estimated chance that it is accepted (product of its path's cell rates); root 1."""
    values = [1.0] * len(tree)
    rates = acceptance.table(member, tree.depth)
    for parent, children in enumerate(tree.children):
        if not children:
            continue
        row = rates[min(tree.depths[parent], DEPTHS - 1)]
        for rank, child in enumerate(children):
            values[child] = values[parent] * row[min(rank, RANKS - 1)]
    return values


def plan(
    values: list[float],
    cost,
    overhead: float,
    tree_overhead: float | None = None,
    bar: float = 1.0,
    base: float = 0.0,
) -> tuple[int, float, float]:
    """The choice rule. `values` are node values in descending order (a prefix is always a tree); returns
    (n, expected accepted drafts, expected tokens per second) for the best n, n = 0 being plain decoding. A
    tree is taken only when its rate exceeds `bar` times plain decoding's (`Realized.bar`). `base`: tokens the
    same forward gives besides this tree's (a batch's other rows, `specdec.batch.RowBudget`): the rate is the
    step's, so a node must pay for slowing theirs too."""
    tree_overhead = overhead if tree_overhead is None else tree_overhead
    plain = (1.0 + base) / (overhead + cost(1))
    best, best_gain, best_rate = 0, 0.0, bar * plain
    gain = 0.0
    for n, value in enumerate(values, start=1):
        gain += value
        rate = (1.0 + base + gain) / (tree_overhead + cost(n + 1))
        if rate > best_rate:
            best, best_gain, best_rate = n, gain, rate
    return best, best_gain, best_rate if best else plain


class Union:
    """Point-mass trees merged into one trie as members propose; per merged node its value (the highest any
    member gives it) and the members proposing it."""

    def __init__(self, root: int) -> None:
        self.trie = Trie(root)
        self.values, self.owners = [1.0], [0]  # owners: bit m set when member m proposed the node

    def add(self, member: int, tree: DraftTree, values: list[float]) -> None:
        node_map = [0]
        for i in range(1, len(tree)):
            node = self.trie.child(node_map[tree.parents[i]], tree.tokens[i])
            assert node is not None  # the trie has no budget
            node_map.append(node)
            if node == len(self.values):
                self.values.append(values[i])
                self.owners.append(1 << member)
            else:
                self.values[node] = max(self.values[node], values[i])
                self.owners[node] |= 1 << member

    def order(self, cap: int) -> list[int]:
        """The `cap` most valuable drafted nodes, best first (ties: shallower first, so parents come first)."""
        parents, depth = self.trie.parents, [0] * len(self.values)
        for i in range(1, len(depth)):
            depth[i] = depth[parents[i]] + 1
        values = self.values
        return sorted(range(1, len(values)), key=lambda i: (-values[i], depth[i], i))[:cap]

    def plan(
        self, cap: int, cost, overhead: float, tree_overhead: float, bar: float = 1.0, base: float = 0.0
    ) -> tuple[list[int], float]:
        """(the nodes to verify, expected tokens per second)."""
        order = self.order(cap)
        n, _, rate = plan([self.values[i] for i in order], cost, overhead, tree_overhead, bar, base)
        return order[:n], rate


class StepCost:
    """cost(k) for integer k, each computed once per step (plans ask for the same sizes again and again)."""

    def __init__(self, cost: OnlineCost) -> None:
        self.cost, self.known = cost, [0.0]

    def __call__(self, k: int) -> float:
        known = self.known
        while len(known) <= k:
            known.append(self.cost(len(known)))
        return known[k]


@dataclass
class Choice:
    """One step's decision."""

    tree: DraftTree  # to verify
    members: list[int]  # those that contributed a node to it
    expected: float  # accepted drafts expected from it (calibrated)


@dataclass
class MemberTrack:
    """One member within one generation."""

    state: Any  # the member's own per-generation state
    # moving average of the factor by which running it raised the step's expected tokens per second, over the
    # other members' trees it was run after (1: no help; None: not measured yet)
    lift: float | None
    tree: DraftTree | None = None  # this step's proposal (None: it did not run)
    values: list[float] = field(default_factory=list)
    cell: int = 0  # the cells (see `Acceptance`) its proposal this step was valued with
    idle: int = 1 << 30  # steps since it last ran
    active: bool = True  # False: benched for this generation (not run, not observing; its state released)
    # 1 when the first token of its last proposal was right: acceptance comes in runs (a copied block), so each
    # member has two sets of cells, one for each case
    streak: int = 0
    ran: int = 0  # steps it ran in
    chosen: int = 0  # steps in which the verified tree held one of its nodes


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


@dataclass
class AutoState:
    members: list[MemberTrack]
    acceptance: Acceptance  # this generation's estimates, warm-started from the drafter's
    shared: Acceptance  # the drafter's, for this generation's temperature
    key: float  # that temperature (tenths; greedy 0)
    timing: Timing  # of the runtime this generation runs on
    realized: Realized  # the drafter's, for this generation's temperature
    # the engine's default runtime's timing when this generation runs on another (None: it runs on the
    # default): each step also plans for it, and those plans are the usage this generation reports
    default: Timing | None
    # a batch row's view of the shared step (`Request.batch`): trees are sized for the whole step's tokens per
    # second, on the batch's cost; None: decoded alone
    batch: Any = None
    # the per-step choice goes to the debug log: asked once per generation (a step should touch no more code
    # than it needs: after a forward the interpreter's caches are cold and every call costs microseconds)
    debug: bool = False
    default_plain: int = 0  # steps whose plan for the default runtime verified the root alone
    default_nodes: int = 0  # drafted nodes those plans verified
    there: int = 0  # this step's plan for the default runtime: drafted nodes
    steps: int = 0
    plain: int = 0  # steps that verified the root alone
    expected: float = 0.0  # accepted drafts the chosen trees were expected to give, summed (calibration)
    accepted: int = 0  # accepted drafts, summed
    raw: float = 0.0  # the last choice's expected accepted drafts before calibration
    nodes: int = 0  # drafted nodes verified, over all steps
    step_start: float | None = None  # when the last propose began
    drafting: float = 0.0  # members' propose time in the last step
    proposed: float = 0.0  # when the last propose ended (verification starts)
    verify: float = 0.0  # the last verification's time
    drafted: bool = False  # the last step verified drafts
    promised: tuple[float, float] = (0.0, 0.0)  # the last choice's predicted (tokens, seconds) (`Realized`)
    emitted: int = 0  # tokens the last verification emitted
    cost_error: float = 0.0  # sum over steps of |measured - predicted| / predicted verification time
    timed: int = 0


@register
class Auto(Drafter):
    name = "auto"
    needs_hidden_states = True  # when a member reads them (eagle); `hidden_layers` is empty otherwise: free
    hidden_states_optional = True  # on a runtime without them (llamacpp) those members are left out
    uses_head = True  # --draft HEAD_DIR: its eagle member drafts with that head
    chooses_runtime = True  # per request: llamacpp where it mostly decodes plainly (`choose_runtime`)
    sizes_batch_trees = True  # a batch row's tree is sized for the whole step (`Request.batch`)

    def __init__(self, config: AutoConfig | None = None, draft_model=None, **options) -> None:
        self.config = cfg = config or AutoConfig(**options)
        names = cfg.members.split(",") if isinstance(cfg.members, str) else list(cfg.members)
        self.candidates: list[Drafter] = []
        for m in names:
            if isinstance(m, Drafter):
                drafter = m
            else:
                cls = REGISTRY.get(str(m).strip())
                if cls is None or cls is Auto:
                    raise ValueError(f"unknown member {m!r}")
                if cls.needs_draft_model and draft_model is None:
                    continue  # no draft model given: not a candidate
                drafter = cls.create(draft_model=draft_model, **member_options(cls.name, cfg))
            # A member must cope with observing trees that are not its own (merged, cut, or another's): point
            # masses that learn from any tree, a draft model (it syncs on the emitted tokens), or a head that
            # reads the accepted path's hidden states. `lookahead` needs its own window verified whole.
            if not (drafter.mergeable or drafter.samples_drafts or drafter.needs_hidden_states):
                raise ValueError(f"member {drafter.name!r} cannot observe trees other than its own")
            self.candidates.append(drafter)
        self.members: list[Drafter] = []
        self.left_out: dict[str, str] = {}  # member -> why it refused the model
        self.model = None  # the target, once bound
        self.timings: dict[str, Timing] = {}  # per target runtime (name), measured at its first generation
        self.usage: dict[float, Usage] = {}  # per temperature as `shared`
        # counts carried across requests, one set per temperature (tenths; greedy 0): what is accepted at T = 1
        # says little about T = 0
        self.shared: dict[float, Acceptance] = {}
        self.seconds: list[float] = []  # per member: moving average of its propose time (the machine's)
        # per temperature as `shared`, per member: the lift a generation starts from (None: never ran)
        self.lifts: dict[float, list[float | None]] = {}
        self.keep: list[float] = []  # per member: moving average of its observe time, paid every step
        self.benched: dict[float, list[int]] = {}  # per temperature, per member: generations since tried
        self.realized: dict[float, Realized] = {}  # per temperature as `shared`
        self.default_runtime: str | None = None  # the engine's default runtime, once it offered a choice
        self.runtimes: dict[str, Any] = {}  # name -> its `RuntimeChoice`, as `timings`
        # when the cost curves are measured again (`_remeasure`): a burst of load at the first measurement
        # must not shape every tree for the process's life
        self.recheck = Recheck()

    @classmethod
    def create(cls, draft_model=None, **options) -> Auto:
        return cls(draft_model=draft_model, **options)

    def bind(self, model) -> None:
        from specdec.runtime import runtime_for

        self.members, self.left_out = [], {}
        runtime = runtime_for(model)
        for m in self.candidates:
            try:
                if m.needs_hidden_states and not runtime.hidden_states:
                    raise InputError(f"the {runtime.name} runtime returns no hidden states")
                m.bind(model)
            except InputError as e:
                self.left_out[m.name] = str(e)
                LOG.info("auto: %s left out: %s", m.name, e)
                continue
            self.members.append(m)
        self.model = model
        self.timings = {}  # each measured at the first start on it, once the engine checked the model
        self.runtimes, self.recheck = {}, Recheck()
        self.usage = {}
        self.shared = {}
        self.seconds = [0.0] * len(self.members)
        self.lifts, self.benched, self.realized = {}, {}, {}
        self.keep = [0.0] * len(self.members)

    def hidden_layers(self) -> tuple[int, ...]:
        layers = {i for m in self.members if m.needs_hidden_states for i in m.hidden_layers()}
        return tuple(sorted(layers))

    def _timing(self, runtime) -> Timing:
        """The timing of a runtime (a `RuntimeChoice`; None: the one the model was last given)."""
        from specdec.runtime import runtime_for

        runtime = runtime or runtime_for(self.model)
        if runtime.name not in self.timings:
            self.runtimes[runtime.name] = runtime
            fixed = self.config.cost
            cost = (
                OnlineCost(fixed, rate=0.0)
                if fixed
                else OnlineCost(CostModel.for_runtime(self.model, runtime))
            )
            self.timings[runtime.name] = Timing(cost)
        return self.timings[runtime.name]

    def choose_runtime(self, params, runtimes: list) -> int:
        """Index of the runtime (`RuntimeChoice`s, the engine's default first) whose expected step time is the
        least at the usage auto has for the default runtime at this temperature: measured on it, or, in
        generations elsewhere, what its plan would have verified there (`AutoState.default`). (The usage on
        another runtime would feed back: on llama.cpp, where trees cost more, auto drafts less, and that usage
        then argues for llama.cpp.) Until the usage rests on USAGE_STEPS steps, greedy decoding runs on the
        default and sampling goes by `SAMPLED_PRIOR`. A runtime without hidden states takes no member that reads
        them."""
        # every runtime's cost curve is measured at the first generation, whichever runs it: measuring one later
        # (~0.1 s) would land in the first request that switches to it
        timings = [self._timing(r) for r in runtimes]
        self.default_runtime = runtimes[0].name
        usage = self.usage.get(0.0 if params.greedy else round(float(params.temperature), 1))
        if usage is None or usage.steps < USAGE_STEPS:
            usage = None if params.greedy else SAMPLED_PRIOR
        if usage is None or len(runtimes) < 2:
            return 0
        # a runtime no generation ran on yet has no measured step overhead (engine bookkeeping and sampling,
        # about the same on every runtime): it takes one that has, else the comparison favours it by that much
        ran = next((t for t in timings if t.overhead), None)
        if ran is not None:
            timings = [
                t if t.overhead else replace(t, overhead=ran.overhead, tree_overhead=ran.tree_overhead)
                for t in timings
            ]
        times = [usage.step_seconds(t) for t in timings]
        best = min(range(len(runtimes)), key=times.__getitem__)
        return best if times[best] < (1 - RUNTIME_MARGIN) * times[0] else 0

    def _remeasure(self) -> None:
        """Every runtime's cost curve measured again, each size keeping its least time so far
        (`CostModel.recheck`); the online refinements start over from it."""
        for name, timing in self.timings.items():
            timing.cost = OnlineCost(CostModel.recheck(self.model, self.runtimes[name]))

    def start(self, request: Request) -> AutoState:
        if self.recheck.tick() and self.config.cost is None:
            self._remeasure()
        timing = self._timing(request.runtime)
        no_hidden = request.runtime is not None and not request.runtime.hidden_states
        params = request.params
        key = 0.0 if params.greedy else round(float(params.temperature), 1)
        shared = self.shared.setdefault(key, Acceptance(2 * len(self.members)))
        lifts = self.lifts.setdefault(key, [None] * len(self.members))
        benched = self.benched.setdefault(key, [0] * len(self.members))
        tracks = []
        for i, (m, lift) in enumerate(zip(self.members, lifts, strict=True)):
            if no_hidden and m.needs_hidden_states:  # this generation's runtime returns none: sits out
                tracks.append(MemberTrack(None, lift, active=False))
                continue
            trial = lift is None or benched[i] >= RETRY_GENERATIONS
            active = trial or self.pays_its_keep(i, lift, timing)
            benched[i] = 0 if active else benched[i] + 1
            # a member measured before waits for its next probe; a new one (or one on trial) is tried at once
            idle = 1 << 30 if trial else 0
            tracks.append(MemberTrack(m.start(request) if active else None, lift, idle=idle, active=active))
        realized = self.realized.setdefault(key, Realized())
        runtime, default = request.runtime, None
        if runtime is not None and self.default_runtime not in (None, runtime.name):
            default = self.timings[self.default_runtime]
        return AutoState(
            tracks,
            shared.warm_copy(self.config.warm_weight),
            shared,
            key,
            timing,
            realized,
            default,
            request.batch,
            LOG.isEnabledFor(logging.DEBUG),
        )

    def prefilled(self, state: AutoState, hidden) -> None:
        for m, track in zip(self.members, state.members, strict=True):
            if track.active:
                m.prefilled(track.state, hidden)

    def release(self, state: AutoState) -> None:
        if state.steps:
            plain, verified = (
                (state.plain, state.nodes)
                if state.default is None
                else (state.default_plain, state.default_nodes)
            )
            drafted = state.steps - plain
            share = plain / state.steps
            nodes = 1 + verified / drafted if drafted else 1.0
            usage = self.usage.get(state.key)
            if usage is None:
                self.usage[state.key] = Usage(share, nodes, state.steps)
            else:  # a short generation moves the averages less
                weight = USAGE_EMA * min(1.0, state.steps / USAGE_STEPS)
                usage.plain_share += weight * (share - usage.plain_share)
                if drafted:
                    usage.tree_nodes += weight * (nodes - usage.tree_nodes)
                usage.steps += state.steps
        lifts = self.lifts[state.key]
        self.lifts[state.key] = [
            t.lift if t.ran else lift for t, lift in zip(state.members, lifts, strict=True)
        ]
        for m, track in zip(self.members, state.members, strict=True):
            if track.active:
                m.release(track.state)

    def pays_its_keep(self, i: int, lift: float | None, timing: Timing) -> bool:
        """A member whose observing costs more per step than a probe may (eagle's head runs over every
        verified token; recycle writes rows) stays only while running it pays for its drafting and its
        observing; the others stay anyway (they cost nothing while they sit out)."""
        plain = timing.plain_seconds()
        if self.keep[i] <= self.config.probe_overhead * plain:
            return True
        return lift is None or lift > 1.0 + (self.seconds[i] + self.keep[i]) / plain

    def _bench(self, state: AutoState, i: int) -> None:
        """Out for the rest of the generation: not run, not observing (so not drafting stale), state freed."""
        track = state.members[i]
        track.active = False
        self.members[i].release(track.state)
        LOG.debug("step %d: %s benched for this generation", state.steps + 1, self.members[i].name)

    # -- choosing ------------------------------------------------------------------------------------------

    def probe_due(self, state: AutoState, i: int, plain: float | None = None) -> bool:
        """Running member i now costs at most `probe_overhead` of plain decoding's time, spread over the steps
        since it last ran. `plain`: a plain step's seconds, when the caller has them."""
        plain = state.timing.plain_seconds() if plain is None else plain
        interval = self.seconds[i] / (self.config.probe_overhead * plain)
        return state.members[i].idle + 1 >= interval

    def should_run(self, state: AutoState, i: int, plain: float | None = None) -> bool:
        """The gate of step 1: a probe is due, or running member i is expected to raise the step's tokens per
        second by more than its drafting time adds to the step (its lift exceeds 1 + seconds / step)."""
        plain = state.timing.plain_seconds() if plain is None else plain
        lift = state.members[i].lift
        worth = lift is not None and lift > 1.0 + self.seconds[i] / plain
        return worth or self.probe_due(state, i, plain)

    def propose(self, state: AutoState, context: list[int], max_depth: int) -> DraftTree:
        now = time.perf_counter()
        self._time_overhead(state, now)
        state.step_start, state.drafting = now, 0.0
        root = context[-1]
        depth = min(max_depth, self.config.max_depth)
        if depth >= 1 and self.config.max_nodes > 0 and self.members:
            choice = self._choose(state, context, depth)
        else:
            choice = Choice(DraftTree.root_only(root), [], 0.0)
        self._count(state, choice)
        state.proposed = time.perf_counter()
        return choice.tree

    def _choose(self, state: AutoState, context: list[int], depth: int) -> Choice:
        """Steps 1-3."""
        timing = state.timing
        if state.batch is None:
            base, step_cost = 0.0, timing.cost
            plain = timing.overhead + step_cost.one
        else:  # a batch row: the step's rate over all rows, on the batch forward's cost
            base, step_cost = state.batch.terms()
            plain = timing.overhead + step_cost(1)
        # the gate first: under sampling most steps run no member, and such a step should cost next to nothing
        # (every line a plain step runs is Python time that plain decoding does not pay)
        running = [i for i, t in enumerate(state.members) if t.active and self.should_run(state, i, plain)]
        if not running:
            for track in state.members:
                track.idle += track.active
            return Choice(DraftTree.root_only(context[-1]), [], 0.0)
        cost = StepCost(step_cost)
        bar = state.realized.bar if state.batch is None else 1.0  # (a batch row's wall time is the batch's)
        overhead, tree_overhead, cap = timing.overhead, timing.tree_overhead, self.config.max_nodes
        union = Union(context[-1])
        picked: list[int] = []
        best_rate = (1.0 + base) / plain  # plain decoding's
        alone: int | None = None  # the member whose tree carries q: it is verified, whole and alone
        for i in range(
            len(self.members)
        ):  # in the configured order: the strongest first (AutoConfig.members)
            track = state.members[i]
            if not track.active:
                continue
            if alone is not None or i not in running:
                track.idle += 1
                continue
            tree, values = self._run(state, i, context, depth)
            if len(tree) == 1:  # nothing to offer (no match, say): no help this step
                rate = best_rate
            elif tree.probs is None:
                union.add(i, tree, values)
                picked, rate = union.plan(cap, cost, overhead, tree_overhead, bar, base)
            else:  # it cannot share a trie, and drawn once it is verified (what it learns must come from its
                # own verification: another tree's emitted token is a draw from p, not the acceptance test)
                alone, rate = i, (1.0 + base + sum(values[1:])) / (tree_overhead + cost(len(tree)))
            # what running it did to this step's tokens per second (a tree with q replaces the others': < 1 when
            # they were better)
            lift = (rate if alone == i else max(rate, best_rate)) / best_rate
            track.lift = lift if track.lift is None else track.lift + GATE_EMA * (lift - track.lift)
            best_rate = max(best_rate, rate)
            if not self.pays_its_keep(i, track.lift, timing):
                self._bench(state, i)
        if state.default is not None:  # what the plan would verify on the default runtime (its usage)
            if alone is not None:
                state.there = len(state.members[alone].tree or ()) - 1
            elif len(union.values) > 1:  # something was proposed (otherwise: plain there too, state.there 0)
                d = state.default
                state.there = len(union.plan(cap, StepCost(d.cost), d.overhead, d.tree_overhead, bar)[0])
        if alone is not None:
            track = state.members[alone]
            assert track.tree is not None  # it ran this step
            return Choice(track.tree, [alone], sum(track.values[1:]))
        if not picked:
            return Choice(DraftTree.root_only(context[-1]), [], 0.0)
        owners = 0
        for k in picked:
            owners |= union.owners[k]
        tree = DraftTree(union.trie.tokens, union.trie.parents).subtree(picked)
        contributors = [i for i in range(len(self.members)) if owners >> i & 1]
        return Choice(tree, contributors, sum(union.values[k] for k in picked))

    def _run(self, state: AutoState, i: int, context: list[int], depth: int) -> tuple[DraftTree, list[float]]:
        """Member i proposes; its time and node values are recorded."""
        track = state.members[i]
        t0 = time.perf_counter()
        tree = self.members[i].propose(track.state, context, depth)
        seconds = time.perf_counter() - t0
        state.drafting += seconds
        if track.ran or not self.seconds[i]:  # a generation's first call also indexes the prompt: not typical
            old = self.seconds[i]
            self.seconds[i] = old + TIME_EMA * (seconds - old) if old else seconds
        track.tree, track.values, track.cell = tree, [1.0], 2 * i + track.streak
        if len(tree) > 1:
            factor = state.shared.factor
            values = node_values(tree, track.cell, state.acceptance)
            track.values += [min(1.0, v * factor) for v in values[1:]]
        track.idle, track.ran = 0, track.ran + 1
        return tree, track.values

    def _count(self, state: AutoState, choice: Choice) -> None:
        timing, n = state.timing, len(choice.tree)
        if state.batch is not None:  # the other rows size their trees against this one
            state.batch.plan(1.0 + choice.expected, n)
        seconds = timing.tree_overhead + timing.cost(n) if n > 1 else timing.overhead + timing.cost.one
        state.promised = (1.0 + choice.expected, seconds)
        if state.default is not None:
            state.default_plain += state.there == 0
            state.default_nodes += state.there
            state.there = 0
        state.steps += 1
        state.nodes += len(choice.tree) - 1
        state.drafted = len(choice.tree) > 1
        state.expected += choice.expected
        state.raw = choice.expected / state.shared.factor if choice.expected else 0.0
        if len(choice.tree) == 1:
            state.plain += 1
        for i in choice.members:
            state.members[i].chosen += 1
        if state.debug:
            ran = [m.name for m, t in zip(self.members, state.members, strict=True) if t.tree is not None]
            LOG.debug(
                "step %d: ran %s; verify %d nodes from %s, expecting %.2f accepted",
                state.steps,
                ",".join(ran) or "-",
                len(choice.tree) - 1,
                ",".join(self.members[i].name for i in choice.members) or "none (plain decoding)",
                choice.expected,
            )

    def _time_overhead(self, state: AutoState, now: float) -> None:
        """The last step's time besides drafting and verification (engine bookkeeping, observing, choosing),
        capped at one plain forward so that a consumer pausing the stream does not count."""
        if state.step_start is None:
            return
        timing = state.timing
        sample = (now - state.step_start) - state.drafting - state.verify
        sample = min(max(sample, 0.0), timing.cost.one)
        if state.emitted and state.batch is None:  # a batch row's wall time is the whole batch's
            tokens, seconds = state.promised
            state.realized.record(
                state.drafted, tokens, seconds, state.emitted, state.drafting + state.verify + sample
            )
        if state.drafted:
            timing.tree_overhead += TIME_EMA * (sample - timing.tree_overhead)
        else:
            timing.overhead += TIME_EMA * (sample - timing.overhead)

    # -- learning ------------------------------------------------------------------------------------------

    def observe(self, state: AutoState, scored: Scored) -> None:
        t0 = time.perf_counter()
        cost, verdict = state.timing.cost, scored.verdict
        verify = t0 - state.proposed
        n = len(scored.tree)
        state.verify = verify
        if state.batch is None:  # a batch row's verification is the batch's forward (`BatchBudget` learns it)
            predicted = cost(n) if n > 1 else cost.one
            state.cost_error += abs(verify - predicted) / predicted
            state.timed += 1
            cost.update(n, verify)
        emitted = verdict.tokens
        state.emitted = len(emitted)
        state.accepted += verdict.accepted_drafts
        # every step, drafted or not: without new evidence the factor drifts back to 1, so a low factor from
        # a bad stretch cannot keep auto from drafting (and from measuring it again) for ever
        cfg = self.config
        state.shared.calibrate(state.raw, verdict.accepted_drafts, cfg.shared_memory)
        members, keep = self.members, self.keep
        t0 = time.perf_counter()
        for i, track in enumerate(state.members):
            if track.active:  # chosen or not: some members learn from every verification
                members[i].observe(track.state, scored)
                t1 = time.perf_counter()
                keep[i] += TIME_EMA * (t1 - t0 - keep[i])
                t0 = t1
            if track.tree is not None:
                for depth, rank, hit in trials(track.tree, emitted):
                    state.acceptance.record(track.cell, depth, rank, hit, cfg.memory)
                    state.shared.record(track.cell, depth, rank, hit, cfg.shared_memory)
                first = track.tree.children[0]
                track.streak = int(bool(emitted) and any(track.tree.tokens[c] == emitted[0] for c in first))
                track.tree = None
                t0 = time.perf_counter()

    def report(self, state: AutoState) -> dict[str, Any]:
        timing = state.timing
        steps = max(1, state.steps)
        return {
            "steps": state.steps,
            "chosen": {m.name: t.chosen for m, t in zip(self.members, state.members, strict=True)}
            | {"none": state.plain},
            "ran": {m.name: t.ran for m, t in zip(self.members, state.members, strict=True)},
            "mean_tree_nodes": state.nodes / steps,
            "expected_accepted": round(
                state.expected, 2
            ),  # vs accepted: how well the estimates are calibrated
            "accepted": state.accepted,
            "calibration": round(state.shared.factor, 3),
            "bar": round(state.realized.bar, 3),  # how much more than plain decoding a tree must promise
            "cost_model": timing.cost.report()
            | {"mean_relative_error": state.cost_error / max(1, state.timed)},
            "step_overhead_ms": {
                "plain": round(timing.overhead * 1e3, 3),
                "drafted": round(timing.tree_overhead * 1e3, 3),
            },
            "left_out": dict(self.left_out),
            "benched": [m.name for m, t in zip(self.members, state.members, strict=True) if not t.active],
        }


def trials(tree: DraftTree, emitted: list[int]):
    """(depth, rank, hit) for every child of a node on the true path, at the depths the truth is known for
    (the emitted tokens: accepted drafts, then the target's own)."""
    node = 0
    for depth, token in enumerate(emitted):
        nxt = None
        for rank, child in enumerate(tree.children[node]):
            hit = tree.tokens[child] == token
            yield depth, rank, hit
            if hit:
                nxt = child
        if nxt is None:
            return
        node = nxt
