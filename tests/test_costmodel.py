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
