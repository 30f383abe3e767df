"""Choices made by timing (`specdec.timing`): a noisy first sample does not decide for good. Every clock here
is injected: the tests script what each forward "takes", so nothing depends on this machine's speed."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecDecoder
from specdec.costmodel import CostModel
from specdec.drafters.auto import REALIZED_IDLE, Realized, plan
from specdec.runtime import RuntimeChoice, TimedChoice
from specdec.timing import (
    RECHECK_AT,
    RECHECK_EVERY,
    RECHECK_FREE,
    RECHECK_SHARE,
    Fastest,
    Recheck,
    prefer,
)
from specdec.tree import DraftTree

import tiny


def test_recheck_is_due_early_then_rarely():
    recheck = Recheck()
    due = [n for n in range(1, 3 * RECHECK_EVERY + 2) if recheck.tick()]  # generation n starts
    assert due[: len(RECHECK_AT)] == [a + 1 for a in RECHECK_AT]  # after the 1st, 2nd, ... generation
    assert due[len(RECHECK_AT) :] == [RECHECK_EVERY * k + 1 for k in (1, 2, 3)]


def test_a_dear_timing_skips_the_early_rechecks_and_waits_for_a_small_share_of_the_time_since():
    """A timing of a real-size model takes seconds: no early re-checks, and the one every RECHECK_EVERY
    generations waits until it costs at most RECHECK_SHARE of the wall time since the last timing, then runs
    once; a cheap timing keeps the whole schedule."""
    now = [0.0]
    recheck = Recheck(clock=lambda: now[0])
    recheck.took(2 * RECHECK_FREE)  # the first timing, before generation 1
    assert not any(recheck.tick() for _ in range(RECHECK_EVERY))  # generations 1..RECHECK_EVERY: none due
    now[0] += 1.0
    assert not recheck.tick()  # due by the schedule, but 2 s of timing in 1 s since
    now[0] += 2 * RECHECK_FREE / RECHECK_SHARE
    assert recheck.tick()  # the pending re-check, now a small share
    recheck.took(2 * RECHECK_FREE)
    assert not recheck.tick()
    cheap = Recheck(clock=lambda: now[0])
    cheap.took(RECHECK_FREE / 2)
    assert [cheap.tick() for _ in range(4)] == [False, True, True, True]


def test_fastest_keeps_the_least_and_prefer_has_hysteresis():
    fastest = Fastest()
    assert fastest.merge(["a", "b"], [3.0, 1.0]) == [3.0, 1.0]
    assert fastest.merge(["a", "b"], [1.0, 2.0]) == [1.0, 1.0]  # load only ever slows: a burst is forgotten
    assert prefer(0, [1.0, 0.95]) == 0  # 5% cheaper: within the margin, no switch
    assert prefer(0, [1.0, 0.8]) == 1
    assert prefer(1, [0.95, 1.0]) == 1  # and no switch back either


class Script:
    """A timer for `TimedChoice`: per runtime name, the seconds its tree forward takes at each timing."""

    def __init__(self, **seconds: list[float]) -> None:
        self.seconds = seconds
        self.calls = {name: 0 for name in seconds}

    def __call__(self, model, choice, tokens, clock) -> float:
        i = self.calls[choice.name]
        self.calls[choice.name] += 1
        times = self.seconds[choice.name]
        return times[min(i, len(times) - 1)]


def _choices() -> tuple[RuntimeChoice, RuntimeChoice]:
    return RuntimeChoice("native", lambda: None), RuntimeChoice("llamacpp", lambda: None, hidden_states=False)


def test_a_burst_at_load_does_not_fix_the_runtime():
    """native's first timing lands in a burst (3x its speed): llama.cpp wins at load, and the re-checks of the
    next generations hand the drafting back to native, which is really faster."""
    race = TimedChoice(_choices(), 8, timer=Script(native=[3.0, 1.0], llamacpp=[1.5]))
    assert race.choose(None).name == "llamacpp"
    names = [race.next_generation(None).name for _ in range(4)]
    assert names[-1] == "native"
    assert race.timed >= 2


def test_two_runtimes_of_one_speed_do_not_flip_flop():
    """Noise of +-5% between two equal runtimes: the choice made first stays, whatever each re-check says."""
    noisy = [1.0, 1.04, 0.97, 1.05, 1.0, 0.96]
    race = TimedChoice(_choices(), 8, timer=Script(native=noisy, llamacpp=noisy[::-1]))
    first = race.choose(None).name
    assert {race.next_generation(None).name for _ in range(3 * RECHECK_EVERY)} == {first}


class FakeRunner:
    """What `CostModel.measure` drives (start, score, crop), advancing an injected clock by a scripted
    forward time: 1 ms plus 0.1 ms per tree token, times `burst` for trees of 8 tokens or more."""

    def __init__(self, clock: list[float], burst: float) -> None:
        self.clock, self.burst = clock, burst

    def start(self, ids, capacity) -> None:
        pass

    def crop(self, length: int) -> None:
        pass

    def score(self, tree: DraftTree) -> None:
        seconds = 1e-3 + 1e-4 * len(tree)
        self.clock[0] += seconds * (self.burst if len(tree) >= 8 else 1.0)


def test_a_burst_during_the_first_cost_measurement_is_overruled_by_the_recheck():
    """The first measurement saw trees 4x dearer than they are (a burst while it timed the larger sizes):
    auto's plan then decodes plainly. The re-check keeps each size's least time, so its curve is the real one
    and the same node values pay again."""
    model = tiny.model("llama")
    clock = [0.0]
    bursts = iter([4.0, 1.0])
    runtime = RuntimeChoice("fake", lambda: FakeRunner(clock, next(bursts)))
    steep = CostModel.for_runtime(model, runtime, clock=lambda: clock[0])
    values = [0.6] * 15  # a 15-node tree, each node likely enough to pay at the real cost
    assert plan(values, steep, overhead=0.0)[0] < 8  # the burst's curve stops short of the dear sizes
    real = CostModel.recheck(model, runtime, clock=lambda: clock[0])
    assert real(16) == pytest.approx(1e-3 + 16e-4)
    assert CostModel.for_runtime(model, runtime) is real  # what every later caller sees
    assert plan(values, real, overhead=0.0)[0] == 15


def test_the_bar_comes_back_when_drafted_steps_stop():
    """Drafted steps fell short during a burst and the bar rose to its cap, so no tree was taken after it: the
    drafted kind gets no new evidence, and without drift the bar would stay up for the process's life."""
    realized = Realized()
    for _ in range(100):
        realized.record(False, 1.0, 10e-3, 1, 10e-3)
        realized.record(True, 3.0, 10e-3, 1, 10e-3)  # promised 3 tokens, got 1
    high = realized.bar
    assert high > 2.5
    for _ in range(REALIZED_IDLE):
        realized.record(False, 1.0, 10e-3, 1, 10e-3)
    assert realized.bar == pytest.approx(high, rel=0.05)  # a pause is not forgetting
    for _ in range(300):
        realized.record(False, 1.0, 10e-3, 1, 10e-3)
    assert realized.bar < 1.1


