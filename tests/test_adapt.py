"""Adaptive levels: the closed-form ALQ update, fitting, bit allocation, schedule, state."""

import itertools

import numpy as np
import pytest
import torch

from qoda.quant.adapt import (
    MagnitudeStats,
    RefitSchedule,
    allocate_bits,
    alq_update,
    expected_variance,
    fit_alq,
    fit_amq,
    levels_for_bits,
)
from qoda.quant.config import QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.variance import exact_variance
from qoda.report.digits import DigitsCNN


@pytest.fixture(scope="module")
def real_grads(real_gradients):
    """The digits CNN's weight gradients after 100 SGD steps (tensors of >= 1024 coordinates)."""
    return [g for g in real_gradients[1] if g.numel() >= 1024]


def test_closed_form_update_is_the_coordinate_minimiser():
    """The ALQ update lands on the minimum of the variance over l_j in (a, b) (brute force)."""
    rng = np.random.default_rng(0)
    u = np.sort(rng.beta(0.7, 4.0, 3000))
    w = rng.random(3000)
    cdf = np.cumsum(w)
    levels = np.array([0.0, 0.1, 0.3, 0.6, 1.0])
    for j in range(1, 4):
        closed = levels.copy()
        closed[j] = alq_update(u, w, cdf, levels, j)
        best = np.inf
        for g in np.linspace(levels[j - 1] + 1e-6, levels[j + 1] - 1e-6, 20001):
            trial = levels.copy()
            trial[j] = g
            best = min(best, expected_variance(u, w, trial))
        assert expected_variance(u, w, closed) <= best * (1 + 1e-9) + 1e-12


def test_fitted_levels_beat_uniform_and_exponential_on_real_gradients(real_grads):
    for bits in (3, 4, 6):
        cfg = QuantizerConfig.qsgd(bits, 1024)
        stats = MagnitudeStats()
        stats.update(real_grads, cfg)
        s = levels_for_bits(bits)
        alq, amq = fit_alq(stats, s), fit_amq(stats, s)
        candidates = {"qsgd": LevelSet.uniform(s), "nuqsgd": LevelSet.exponential(s), "alq": alq, "amq": amq}
        v = {name: exact_variance(real_grads, QuantizerConfig(lv, 1024)) for name, lv in candidates.items()}
        assert v["alq"] <= min(v["qsgd"], v["nuqsgd"]) * (1 + 1e-6), (bits, v)
        assert v["amq"] <= v["nuqsgd"] * (1 + 1e-6), (bits, v)
        # the histogram objective is the exact variance up to binning
        assert abs(stats.variance(alq) - v["alq"]) <= 0.02 * v["alq"]


def test_stats_are_additive_for_all_reduce():
    cfg = QuantizerConfig.qsgd(4, 64)
    a, b = torch.randn(1000), torch.randn(500)
    sa, sb, sab = MagnitudeStats(), MagnitudeStats(), MagnitudeStats()
    sa.update(a, cfg)
    sb.update(b, cfg)
    sab.update([a, b], cfg)
    assert np.allclose(sa.counts + sb.counts, sab.counts)
    # each coordinate weighs its bucket's ||v||^2: total = sum_b n_b ||v_b||^2
    total = sum(float(c.numel() * c.double().square().sum()) for t in (a, b) for c in t.split(64))
    assert np.isclose(sab.counts.sum(), total)


def test_stats_state_round_trip_and_validation():
    st = MagnitudeStats(bins=64, decay=0.5)
    st.update(torch.randn(300), QuantizerConfig())
    back = MagnitudeStats.from_state_dict(st.state_dict())
    assert np.array_equal(back.counts, st.counts) and back.bins == 64
    assert fit_alq(back, 6) == fit_alq(st, 6)
    with pytest.raises(ValueError, match="bins"):
        MagnitudeStats(bins=2)
    with pytest.raises(ValueError, match="decay"):
        MagnitudeStats(decay=1.0)


