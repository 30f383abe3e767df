"""auto's members from construction to release: which drafters are candidates, which of them bind to the
model, how each starts a generation (on trial, or benched for not paying its keep), and its `MemberTrack`
within one generation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specdec.drafters.auto.config import AutoConfig, member_options
from specdec.drafters.base import REGISTRY, Drafter, Request
from specdec.errors import InputError
from specdec.runtime import RuntimeChoice
from specdec.tree import DraftTree

LOG = logging.getLogger("specdec.auto")

GATE_EMA = 0.2  # weight of the newest step in a member's lift
RETRY_GENERATIONS = 8  # a member benched for not paying its keep is tried again after this many generations


@dataclass
class MemberTrack:
    """One member within one generation."""

    state: Any  # the member's own per-generation state (None until it started: `started`)
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
    # its `start` ran: members that `starts_late` start at their first run (a probe, or when worth running),
    # so a generation in which one never runs costs it nothing (no prompt indexed, nothing observed)
    started: bool = True

    def add_lift(self, lift: float) -> None:
        self.lift = lift if self.lift is None else self.lift + GATE_EMA * (lift - self.lift)


def candidates(config: AutoConfig, draft_model, exclude: type[Drafter]) -> list[Drafter]:
    """The members `config.members` names, built (`exclude`: auto itself, which cannot be its own member)."""
    names = config.members.split(",") if isinstance(config.members, str) else list(config.members)
    built: list[Drafter] = []
    for m in names:
        if isinstance(m, Drafter):
            drafter = m
        else:
            cls = REGISTRY.get(str(m).strip())
            if cls is None or cls is exclude:
                raise ValueError(f"unknown member {m!r}")
            if cls.needs_draft_model and draft_model is None:
                continue  # no draft model given: not a candidate
            drafter = cls.create(draft_model=draft_model, **member_options(cls.name, config))
        # A member must cope with observing trees that are not its own (merged, cut, or another's): point
        # masses that learn from any tree, a draft model (it syncs on the emitted tokens), or a head that
        # reads the accepted path's hidden states. `lookahead` needs its own window verified whole.
        if not (drafter.mergeable or drafter.samples_drafts or drafter.reads.any):
            raise ValueError(f"member {drafter.name!r} cannot observe trees other than its own")
        built.append(drafter)
    return built


def sits_out(member: Drafter, runtime: RuntimeChoice | None) -> bool:
    """`member` reads hidden states that `runtime` does not return: an inner layer (eagle's) on a runtime
    returning the final one only (llama.cpp), so it cannot draft there. The heads on the final hidden state
    draft on every runtime. (None: outside an engine, nothing known against it.)"""
    return member.reads.any and runtime is not None and not member.reads.on(runtime)


def starts_late(member: Drafter) -> bool:
    """It can start at its first run within a generation rather than at the generation's start: it drafts from
    the context its `propose` gets (pld and suffix index the prompt then; a draft model feeds it), so nothing
    of the steps before is lost. A member reading hidden states needs the prompt's at prefill and the verified
    ones at every step; one that observes to learn across requests (recycle's table) learns from every
    verification, run or not."""
    observes = type(member).observe is not Drafter.observe
    return not member.reads.any and not (observes and member.learned_attributes)


def bind(candidates: list[Drafter], model, runtime: RuntimeChoice) -> tuple[list[Drafter], dict[str, str]]:
    """The candidates that accept the model on its runtime, and why each other one refused it."""
    members: list[Drafter] = []
    left_out: dict[str, str] = {}
    for m in candidates:
        try:
            if sits_out(m, runtime):
                raise InputError(f"the {runtime.name} runtime returns no inner layers' hidden states")
            m.bind(model, runtime)
        except InputError as e:
            left_out[m.name] = str(e)
            LOG.info("auto: %s left out: %s", m.name, e)
            continue
        members.append(m)
    return members, left_out


def start(
    members: list[Drafter],
    request: Request,
    lifts: list[float | None],
    benched: list[int],
    pays: Callable[[int, float | None], bool],
) -> list[MemberTrack]:
    """Each member's track for a new generation, from the lifts and bench counts of its temperature (`benched`
    is updated). A member that `pays` its keep takes part, and so does one never measured or benched for
    RETRY_GENERATIONS generations (on trial); one reading hidden states sits out on a runtime without them.
    Members that `starts_late` start at their first run (`ensure_started`), the others now."""
    tracks = []
    for i, (m, lift) in enumerate(zip(members, lifts, strict=True)):
        if sits_out(m, request.runtime):  # this generation's runtime returns no hidden states it reads
            tracks.append(MemberTrack(None, lift, active=False))
            continue
        trial = lift is None or benched[i] >= RETRY_GENERATIONS
        active = trial or pays(i, lift)
        benched[i] = 0 if active else benched[i] + 1
        # a member measured before waits for its next probe; a new one (or one on trial) is tried at once
        idle = 1 << 30 if trial else 0
        now = active and not starts_late(m)
        tracks.append(
            MemberTrack(m.start(request) if now else None, lift, idle=idle, active=active, started=now)
        )
    return tracks


def ensure_started(member: Drafter, track: MemberTrack, request: Request | None) -> bool:
    """Start a member that starts late, at its first run; True when it started now (its first propose then
    also indexes the whole context, which is timed apart from its usual propose: `Steps._run`)."""
    if track.started:
        return False
    assert request is not None, "a member that starts late starts with its generation's request"
    track.state, track.started = member.start(request), True
    return True


def bench(member: Drafter, track: MemberTrack) -> None:
    """Out for the rest of the generation: not run, not observing (so not drafting stale), state freed."""
    track.active = False
    if track.started:
        member.release(track.state)


def release(members: list[Drafter], tracks: list[MemberTrack]) -> None:
    for m, track in zip(members, tracks, strict=True):
        if track.active and track.started:
            m.release(track.state)