def test_the_engine_re_times_the_runtime_for_each_generation(tok, monkeypatch):
    """pld's runtime is raced at load and again on the re-check schedule; the generations follow the winner."""
    import specdec.runtime as runtime

    script = Script(native=[3.0, 1.0], llamacpp=[1.5])
    monkeypatch.setattr(runtime, "_tree_seconds", script)
    model = tiny.model("llama", seed=1, dtype=torch.float32)
    dec = SpecDecoder(model, tok, "pld")
    assert dec.engine.runtime.name == "llamacpp"  # the burst's choice
    prompt = "def f(x):\n    return x\n"
    names = [dec.generate(prompt, max_new_tokens=4).stats.runtime for _ in range(3)]
    assert names[-1] == "native" and dec.engine.runtime.name == "native"


@pytest.mark.parametrize("method", ["pld", "suffix"])
def test_batching_works_whichever_runtime_won_the_timing(tok, monkeypatch, method):
    """When llama.cpp wins pld's race, a batch still runs (on native), each row equal to its solo result."""
    import specdec.runtime as runtime

    monkeypatch.setattr(runtime, "_tree_seconds", Script(native=[3.0], llamacpp=[1.0]))
    model = tiny.model("llama", seed=1, dtype=torch.float32)
    dec = SpecDecoder(model, tok, method)
    assert dec.engine.runtime.name == "llamacpp"
    texts = ["def add(a, b):\n    return a + b\n\ndef add(", "x = 1\ny = 2\nx = 1\n"]
    batch = dec.generate_batch(texts, max_new_tokens=12, ignore_eos=True)
    for text, row in zip(texts, batch, strict=True):
        ids = tok(text)["input_ids"]
        assert row.token_ids == tiny.hf_greedy(model, ids, 12)
        assert row.stats.runtime == "native"