def test_bit_allocation_is_optimal_and_meets_the_budget():
    rng = np.random.default_rng(1)
    numels = [1000, 5000, 200, 3000]
    options = [2, 4, 8]
    errors = [[float(rng.random()) * 4.0 ** (-b / 2) * n for b in options] for n in numels]
    costs = [[n * b for b in options] for n in numels]
    budget = 4.0 * sum(numels)
    picks = allocate_bits(errors, costs, budget)
    assert sum(costs[i][k] for i, k in enumerate(picks)) <= budget
    brute = min(
        (sum(errors[i][k] for i, k in enumerate(combo)), combo)
        for combo in itertools.product(range(3), repeat=4)
        if sum(costs[i][k] for i, k in enumerate(combo)) <= budget
    )
    assert sum(errors[i][k] for i, k in enumerate(picks)) <= brute[0] * (1 + 1e-9) + 1e-12
    exact = allocate_bits(errors, costs, 2.0 * sum(numels))  # only the all-cheapest allocation fits
    assert exact == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="budget"):
        allocate_bits(errors, costs, 1.0 * sum(numels))


def test_refit_schedule():
    sch = RefitSchedule((0, 200, 1000), every=500)
    due = [t for t in range(0, 2600) if sch.due(t)]
    assert due == [0, 200, 1000, 1500, 2000, 2500]
    with pytest.raises(ValueError, match="schedule"):
        RefitSchedule(every=0)


def _plan():
    from qoda.quant.policy import LayerPolicy

    return LayerPolicy.by_module_class(QuantizerConfig.qsgd(4, 512)).plan(DigitsCNN())


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e.shape, generator=g) * (0.1 + i) for i, e in enumerate(_plan().entries)]


def test_adapter_workers_fit_identical_levels_from_summed_statistics():
    from qoda.quant.adapt import AdaptConfig, LevelAdapter

    cfg = AdaptConfig(schedule=RefitSchedule((0, 20), every=50), observe_every=5)
    snapshot: dict[int, np.ndarray] = {}

    def all_reduce_sum(_counts):  # simulated all-reduce: every worker gets the sum over workers
        return snapshot[0] + snapshot[1]

    workers = [LevelAdapter(_plan(), cfg, reduce=all_reduce_sum) for _ in range(2)]
    plans = []
    for step in range(0, 21):
        for w, a in enumerate(workers):
            a.observe(step, _grads(100 * w + step))
            snapshot[w] = np.stack([a.stats[t].counts for t in a.plan.types])
        plans.append([a.refit(step) for a in workers])
    fitted = [p for p in plans if p[0] is not None]
    assert len(fitted) == 2  # steps 0 and 20
    for p0, p1 in fitted:
        assert p0.fingerprint() == p1.fingerprint()
        assert all(p0.configs[t].levels.family == "fitted" for t in p0.types)
        assert all(p0.configs[t].bits == 4 and p0.configs[t].bucket_size == 512 for t in p0.types)


def test_adapter_state_round_trip():
    from qoda.quant.adapt import AdaptConfig, LevelAdapter

    cfg = AdaptConfig(schedule=RefitSchedule((0, 10), every=10), observe_every=1)
    a, b = LevelAdapter(_plan(), cfg), LevelAdapter(_plan(), cfg)
    for step in range(15):
        a.observe(step, _grads(step))
        a.refit(step)
    b.load_state_dict(a.state_dict())
    assert b.plan.fingerprint() == a.plan.fingerprint()
    for step in range(15, 31):
        for ad in (a, b):
            ad.observe(step, _grads(step))
            ad.refit(step)
    assert a.fits == b.fits == 4 and b.plan.fingerprint() == a.plan.fingerprint()  # steps 0, 10, 20, 30
    with pytest.raises(ValueError, match="method"):
        AdaptConfig(method="magic")


@pytest.mark.parametrize("shape", [(0.5, 3.0), (1.0, 1.0), (0.3, 8.0)])
def test_descent_never_increases_the_expected_variance(shape):
    from qoda.quant.adapt import _alq_sweeps

    rng = np.random.default_rng(2)
    u = np.sort(rng.beta(*shape, 5000))
    w = rng.random(5000)
    for s in (1, 6, 30):
        for init in (LevelSet.uniform(s), LevelSet.exponential(s)):
            start = init.array.astype(np.float64)
            after = _alq_sweeps(u, w, start, sweeps=40, tol=0.0)
            assert expected_variance(u, w, after) <= expected_variance(u, w, start) * (1 + 1e-12)
