"""Adaptive levels: statistics of normalised magnitudes, ALQ / AMQ fitting, bit allocation.

Reference section 2.1.  For one type, the quantization variance of a gradient is

    E||Q(g) - g||^2 = sum_buckets ||v||_q^2 sum_i (u_i - l_j)(l_{j+1} - u_i),

so the right statistic is the distribution of ``u`` weighted by the squared norm of its
bucket: :class:`MagnitudeStats` keeps that as a histogram (quadratically spaced bins: the mass
of ``u`` sits near 0), additive so that workers can all-reduce it and fit identical levels.

Fitting (:func:`fit_alq`): coordinate descent over interior levels with the closed form

    l_j = F^{-1}( F(b) - (1/(b - a)) * integral_a^b (r - a) dF(r) ),   a = l_{j-1}, b = l_{j+1},

the exact minimiser in ``l_j`` of the (convex in ``l_j``) variance, from several
initialisations (quantiles of ``F``, uniform, exponential), keeping the best.
:func:`fit_amq` optimises the base of exponential levels instead.  :func:`allocate_bits`
chooses per-layer bit widths by dynamic programming under a total-size budget (L-GreCo).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qoda.quant.config import QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPlan
from qoda.quant.quantizer import TensorOrTensors
from qoda.quant.variance import normalized_magnitudes

DEFAULT_BINS = 2048
MIN_GAP = 1e-6  # smallest distance between fitted levels (they must stay distinct in float32)


@dataclass
class MagnitudeStats:
    """Norm-weighted histogram of ``u = |v_i| / ||v||_q`` (bins quadratic in ``u``)."""

    bins: int = DEFAULT_BINS
    decay: float = 0.0  # weight kept from older statistics at each update (0: only the latest)
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or self.bins < 8:
            raise ValueError(f"bins: must be an integer >= 8, got {self.bins!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {self.decay!r}")
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.float64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.bins + 1) ** 2

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return 0.5 * (e[1:] + e[:-1])

    def update(self, x: TensorOrTensors, config: QuantizerConfig) -> None:
        """Add the magnitudes of ``x`` (bucketed as ``config`` buckets it), weighted by ``||v||^2``."""
        _, nb, u = (t.cpu() for t in normalized_magnitudes(x, config))
        idx = np.minimum(np.searchsorted(self.edges, u.numpy(), side="right") - 1, self.bins - 1)
        new = np.bincount(idx, weights=nb.square().numpy(), minlength=self.bins)
        self.counts = self.decay * self.counts + new

    def variance(self, levels: LevelSet | np.ndarray) -> float:
        """Expected variance of ``levels`` under these statistics (bin centres as point masses)."""
        return expected_variance(self.centers, self.counts, _arr(levels))

    def state_dict(self) -> dict:
        return {"bins": self.bins, "decay": self.decay, "counts": self.counts.copy()}

    @classmethod
    def from_state_dict(cls, state: dict) -> MagnitudeStats:
        return cls(int(state["bins"]), float(state["decay"]), np.asarray(state["counts"], dtype=np.float64).copy())


def _arr(levels: LevelSet | np.ndarray) -> np.ndarray:
    return np.asarray(levels.values if isinstance(levels, LevelSet) else levels, dtype=np.float64)


def expected_variance(u: np.ndarray, w: np.ndarray, levels: np.ndarray) -> float:
    """``sum_k w_k (u_k - l_j)(l_{j+1} - u_k)`` with ``l_j <= u_k <= l_{j+1}``."""
    levels = np.asarray(levels, dtype=np.float64)
    j = np.clip(np.searchsorted(levels, u, side="right") - 1, 0, len(levels) - 2)
    return float(np.sum(w * (u - levels[j]) * (levels[j + 1] - u)))


def alq_update(u: np.ndarray, w: np.ndarray, cdf: np.ndarray, levels: np.ndarray, j: int) -> float:
    """The closed-form minimiser of the variance in ``l_j`` with its neighbours fixed.

    ``u`` sorted sample points with weights ``w`` and cumulative weights ``cdf``.
    """
    a, b = levels[j - 1], levels[j + 1]
    lo, hi = np.searchsorted(u, a, side="right"), np.searchsorted(u, b, side="right")
    if hi <= lo:
        new = 0.5 * (a + b)  # no mass between the neighbours: any point is optimal
    else:
        f_b = cdf[hi - 1]
        f_a = cdf[lo - 1] if lo > 0 else 0.0
        moment = float(np.dot(w[lo:hi], u[lo:hi] - a)) / (b - a)
        target = f_b - moment  # F(l) = F(b) - (1/(b-a)) int_a^b (r - a) dF
        k = int(np.searchsorted(cdf[lo:hi], target - 1e-15 * max(1.0, f_b), side="left")) + lo
        new = u[min(k, hi - 1)] if target > f_a else a
    return float(np.clip(new, a + MIN_GAP, b - MIN_GAP))


def _alq_sweeps(u: np.ndarray, w: np.ndarray, levels: np.ndarray, sweeps: int, tol: float) -> np.ndarray:
    """Coordinate descent with the closed-form update on the discrete distribution (u, w)."""
    cdf = np.cumsum(w)
    lv = levels.copy()
    for _ in range(sweeps):
        moved = 0.0
        for j in range(1, len(lv) - 1):
            new = alq_update(u, w, cdf, lv, j)
            moved = max(moved, abs(new - lv[j]))
            lv[j] = new
        if moved < tol:
            break
    return lv


def _valid(levels: np.ndarray) -> LevelSet | None:
    try:
        return LevelSet(tuple(float(v) for v in levels), family="fitted")
    except ValueError:
        return None


def fit_alq(stats: MagnitudeStats, s: int, sweeps: int = 60, tol: float = 1e-7) -> LevelSet:
    """ALQ levels with ``s`` interior levels: best of several initialisations after coordinate descent."""
    if s < 0:
        raise ValueError(f"s: must be >= 0, got {s}")
    u, w = stats.centers, stats.counts
    if s == 0 or float(w.sum()) == 0.0:
        return LevelSet.uniform(s)
    inits = [LevelSet.uniform(s).array.astype(np.float64)]
    if 0.5**s > 1e-30:
        inits.append(LevelSet.exponential(s, 0.5).array.astype(np.float64))
    cdf = np.cumsum(w) / w.sum()
    q = np.interp(np.arange(1, s + 1) / (s + 1), cdf, u)
    inits.append(np.concatenate([[0.0], np.maximum.accumulate(q + MIN_GAP * np.arange(1, s + 1)), [1.0]]))
    best, best_var = LevelSet.uniform(s), math.inf
    for init in inits:
        init = np.clip(init, 0.0, 1.0)
        init[0], init[-1] = 0.0, 1.0
        cand = _valid(_alq_sweeps(u, w, init, sweeps, tol))
        if cand is None:
            continue
        var = stats.variance(cand)
        if var < best_var:
            best, best_var = cand, var
    return best


def fit_amq(stats: MagnitudeStats, s: int, iters: int = 60) -> LevelSet:
    """AMQ: exponential levels ``0, p^s, ..., p, 1`` with the base ``p`` minimising the variance."""
    if s == 0:
        return LevelSet.uniform(0)
    # p^s must stay a normal float32 (and distinct from p^(s-1)): p >= 1e-30^(1/s)
    lo, hi = max(0.05, math.exp(math.log(1e-30) / s)), 0.99
    phi = (math.sqrt(5) - 1) / 2

    def f(p: float) -> float:
        return stats.variance(LevelSet.exponential(s, p))

    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - phi * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = f(b)
    return LevelSet.exponential(s, 0.5 * (lo + hi))


def levels_for_bits(bits: int) -> int:
    """Interior levels ``s`` whose fixed-width code (sign + index) fits ``bits``."""
    return 2 ** (bits - 1) - 2


def allocate_bits(
    errors: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, resolution: int = 2000
) -> list[int]:
    """Choose one option per layer minimising ``sum errors[i][k]`` with ``sum costs[i][k] <= budget``.

    Knapsack by dynamic programming over the cost *above* each layer's cheapest option, rounded
    up to ``(budget - sum of cheapest) / resolution`` units: the chosen allocation always meets
    the real budget, and the all-cheapest allocation is always feasible.  Raises if even the
    cheapest options do not fit.
    """
    n = len(errors)
    base = [min(row) for row in costs]
    slack = budget - sum(base)
    if slack < -1e-9 * max(1.0, abs(budget)):
        raise ValueError("budget: too small for the cheapest option of every layer")
    if slack <= 1e-9 * max(1.0, abs(budget)):  # only the cheapest options fit
        return [int(np.argmin(row)) for row in costs]
    unit = slack / resolution
    c_units = [[math.ceil((c - b) / unit - 1e-9) for c in row] for row, b in zip(costs, base, strict=True)]
    inf = math.inf
    dp = np.full(resolution + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((n, resolution + 1), dtype=np.int64)
    for i in range(n):
        new = np.full(resolution + 1, inf)
        for k, (e, c) in enumerate(zip(errors[i], c_units[i], strict=True)):
            if c > resolution:
                continue
            shifted = np.full(resolution + 1, inf)
            shifted[c:] = dp[: resolution + 1 - c] + e
            better = shifted < new
            new[better] = shifted[better]
            choice[i, better] = k
        dp = new
    end = int(np.argmin(dp))
    picks = [0] * n
    cap = end
    for i in range(n - 1, -1, -1):
        k = int(choice[i, cap])
        picks[i] = k
        cap -= c_units[i][k]
    return picks


@dataclass(frozen=True)
class RefitSchedule:
    """Re-fit at ``milestones`` (warm-up) and then every ``every`` steps (defaults: 0/200/1000/5000, 5000)."""

    milestones: tuple[int, ...] = (0, 200, 1000, 5000)
    every: int = 5000

    def __post_init__(self) -> None:
        if self.every < 1 or any(m < 0 for m in self.milestones):
            raise ValueError("schedule: milestones must be >= 0 and every >= 1")

    def due(self, step: int) -> bool:
        last = max(self.milestones, default=0)
        return step in self.milestones or (step > last and (step - last) % self.every == 0)


FIT_METHODS = ("alq", "amq")


@dataclass(frozen=True)
class AdaptConfig:
    """How levels adapt during training.

    Attributes:
        method: ``alq`` (coordinate descent, several initialisations) or ``amq`` (exponential base).
        schedule: when to re-fit (default 0/200/1000/5000, then every 5000 steps).
        observe_every: gather statistics every this many steps (and at every re-fit step).
        bins: histogram bins per type.
    """

    method: str = "alq"
    schedule: RefitSchedule = field(default_factory=RefitSchedule)
    observe_every: int = 10
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise ValueError(f"method: expected one of {FIT_METHODS}, got {self.method!r}")
        if not isinstance(self.observe_every, int) or self.observe_every < 1:
            raise ValueError(f"observe_every: must be a positive int, got {self.observe_every!r}")


class LevelAdapter:
    """Per-type statistics and level re-fitting on a schedule, identical on every worker.

    Every worker calls :meth:`observe` with its gradients and :meth:`refit` at every step.
    Re-fitting sums the statistics over workers with ``reduce`` (for example
    :func:`qoda.comm.aggregate.allreduce_sum`) and then fits deterministically, so all
    workers derive the same levels; the new plan's fingerprint changes, and receivers reject
    payloads quantized with other levels (level-set id in every header).
    """

    def __init__(
        self, plan: LayerPlan, config: AdaptConfig | None = None, reduce: object | None = None
    ) -> None:
        self.plan = plan
        self.config = config or AdaptConfig()
        self.reduce = reduce
        self.stats = {t: MagnitudeStats(self.config.bins) for t in plan.types}
        self.fits = 0
        self.last_fit_step = -1

    def observe(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        """Add this worker's gradients (plan order) to the statistics if ``step`` is an observation step."""
        if step % self.config.observe_every and not self.config.schedule.due(step):
            return
        for t in self.plan.types:
            layers = [tensors[i] for i in self.plan.indices(t)]
            self.stats[t].update(layers, self.plan.configs[t])

    def refit(self, step: int, force: bool = False) -> object | None:
        """Re-fit if ``step`` is due (or ``force``) and statistics exist; returns the new plan (else ``None``).

        Every worker must call it at the same steps with the same ``force``: it all-reduces.
        """
        if not (force or self.config.schedule.due(step)) or step == self.last_fit_step:
            return None
        counts = np.stack([self.stats[t].counts for t in self.plan.types])
        if self.reduce is not None:
            counts = np.asarray(self.reduce(counts), dtype=np.float64)
        if float(counts.sum()) == 0.0:
            return None
        configs = dict(self.plan.configs)
        for t, c in zip(self.plan.types, counts, strict=True):
            stats = MagnitudeStats(self.config.bins, 0.0, c.copy())
            cfg = configs[t]
            fit = fit_alq if self.config.method == "alq" else fit_amq
            levels = fit(stats, cfg.levels.s)
            configs[t] = replace(cfg, levels=levels)
        self.plan = type(self.plan)(self.plan.entries, configs)
        self.stats = {t: MagnitudeStats(self.config.bins) for t in self.plan.types}
        self.fits += 1
        self.last_fit_step = step
        return self.plan

    def state_dict(self) -> dict:
        return {
            "levels": {t: list(self.plan.configs[t].levels.values) for t in self.plan.types},
            "stats": {t: s.state_dict() for t, s in self.stats.items()},
            "fits": self.fits,
            "last_fit_step": self.last_fit_step,
        }

    def load_state_dict(self, state: dict) -> None:
        configs = dict(self.plan.configs)
        for t, values in state["levels"].items():
            if t not in configs:
                raise ValueError(f"adapter state: type {t!r} is not in this plan")
            c = configs[t]
            configs[t] = replace(c, levels=LevelSet(tuple(values), "fitted"))
        self.plan = type(self.plan)(self.plan.entries, configs)
        self.stats = {t: MagnitudeStats.from_state_dict(s) for t, s in state["stats"].items()}
        self.fits = int(state["fits"])
        self.last_fit_step = int(state["last_fit_step"])
