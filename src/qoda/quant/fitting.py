"""Level fitting: statistics of normalised magnitudes and ALQ / AMQ fitting.

docs/method.md section 2.1.  For one type, the quantization variance of a gradient is

    E||Q(g) - g||^2 = sum_buckets ||v||_q^2 sum_i (u_i - l_j)(l_{j+1} - u_i),

so the right statistic is the distribution of ``u`` weighted by the squared norm of its
bucket: :class:`MagnitudeStats` keeps that as a histogram (quadratically spaced bins: the mass
of ``u`` sits near 0), additive so that workers can all-reduce it and fit identical levels.

Fitting (:func:`fit_alq`): coordinate descent over interior levels with the closed form

    l_j = F^{-1}( F(b) - (1/(b - a)) * integral_a^b (r - a) dF(r) ),   a = l_{j-1}, b = l_{j+1},

the exact minimiser in ``l_j`` of the (convex in ``l_j``) variance, from several
initialisations (quantiles of ``F``, uniform, exponential), keeping the best.
:func:`fit_amq` optimises the base of exponential levels instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # (Python floats, ndarray methods and min/max: the same IEEE values as NumPy scalars and the
    # np.* functions, without their dispatch cost, which dominated the level fits)
    a, b = float(levels[j - 1]), float(levels[j + 1])
    lo, hi = int(u.searchsorted(a, "right")), int(u.searchsorted(b, "right"))
    if hi <= lo:
        new = 0.5 * (a + b)  # no mass between the neighbours: any point is optimal
    else:
        f_b = cdf[hi - 1]
        f_a = cdf[lo - 1] if lo > 0 else 0.0
        moment = float(np.dot(w[lo:hi], u[lo:hi] - a)) / (b - a)
        target = f_b - moment  # F(l) = F(b) - (1/(b-a)) int_a^b (r - a) dF
        k = int(cdf[lo:hi].searchsorted(target - 1e-15 * max(1.0, f_b), "left")) + lo
        new = u[min(k, hi - 1)] if target > f_a else a
    return float(min(max(new, a + MIN_GAP), b - MIN_GAP))  # np.clip's value, also when a + gap > b - gap


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


def plan_statistics(
    plan: LayerPlan, tensors: Sequence[torch.Tensor], per_tensor: bool = False, bins: int = DEFAULT_BINS,
    into: dict[str, MagnitudeStats] | None = None,
) -> dict[str, MagnitudeStats]:  # fmt: skip
    """Statistics of ``tensors`` (one per entry of the :class:`~qoda.quant.policy.LayerPlan`
    ``plan``, in order), bucketed as each entry's type is: one :class:`MagnitudeStats` per type,
    or per compressed tensor (by entry name) with ``per_tensor``.  Added to ``into`` when given."""
    out = into if into is not None else {}
    if per_tensor:
        for e, x in zip(plan.entries, tensors, strict=True):
            if e.type_name is not None:
                out.setdefault(e.name, MagnitudeStats(bins)).update(x, plan.configs[e.type_name])
        return out
    for t in plan.types:
        layers = [tensors[i] for i in plan.indices(t)]
        out.setdefault(t, MagnitudeStats(bins)).update(layers, plan.configs[t])
    return out
