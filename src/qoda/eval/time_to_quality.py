"""Time to quality: when a run first reaches a quality target, and what it reaches in a time budget.

A run's *curve* is its evaluations as ``(seconds, value)`` points in time order, ``value`` a loss
(lower is better: FID, validation cross-entropy).  ``seconds`` is the training clock: the sum of
the step times up to the evaluated step (:func:`training_clock`), so that evaluations, which every
row pays alike, do not dilute the comparison.

* :func:`first_crossing`: the first time the curve is at or below the target, linearly
  interpolated between the last evaluation above it and the first at or below it (a value equal
  to the target counts as reached; a noisy curve that dips below and rises again has crossed at
  the dip); ``None`` if no evaluation reaches it.  Linear interpolation assumes the loss moved
  steadily between two evaluations: the error is at most one evaluation interval.
* :func:`quality_at`: the curve's value at a wall-clock budget, linearly interpolated between
  the evaluations around it; ``None`` outside the evaluated span (no extrapolation).
* :func:`seed_summary`: median and spread over seeds of a quantity that may be missing (a seed
  that never reached the target counts as later than every seed that did: the median is ``None``
  when half or more never did).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

Curve = Sequence[tuple[float, float]]


def _check(curve: Curve) -> None:
    times = [t for t, _ in curve]
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("curve: times must be non-decreasing")
    if any(not (math.isfinite(t) and math.isfinite(v)) for t, v in curve):
        raise ValueError("curve: times and values must be finite")


def first_crossing(curve: Curve, target: float) -> float | None:
    """The first time ``curve`` reaches ``value <= target`` (interpolated; see the module docstring)."""
    _check(curve)
    for i, (t, v) in enumerate(curve):
        if v <= target:
            if i == 0:
                return t
            t0, v0 = curve[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v)  # v0 > target >= v
    return None


def quality_at(curve: Curve, seconds: float) -> float | None:
    """The value of ``curve`` at ``seconds`` (interpolated), ``None`` outside its span."""
    _check(curve)
    if not curve or seconds < curve[0][0] or seconds > curve[-1][0]:
        return None
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        if t0 <= seconds <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (seconds - t0) / (t1 - t0)
    return curve[-1][1]  # a one-point curve at exactly ``seconds``


def training_clock(history: Sequence[dict[str, Any]], steps: Sequence[int]) -> list[float]:
    """Training seconds at each of ``steps``: the sum of the step times up to it, from the log
    windows of ``history`` (rows with ``step`` and the window's mean ``step_seconds``).  Each step
    must end a log window (``log_every`` dividing ``eval_every``)."""
    clock, done, total = {0: 0.0}, 0, 0.0
    for h in history:
        total += h["step_seconds"] * (int(h["step"]) - done)
        done = int(h["step"])
        clock[done] = total
    missing = [s for s in steps if s not in clock]
    if missing:
        raise ValueError(f"training_clock: steps {missing} end no log window (make log_every divide eval_every)")
    return [clock[s] for s in steps]


def seed_summary(xs: Sequence[float | None]) -> dict[str, Any]:
    """``median``, ``min``, ``max`` over the seeds, ``n`` seeds and ``reached`` (not ``None``).
    Missing values rank above every present one: the median is ``None`` unless more than half
    are present; ``max`` is ``None`` if any is missing."""
    present = sorted(x for x in xs if x is not None)
    n = len(xs)
    ranked = present + [math.inf] * (n - len(present))
    med = statistics.median(ranked) if ranked else math.inf
    return {
        "median": med if math.isfinite(med) else None,
        "min": present[0] if present else None,
        "max": present[-1] if len(present) == n and present else None,
        "n": n,
        "reached": len(present),
    }


def auto_target(reference: Sequence[Curve], fraction: float = 0.75) -> float:
    """A target every reference run reaches within the first ``fraction`` of its evaluations: the
    largest over the runs of the best value among those evaluations."""
    if not reference or not 0 < fraction <= 1:
        raise ValueError("auto_target: needs reference curves and a fraction in (0, 1]")
    best = []
    for c in reference:
        _check(c)
        k = max(1, math.ceil(fraction * len(c)))
        best.append(min(v for _, v in c[:k]))
    return max(best)


def median_band(curves: Sequence[Curve], grid: Sequence[float]) -> list[tuple[float, float, float, float]]:
    """``(t, median, min, max)`` over ``curves`` at each ``t`` of ``grid`` that every curve spans."""
    out = []
    for t in grid:
        vals = [quality_at(c, t) for c in curves]
        if vals and all(v is not None for v in vals):
            got = [v for v in vals if v is not None]
            out.append((t, statistics.median(got), min(got), max(got)))
    return out


def limiting_cost(steps_ratio: float | None, other_step: float, split: dict[str, float], target: float) -> str:
    """What keeps a row's speed-up over another below ``target``, from the measured breakdown.

    The time to target is steps x step seconds, so the speed-up is ``steps_ratio`` (the other's
    steps to target over this row's: quality per step) times the step-time ratio ``other_step /
    step``, where this row's step is ``compute + encode + comm + decode`` (``split``).  A free link
    and codec would give at most ``steps_ratio * other_step / compute``: if even that is below
    ``target``, compute decides (with quality per step when ``steps_ratio < 1``); otherwise the larger
    of the link (``comm``) and the codec (``encode + decode``).  ``"met"`` when the speed-up reaches
    ``target``; ``"quality"`` when either never reaches the quality target (no steps ratio)."""
    if steps_ratio is None:
        return "quality: the target is not reached in at least half of the seeds"
    compute, codec, link = split["compute"], split["encode"] + split["decode"], split["comm"]
    step = compute + codec + link
    if step <= 0 or steps_ratio * other_step / step >= target:
        return "met"
    per_step = f"quality per step ({1 / steps_ratio:.2f}x the steps); " if steps_ratio < 1 else ""
    bound = steps_ratio * other_step / compute if compute > 0 else math.inf
    if bound < target:
        return (f"{per_step}compute: {compute:.3f} of {step:.3f} s per step; with a free link and codec the "
                f"speed-up would be at most {bound:.2f}x")  # fmt: skip
    name, part = ("link", link) if link >= codec else ("codec", codec)
    return f"{per_step}{name}: {part:.3f} of {step:.3f} s per step (compute {compute:.3f} s)"