@pytest.mark.parametrize("method", ["medusa", "hydra"])
def test_trees_are_sized_for_the_runtime_a_generation_runs_on(tok, monkeypatch, method):
    """The heads' tree size is chosen by the target's cost per tree size. When the re-timed race moves the
    generations to the other runtime, the next generation's trees are sized by that runtime's cost, not by the
    one bound at load (on a runtime where a tree costs what a token costs, the template grows)."""
    import specdec.runtime as runtime

    monkeypatch.setattr(runtime, "_tree_seconds", Script(native=[1.0], llamacpp=[1.5, 0.5]))
    steep = CostModel.fit([1, 2, 64], [1e-3, 2e-3, 64e-3])  # every token in a tree costs a forward
    flat = CostModel.fit([1, 2, 64], [1e-3, 1e-3, 1.001e-3])  # a tree costs what one token costs
    curves = {"native": steep, "llamacpp": flat}
    monkeypatch.setattr(CostModel, "for_runtime", classmethod(lambda cls, m, r, clock=None: curves[r.name]))
    model = tiny.model("llama", seed=1, dtype=torch.float32)
    dec = SpecDecoder(model, tok, method, head=tiny.untrained_head(method, model))
    drafter = dec.engine.drafter
    assert dec.engine.runtime.name == "native" and drafter.sized_for == "native"
    bound = len(drafter.template)
    prompt = "def f(x):\n    return x\n"
    reference = tiny.hf_greedy(model, tok(prompt)["input_ids"], 12)
    outs = [dec.generate(prompt, max_new_tokens=12, ignore_eos=True) for _ in range(2)]
    assert [o.stats.runtime for o in outs] == ["native", "llamacpp"]  # the recheck found llamacpp faster
    assert drafter.sized_for == "llamacpp" and len(drafter.template) > bound
    assert all(o.token_ids == reference for o in outs)  # lossless on either runtime, whatever the size


@pytest.mark.parametrize("method", ["recycle", "draft"])
def test_cost_sized_drafters_follow_a_runtime_switch(tok, monkeypatch, method):
    """recycle (max_nodes "auto") and draft (break-even length) measure the cost of the runtime a generation
    runs on once the re-timed race moves it; every generation's output stays generate()'s."""
    import specdec.runtime as runtime

    monkeypatch.setattr(runtime, "_tree_seconds", Script(native=[1.0], llamacpp=[1.5, 0.5]))
    measured: list[str] = []
    flat = CostModel.fit([1, 2, 64], [1e-3, 1e-3, 1.001e-3])

    def for_runtime(cls, m, r, clock=None):
        measured.append(r.name)
        return flat

    monkeypatch.setattr(CostModel, "for_runtime", classmethod(for_runtime))
    model = tiny.model("llama", seed=1, dtype=torch.float32)
    options = {"max_nodes": "auto"} if method == "recycle" else {"draft_model": tiny.model("llama", seed=2)}
    dec = SpecDecoder(model, tok, method, **options)
    prompt = "def f(x):\n    return x\n"
    reference = tiny.hf_greedy(model, tok(prompt)["input_ids"], 12)
    outs = [dec.generate(prompt, max_new_tokens=12, ignore_eos=True) for _ in range(2)]
    assert [o.stats.runtime for o in outs] == ["native", "llamacpp"]
    drafter = dec.engine.drafter
    costed = drafter.runtime.name if method == "recycle" else drafter.costed  # what its cost was measured on
    assert costed == "llamacpp" and measured.count("native") >= 1
    assert all(o.token_ids == reference for o in outs)
