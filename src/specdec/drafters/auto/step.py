"""One step of `auto`: `propose` (steps 1-3 of the package docstring: the gate, the members' offers merged
and planned, the decision) and `observe` (step 4: the members observe, the estimates learn). `Steps` is the
half of the `Auto` drafter that runs during a generation; `drafter` has the other, from construction to a
generation's end."""

from __future__ import annotations

from collections.abc import Callable

import specdec.drafters.auto.members as lifecycle
from specdec.drafters.auto.config import AutoConfig
from specdec.drafters.auto.estimates import node_values, trials
from specdec.drafters.auto.members import LOG
from specdec.drafters.auto.planner import Offer, StepCost, Terms, Union
from specdec.drafters.auto.state import AutoState, Choice
from specdec.drafters.auto.timing import TIME_EMA, Timing
from specdec.drafters.base import Drafter, Scored
from specdec.tree import DraftTree


class Steps:
    """auto's per-step methods, on what the drafter keeps (`Auto`)."""

    config: AutoConfig
    clock: Callable[[], float]  # what auto times its members and its steps with
    members: list[Drafter]
    seconds: list[float]  # per member: moving average of its propose time
    first_seconds: list[float]  # per member that starts late: the same of its first run in a generation
    keep: list[float]  # per member: moving average of its observe time

    # -- the gate ------------------------------------------------------------------------------------------

    def pays_its_keep(self, i: int, lift: float | None, timing: Timing) -> bool:
        """A member whose observing costs more per step than a probe may (eagle's head runs over every
        verified token; recycle writes rows) stays only while running it pays for its drafting and its
        observing; the others stay anyway (they cost nothing while they sit out)."""
        plain = timing.plain_seconds()
        if self.keep[i] <= self.config.probe_overhead * plain:
            return True
        return lift is None or lift > 1.0 + (self.seconds[i] + self.keep[i]) / plain

    def _bench(self, state: AutoState, i: int) -> None:
        lifecycle.bench(self.members[i], state.members[i])
        LOG.debug("step %d: %s benched for this generation", state.steps + 1, self.members[i].name)

    def probe_due(self, state: AutoState, i: int, plain: float | None = None) -> bool:
        """Running member i now costs at most `probe_overhead` of plain decoding's time, spread over the steps
        since it last ran. `plain`: a plain step's seconds, when the caller has them."""
        plain = state.timing.plain_seconds() if plain is None else plain
        track = state.members[i]
        # a member not started yet pays for its start at its first run (the whole context indexed)
        seconds = self.seconds[i] if track.started else max(self.seconds[i], self.first_seconds[i])
        interval = seconds / (self.config.probe_overhead * plain)
        return track.idle + 1 >= interval

    def should_run(self, state: AutoState, i: int, plain: float | None = None) -> bool:
        """The gate of step 1: a probe is due, or running member i is expected to raise the step's tokens per
        second by more than its drafting time adds to the step (its lift exceeds 1 + seconds / step)."""
        plain = state.timing.plain_seconds() if plain is None else plain
        lift = state.members[i].lift
        worth = lift is not None and lift > 1.0 + self.seconds[i] / plain
        return worth or self.probe_due(state, i, plain)

    # -- choosing ------------------------------------------------------------------------------------------

    def propose(self, state: AutoState, context: list[int], max_depth: int) -> DraftTree:
        now = self.clock()
        self._time_overhead(state, now)
        step = state.step
        step.start, step.drafting = now, 0.0
        depth = min(max_depth, self.config.max_depth)
        if depth >= 1 and self.config.max_nodes > 0 and self.members:
            choice = self._choose(state, context, depth)
        else:
            choice = Choice(DraftTree.root_only(context[-1]), [], 0.0)
        self._count(state, choice)
        return choice.tree

    def _choose(self, state: AutoState, context: list[int], depth: int) -> Choice:
        """Steps 1-3: the gate, the offers of the members it let through, the decision."""
        timing = state.timing
        step_cost: Callable[[int], float]  # the forward's seconds per tree size
        if state.batch is None:
            base, step_cost = 0.0, timing.cost
            plain = timing.overhead + timing.cost.one
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
        # (a batch row's wall time is the batch's)
        bar = state.profile.realized.bar if state.batch is None else 1.0
        cap = self.config.max_nodes
        terms = Terms(StepCost(step_cost), timing.overhead, timing.tree_overhead, bar, base, cap)
        offer = self._offer(state, context, depth, running, terms, plain_rate=(1.0 + base) / plain)
        if state.default is not None:  # what the plan would verify on the default runtime (its usage)
            state.step.there = self._there(state, offer, bar)
        return self._decide(state, context[-1], offer)

    def _offer(
        self,
        state: AutoState,
        context: list[int],
        depth: int,
        running: list[int],
        terms: Terms,
        plain_rate: float,
    ) -> Offer:
        """Steps 1-2 for the members the gate let through (`running`), in the configured order (the strongest
        first: `AutoConfig.members`), the step's rate starting from plain decoding's: each proposes,
        its tree joins the offer, its lift is what that did to the step's best rate, and one that does not pay
        its keep is benched. After a tree with q, the rest sit the step out."""
        offer = Offer(Union(context[-1]), plain_rate)
        for i, track in enumerate(state.members):
            if not track.active:
                continue
            if offer.alone is not None or i not in running:
                track.idle += 1
                continue
            tree, values = self._run(state, i, context, depth)
            if len(tree) == 1 and track.lift is None and track.ran == 1:
                # a new member's first run proposed nothing (no match in the context yet; a head before its
                # first hidden state, which llama.cpp's prefill does not give): no lift from that, it runs again
                track.idle = 1 << 30
                continue
            rate = offer.add(i, tree, values, terms)
            # what running it did to this step's tokens per second (a tree with q replaces the others': < 1 when
            # they were better)
            track.add_lift((rate if offer.alone == i else max(rate, offer.best_rate)) / offer.best_rate)
            offer.best_rate = max(offer.best_rate, rate)
            if not self.pays_its_keep(i, track.lift, state.timing):
                self._bench(state, i)
        return offer

    def _there(self, state: AutoState, offer: Offer, bar: float) -> int:
        """Drafted nodes the plan would verify on the default runtime (`AutoState.default`): the same node
        values, that runtime's cost and overheads."""
        if offer.alone is not None:
            return len(state.members[offer.alone].tree or ()) - 1
        default = state.default
        if len(offer.union.values) == 1 or default is None:  # nothing was proposed: plain there too
            return 0
        cost = StepCost(default.cost)
        terms = Terms(cost, default.overhead, default.tree_overhead, bar, 0.0, self.config.max_nodes)
        return len(offer.union.plan(terms)[0])

    def _decide(self, state: AutoState, root: int, offer: Offer) -> Choice:
        """Step 3's outcome: the tree with q alone, the planned nodes of the merged trie, or the root alone."""
        if offer.alone is not None:
            track = state.members[offer.alone]
            assert track.tree is not None  # it ran this step
            return Choice(track.tree, [offer.alone], sum(track.values[1:]))
        picked, union = offer.picked, offer.union
        if not picked:
            return Choice(DraftTree.root_only(root), [], 0.0)
        owners = union.owned(picked)
        contributors = [i for i in range(len(self.members)) if owners >> i & 1]
        return Choice(union.tree(picked), contributors, sum(union.values[k] for k in picked))

    def _run(self, state: AutoState, i: int, context: list[int], depth: int) -> tuple[DraftTree, list[float]]:
        """Member i proposes; its time and node values are recorded."""
        track, clock = state.members[i], self.clock
        t0 = clock()
        first = lifecycle.ensure_started(self.members[i], track, state.request)
        tree = self.members[i].propose(track.state, context, depth)
        seconds = clock() - t0
        state.step.drafting += seconds
        if first:  # its start and the whole context indexed: what its next first run will cost
            self.first_seconds[i] = _ema(self.first_seconds[i], seconds)
        # a generation's first call also indexes the prompt: not typical, but it seeds the average (counting
        # only later calls, the cheap copy members ran every step under sampling, which drove auto onto
        # native's forward there, where their trees did not pay: docs/methods.md, auto)
        if track.ran or not self.seconds[i]:
            self.seconds[i] = _ema(self.seconds[i], seconds)
        track.tree, track.values, track.cell = tree, [1.0], 2 * i + track.streak
        if len(tree) > 1:
            factor = state.profile.shared.factor
            values = node_values(tree, track.cell, state.acceptance)
            track.values += [min(1.0, v * factor) for v in values[1:]]
        track.idle, track.ran = 0, track.ran + 1
        return tree, track.values

    def _count(self, state: AutoState, choice: Choice) -> None:
        timing, step, n = state.timing, state.step, len(choice.tree)
        if state.batch is not None:  # the other rows size their trees against this one
            state.batch.plan(1.0 + choice.expected, n)
        seconds = timing.tree_overhead + timing.cost(n) if n > 1 else timing.overhead + timing.cost.one
        step.promised = (1.0 + choice.expected, seconds)
        if state.default is not None:
            state.default_plain += step.there == 0
            state.default_nodes += step.there
            step.there = 0
        state.steps += 1
        state.nodes += n - 1
        step.drafted = n > 1
        state.expected += choice.expected
        step.raw = choice.expected / state.profile.shared.factor if choice.expected else 0.0
        if n == 1:
            state.plain += 1
        for i in choice.members:
            state.members[i].chosen += 1
        if state.debug:
            ran = [m.name for m, t in zip(self.members, state.members, strict=True) if t.tree is not None]
            LOG.debug(
                "step %d: ran %s; verify %d nodes from %s, expecting %.2f accepted",
                state.steps,
                ",".join(ran) or "-",
                n - 1,
                ",".join(self.members[i].name for i in choice.members) or "none (plain decoding)",
                choice.expected,
            )

    def _time_overhead(self, state: AutoState, now: float) -> None:
        """The last step's time besides drafting and verification (engine bookkeeping, observing, choosing),
        capped at one plain forward so that a consumer pausing the stream does not count."""
        step, timing = state.step, state.timing
        if step.start is None:
            return
        sample = (now - step.start) - step.drafting - step.verify
        sample = min(max(sample, 0.0), timing.cost.one)
        if step.emitted and state.batch is None:  # a batch row's wall time is the whole batch's
            tokens, seconds = step.promised
            spent = step.drafting + step.verify + sample
            state.profile.realized.record(step.drafted, tokens, seconds, step.emitted, spent)
        timing.learn_overhead(step.drafted, sample)

    # -- learning ------------------------------------------------------------------------------------------

    def observe(self, state: AutoState, scored: Scored) -> None:
        step, verdict = state.step, scored.verdict
        step.verify = verify = scored.verify_seconds  # the engine's measurement
        if state.batch is None:  # a batch row's verification is the batch's forward (`BatchBudget` learns it)
            cost, n = state.timing.cost, len(scored.tree)
            predicted = cost(n) if n > 1 else cost.one
            state.cost_error += abs(verify - predicted) / predicted
            state.timed += 1
            cost.update(n, verify)
        emitted = verdict.tokens
        step.emitted = len(emitted)
        state.accepted += verdict.accepted_drafts
        # every step, drafted or not: without new evidence the factor drifts back to 1, so a low factor from
        # a bad stretch cannot keep auto from drafting (and from measuring it again) for ever
        state.profile.shared.calibrate(step.raw, verdict.accepted_drafts, self.config.shared_memory)
        self._learn(state, scored, emitted)

    def _learn(self, state: AutoState, scored: Scored, emitted: list[int]) -> None:
        """Every active member observes, chosen or not (some learn from every verification), its observe
        timed (`keep`); every member that ran learns its estimates from its own tree (`trials`)."""
        cfg, members, keep, clock = self.config, self.members, self.keep, self.clock
        acceptance, shared = state.acceptance, state.profile.shared
        t0 = clock()
        for i, track in enumerate(state.members):
            if track.active and track.started:
                members[i].observe(track.state, scored)
                t1 = clock()
                keep[i] += TIME_EMA * (t1 - t0 - keep[i])
                t0 = t1
            tree = track.tree
            if tree is not None:
                for depth, rank, hit in trials(tree, emitted):
                    acceptance.record(track.cell, depth, rank, hit, cfg.memory)
                    shared.record(track.cell, depth, rank, hit, cfg.shared_memory)
                first = tree.children[0]
                track.streak = int(bool(emitted) and any(tree.tokens[c] == emitted[0] for c in first))
                track.tree = None
                t0 = clock()


def _ema(old: float, new: float) -> float:
    """A moving average of measured seconds (0: none yet, so the first measurement is taken whole)."""
    return old + TIME_EMA * (new - old) if old else new
