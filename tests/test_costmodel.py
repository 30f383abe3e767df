"""The cost model: a monotone piecewise-linear fit of forward time against tree size, and the size choice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.costmodel import CostModel, chain_gains
from specdec.runtime import select_runtime

import tiny

sizes_and_times = st.lists(
    st.tuples(st.integers(1, 128), st.floats(1e-4, 1.0)), min_size=1, max_size=8, unique_by=lambda p: p[0]
)


@settings(max_examples=100, deadline=None)
@given(sizes_and_times)
def test_fit_is_monotone_and_keeps_monotone_data(pairs):
    sizes, times = zip(*pairs, strict=True)
    cost = CostModel.fit(sizes, times)
    assert list(cost.sizes) == sorted(sizes)
    assert all(a <= b + 1e-15 for a, b in zip(cost.seconds, cost.seconds[1:], strict=False))
    queried = [cost(n / 2) for n in range(0, 2 * max(sizes) + 20)]
    assert all(a <= b + 1e-15 for a, b in zip(queried, queried[1:], strict=False))
    ordered = [t for _, t in sorted(pairs)]
    if ordered == sorted(ordered):  # already monotone: the fit is the data
        assert list(cost.seconds) == pytest.approx(ordered)
    assert sum(cost.seconds) == pytest.approx(sum(times))  # pooling averages, it never shifts the total


def test_fit_pools_violators_and_interpolates():
    cost = CostModel.fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 5.0])
    assert cost.seconds == (1.0, 2.5, 2.5, 5.0)
    assert cost(1.5) == pytest.approx(1.75)
    assert cost(0.5) == 1.0  # flat below the smallest size
    assert cost(6) == pytest.approx(5.0 + 2 * 2.5)  # the last segment's slope beyond the largest
    with pytest.raises(ValueError):
        CostModel.fit([1, 1], [1.0, 2.0])
    with pytest.raises(ValueError):
        CostModel.fit([0], [1.0])


@settings(max_examples=100, deadline=None)
@given(
    pairs=sizes_and_times,
    gains=st.lists(st.floats(0.0, 1.0), max_size=20),
    draft=st.floats(0.0, 0.01),
)
def test_best_size_maximises_tokens_per_second(pairs, gains, draft):
    cost = CostModel.fit(*zip(*pairs, strict=True))
    cumulative = [0.0]
    for g in gains:
        cumulative.append(cumulative[-1] + g)
    n = cost.best_size(cumulative, draft_seconds=draft)

    def rate(k: int) -> float:
        return (1 + cumulative[k]) / ((draft if k else 0.0) + cost(k + 1))

    assert 0 <= n < len(cumulative)
    assert all(rate(n) >= rate(k) - 1e-12 for k in range(len(cumulative)))


def test_reference_costs_favour_small_trees():
    """On the development machine's costs a draft pays off only while its nodes are likely enough."""
    cost = CostModel.reference()
    assert cost(1) == pytest.approx(7.4e-3) and cost(64) == pytest.approx(20e-3)
    assert cost.best_size(chain_gains([0.9] * 16)) >= 8  # a reliable chain: draft deep
    assert cost.best_size(chain_gains([0.05] * 16)) == 0  # hopeless: do not draft
    assert chain_gains([0.5, 0.5]) == [0.0, 0.5, 0.75]


def test_measure_on_a_model():
    m = tiny.model("llama")
    cost = CostModel.measure(m, sizes=(1, 4, 16), repeats=2)
    assert cost.sizes == (1, 4, 16)
    assert all(t > 0 for t in cost.seconds)
    assert list(cost.seconds) == sorted(cost.seconds)
    runtime = select_runtime(m)  # the runtime an engine would take for a drafting method
    assert CostModel.for_runtime(m, runtime) is CostModel.for_runtime(m, runtime)  # measured once per runtime


# forward cost per tree size (seconds) at the two scales, flat and steep: the shipped model's measured shape
# (steep: 16 tokens cost 2.2x one), Qwen2.5-0.5B's shape in bfloat16 on the AMD EPYC of docs/bench.md (16
# tokens 1.5x, 64 tokens 4.4x), and a flat one (a CPU with AMX, or a GPU: 64 tokens cost what one does)
SIZES = (1, 2, 4, 8, 16, 32, 64)
CURVES = {
    ("tiny", "steep"): (4.3e-3, 4.8e-3, 5.4e-3, 6.9e-3, 9.6e-3, 14e-3, 24e-3),
    ("tiny", "flat"): (4.3e-3,) * 6 + (4.5e-3,),
    ("real", "steep"): (44.6e-3, 44.6e-3, 44.6e-3, 49.9e-3, 67.3e-3, 107.7e-3, 194.8e-3),
    ("real", "flat"): (101e-3, 101e-3, 102e-3, 103e-3, 108e-3, 110e-3, 115e-3),
}


@pytest.mark.parametrize("scale", ["tiny", "real"])
def test_trees_grow_when_cost_is_flat_and_shrink_when_it_is_steep(scale):
    """The same acceptance (a long chain that keeps being accepted 90% of the time, the edit task's kind),
    sized by auto's plan and by `CostModel.best_size` (recycle, Medusa, Hydra, draft): 32+ nodes on a flat
    curve, a handful on a steep one, at either scale."""
    from specdec.drafters.auto.planner import plan

    values = [0.9**k for k in range(1, 65)]  # node k accepted with chance 0.9^k
    gains = chain_gains([0.9] * 64)
    chosen = {}
    for shape in ("flat", "steep"):
        cost = CostModel.fit(SIZES, CURVES[(scale, shape)])
        n, _, _ = plan(values, cost, overhead=0.0)
        assert n == cost.best_size(gains)
        chosen[shape] = n
    assert chosen["flat"] >= 32
    assert 1 <= chosen["steep"] <= 16
