"""What auto keeps: per temperature across requests (`Profile`), per generation (`AutoState`, with a
`MemberTrack` per member), what one step leaves for the next (`StepScratch`), and one step's decision
(`Choice`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from specdec.drafters.auto.estimates import Acceptance
from specdec.drafters.auto.members import MemberTrack
from specdec.drafters.auto.timing import Realized, Timing, Usage
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

if TYPE_CHECKING:  # specdec.batch builds on the engine, which builds on the drafters
    from specdec.batch import RowBudget
    from specdec.drafters.base import Request


def temperature_key(params: SamplingParams) -> float:
    """The `Profile` a request's generation learns in: its temperature in tenths (greedy 0)."""
    return 0.0 if params.greedy else round(float(params.temperature), 1)


@dataclass
class Profile:
    """What the drafter carries across requests at one temperature: what is accepted at T = 1, and what pays
    there, says little about T = 0. Per member lists follow the bound members' order."""

    shared: Acceptance  # the counts each generation starts from, and the calibration factor
    lifts: list[float | None]  # per member: the lift a generation starts from (None: never ran)
    benched: list[int]  # per member: generations it sat out benched since it was last tried
    realized: Realized = field(default_factory=Realized)  # the bar's sums
    usage: Usage | None = None  # how its generations used the default runtime (None: none finished yet)

    @classmethod
    def new(cls, members: int) -> Profile:
        return cls(Acceptance(2 * members), [None] * members, [0] * members)


@dataclass
class Choice:
    """One step's decision."""

    tree: DraftTree  # to verify
    members: list[int]  # those that contributed a node to it
    expected: float  # accepted drafts expected from it (calibrated)


@dataclass
class StepScratch:
    """The last step, as its propose and observe left it for the next propose (which times it: the step's
    wall time less drafting and verification is the step overhead, `Timing`)."""

    start: float | None = None  # when its propose began (None: no step yet)
    drafting: float = 0.0  # members' propose time
    verify: float = 0.0  # the verification's time (the engine's: `Scored.verify_seconds`)
    drafted: bool = False  # it verified drafts
    promised: tuple[float, float] = (0.0, 0.0)  # the choice's predicted (tokens, seconds) (`Realized`)
    emitted: int = 0  # tokens its verification emitted
    raw: float = 0.0  # the choice's expected accepted drafts before calibration
    there: int = 0  # drafted nodes of its plan for the default runtime (`AutoState.default`)


@dataclass
class AutoState:
    members: list[MemberTrack]
    acceptance: Acceptance  # this generation's estimates, warm-started from the profile's
    profile: Profile  # the drafter's, for this generation's temperature
    timing: Timing  # of the runtime this generation runs on
    # the engine's default runtime's timing when this generation runs on another (None: it runs on the
    # default): each step also plans for it, and those plans are the usage this generation reports
    default: Timing | None
    # a batch row's view of the shared step (`Request.batch`): trees are sized for the whole step's tokens per
    # second, on the batch's cost; None: decoded alone
    batch: RowBudget | None = None
    # the per-step choice goes to the debug log: asked once per generation (a step should touch no more code
    # than it needs: after a forward the interpreter's caches are cold and every call costs microseconds)
    debug: bool = False
    request: Request | None = None  # what the members that start late start with (`members.ensure_started`)
    step: StepScratch = field(default_factory=StepScratch)
    # counters over the generation
    default_plain: int = 0  # steps whose plan for the default runtime verified the root alone
    default_nodes: int = 0  # drafted nodes those plans verified
    steps: int = 0
    plain: int = 0  # steps that verified the root alone
    expected: float = 0.0  # accepted drafts the chosen trees were expected to give, summed (calibration)
    accepted: int = 0  # accepted drafts, summed
    nodes: int = 0  # drafted nodes verified, over all steps
    cost_error: float = 0.0  # sum over steps of |measured - predicted| / predicted verification time
    timed: int = 0  # steps whose verification the cost model learned from
