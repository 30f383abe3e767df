"""The `auto` drafter from construction to a generation's end: its members bound, its runtimes' timings,
what it carries across requests (per temperature: `Profile`), the runtime choice, and each generation's start,
release and report. Its steps (`propose`, `observe`) are `Steps`'."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import specdec.drafters.auto.members as lifecycle
from specdec.drafters.auto.config import AutoConfig
from specdec.drafters.auto.members import LOG
from specdec.drafters.auto.state import AutoState, Profile, temperature_key
from specdec.drafters.auto.step import Steps
from specdec.drafters.auto.timing import (
    Timing,
    fastest,
    measured,
    record_usage,
    remeasure,
    usage_to_choose_by,
)
from specdec.drafters.base import Drafter, Reads, Request, register
from specdec.runtime import RuntimeChoice
from specdec.sampling import SamplingParams
from specdec.timing import Recheck

if TYPE_CHECKING:  # specdec.batch builds on the engine, which builds on the drafters
    from specdec.batch import BatchBudget


@register
class Auto(Steps, Drafter[AutoState]):
    """Also a `RuntimeChooser` (per request: llamacpp where it mostly decodes plainly), a `ReadsOnDemand` (hidden
    states only while a member reading them takes part) and a `BatchSizer` (a batch row's tree is sized for the
    whole step: `Request.batch`)."""

    name = "auto"
    # inner layers when a member reads them (eagle; `hidden_layers` is empty otherwise: free); on a runtime
    # without them (llamacpp) such members are left out
    reads = Reads.HIDDEN_LAYERS_IF_AVAILABLE
    uses_head = True  # --draft HEAD_DIR: the member of that head's kind (eagle, hydra, medusa) drafts with it
    # what `start` and `release` carry across requests (`runtimes` is not: it only caches the choices offered,
    # and grows with `timings`, so every restored timing's runtime is in it)
    learned_attributes = (
        "timings",
        "profiles",
        "seconds",
        "first_seconds",
        "keep",
        "default_runtime",
        "recheck",
    )

    def __init__(
        self,
        config: AutoConfig | None = None,
        draft_model=None,
        clock: Callable[[], float] = time.perf_counter,
        **options,
    ) -> None:
        self.config = cfg = config or AutoConfig(**options)
        # what auto times its members' drafting and observing, and its steps, with (the verification's time
        # is the engine's: `Scored.verify_seconds`)
        self.clock = clock
        self.candidates = lifecycle.candidates(cfg, draft_model, exclude=Auto)
        self.members: list[Drafter] = []
        self.left_out: dict[str, str] = {}  # member -> why it refused the model
        self.model = None  # the target, once bound
        self.runtime: RuntimeChoice | None = None  # the engine's default runtime for it, once bound
        self.timings: dict[str, Timing] = {}  # per target runtime (name), measured at its first generation
        # per temperature (`temperature_key`): what is learned there, carried across requests
        self.profiles: dict[float, Profile] = {}
        self.seconds: list[float] = []  # per member: moving average of its propose time (the machine's)
        # per member that starts late: the same of its first run in a generation (its start, and indexing the
        # context so far): what a probe of it costs while it has not run yet
        self.first_seconds: list[float] = []
        self.keep: list[float] = []  # per member: moving average of its observe time, paid every step
        self.default_runtime: str | None = None  # the engine's default runtime, once it offered a choice
        self.runtimes: dict[str, RuntimeChoice] = {}  # name -> the runtime, as `timings`
        # when the cost curves are measured again (`_remeasure`): a burst of load at the first measurement
        # must not shape every tree for the process's life
        self.recheck = Recheck()

    @classmethod
    def create(cls, draft_model=None, **options) -> Auto:
        return cls(draft_model=draft_model, **options)

    # -- the member lifecycle and what is carried across requests -------------------------------------------

    def bind(self, model, runtime: RuntimeChoice) -> None:
        self.model, self.runtime = model, runtime
        self.members, self.left_out = lifecycle.bind(self.candidates, model, runtime)
        self.timings = {}  # each measured at the first start on it, once the engine checked the model
        self.runtimes, self.recheck = {}, Recheck()
        self.profiles = {}
        self.seconds = [0.0] * len(self.members)
        self.first_seconds = [0.0] * len(self.members)
        self.keep = [0.0] * len(self.members)

    def snapshot_learned(self) -> dict[str, Any]:
        """auto's estimates, timings and usage (`learned_attributes`), and each member's."""
        return {**super().snapshot_learned(), "members": [m.snapshot_learned() for m in self.members]}

    def restore_learned(self, snapshot: dict[str, Any]) -> None:
        super().restore_learned({k: v for k, v in snapshot.items() if k != "members"})
        for m, learned in zip(self.members, snapshot["members"], strict=True):
            m.restore_learned(learned)

    def reads_hidden(self, state: AutoState) -> bool:
        """A member reading hidden states takes part in this generation now (`ReadsOnDemand`): one benched or
        sitting out never returns within it."""
        return any(t.active and m.reads.any for m, t in zip(self.members, state.members, strict=True))

    def hidden_layers(self) -> tuple[int, ...]:
        layers = {i for m in self.members if m.reads.any for i in m.hidden_layers()}
        return tuple(sorted(layers))

    def _timing(self, runtime: RuntimeChoice | None) -> Timing:
        """The timing of a runtime (None: the one auto was bound with, for a request from outside an
        engine)."""
        if runtime is None:
            assert self.runtime is not None, "bind first"
            runtime = self.runtime
        if runtime.name not in self.timings:
            self.runtimes[runtime.name] = runtime
            self.timings[runtime.name] = measured(self.model, runtime, self.config.cost)
        return self.timings[runtime.name]

    def profile(self, key: float) -> Profile:
        """What was learned at temperature `key` (`temperature_key`); a new profile when nothing yet."""
        profile = self.profiles.get(key)
        if profile is None:
            profile = self.profiles[key] = Profile.new(len(self.members))
        return profile

    def choose_runtime(self, params: SamplingParams, runtimes: Sequence[RuntimeChoice]) -> int:
        """Index of the runtime (`RuntimeChoice`s, the engine's default first) whose expected step time is the
        least at the usage auto has for the default runtime at this temperature: measured on it, or, in
        generations elsewhere, what its plan would have verified there (`AutoState.default`). (The usage on
        another runtime would feed back: on llama.cpp, where trees cost more, auto drafts less, and that usage
        then argues for llama.cpp.) Until the usage rests on USAGE_STEPS steps, greedy decoding runs on the
        default and sampling goes by `SAMPLED_PRIOR`. A runtime without hidden states takes no member that reads
        them."""
        # every runtime's cost curve is measured at the first generation, whichever runs it: measuring one later
        # would land in the first request that switches to it
        timings = [self._timing(r) for r in runtimes]
        self.default_runtime = runtimes[0].name
        profile = self.profiles.get(temperature_key(params))
        usage = usage_to_choose_by(None if profile is None else profile.usage, params.greedy)
        if usage is None or len(runtimes) < 2:
            return 0
        return fastest(usage, timings)

    def prepare(self, runtimes: Sequence[RuntimeChoice]) -> None:
        """Every candidate runtime's cost curve, measured while the engine is built: in a first request this
        timing made it several times slower than the next ones (the shipped model's two curves take ~1.5 s)."""
        if self.config.cost is not None:
            return
        began = time.perf_counter()
        for runtime in runtimes:
            self._timing(runtime)
        self.recheck.took(time.perf_counter() - began)

    def _remeasure(self) -> None:
        remeasure(self.timings, self.model, self.runtimes)

    def prepare_batch(self, budget: BatchBudget) -> None:
        """A batch row's tree is sized by the batch step's cost: measured now, when the batch is made, not in
        the first request's step."""
        budget.measure()

    def start(self, request: Request) -> AutoState:
        began, measured = time.perf_counter(), len(self.timings)
        remeasure = self.recheck.tick() and self.config.cost is None
        if remeasure:
            self._remeasure()
        timing = self._timing(request.runtime)
        if remeasure or len(self.timings) > measured:  # what a timing costs decides when the next is due
            self.recheck.took(time.perf_counter() - began)
        profile = self.profile(temperature_key(request.params))
        tracks = lifecycle.start(
            self.members,
            request,
            profile.lifts,
            profile.benched,
            lambda i, lift: self.pays_its_keep(i, lift, timing),
        )
        runtime, default = request.runtime, None
        if runtime is not None and self.default_runtime not in (None, runtime.name):
            default = self.timings[self.default_runtime]
        acceptance = profile.shared.warm_copy(self.config.warm_weight)
        debug = LOG.isEnabledFor(logging.DEBUG)
        return AutoState(tracks, acceptance, profile, timing, default, request.batch, debug, request)

    def prefilled(self, state: AutoState, hidden) -> None:
        for m, track in zip(self.members, state.members, strict=True):
            if track.active and track.started:
                m.prefilled(track.state, hidden)

    def release(self, state: AutoState) -> None:
        profile = state.profile
        if state.steps:
            plain, verified = (
                (state.plain, state.nodes)
                if state.default is None
                else (state.default_plain, state.default_nodes)
            )
            profile.usage = record_usage(profile.usage, state.steps, plain, verified)
        lifts = zip(state.members, profile.lifts, strict=True)
        profile.lifts = [t.lift if t.ran else lift for t, lift in lifts]
        lifecycle.release(self.members, state.members)

    def report(self, state: AutoState) -> dict[str, Any]:
        timing, profile = state.timing, state.profile
        steps = max(1, state.steps)
        tracks = list(zip(self.members, state.members, strict=True))
        return {
            "steps": state.steps,
            "chosen": {m.name: t.chosen for m, t in tracks} | {"none": state.plain},
            "ran": {m.name: t.ran for m, t in tracks},
            "mean_tree_nodes": state.nodes / steps,
            # vs accepted: how well the estimates are calibrated
            "expected_accepted": round(state.expected, 2),
            "accepted": state.accepted,
            "calibration": round(profile.shared.factor, 3),
            "bar": round(profile.realized.bar, 3),  # how much more than plain decoding a tree must promise
            "cost_model": timing.cost.report()
            | {"mean_relative_error": state.cost_error / max(1, state.timed)},
            "step_overhead_ms": {
                "plain": round(timing.overhead * 1e3, 3),
                "drafted": round(timing.tree_overhead * 1e3, 3),
            },
            "left_out": dict(self.left_out),
            "benched": [m.name for m, t in tracks if not t.active],
        }
