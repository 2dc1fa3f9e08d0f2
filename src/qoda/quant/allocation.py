"""Layer-wise bit allocation: per-tensor widths under an average-bits budget (L-GreCo style).

Where the layer-wise gain lives (``qoda bench variance``): at equal bits, levels fitted per
layer type are no better than one global fitted level set; the gain comes from giving more
bits to the tensors whose gradients carry more energy.  :func:`allocate_plan` does that.

For compressed tensors ``i`` (the plan's typed entries) with statistics ``S_i``
(:class:`~qoda.quant.fitting.MagnitudeStats`), widths ``b`` from ``widths`` and a budget of
``B`` bits per coordinate over *all* the plan's coordinates:

1. per (type ``t``, width ``b``): levels ``L_{t,b}`` fitted (ALQ or AMQ) to the type's summed
   statistics ``sum_{i in t} S_i``;
2. ``error_i(b) = S_i.variance(L_{t(i),b})`` (the exact expected variance, docs/method.md section 2.1) and
   ``cost_i(b) = numel_i * b`` code bits;
3. the budget's fixed part is measured, not guessed: ``message_bits`` of the plan with every
   tensor at the smallest width (norms, headers, layer sizes, raw tensors, padding) plus, for
   every segment a split by width can add, that segment's framing; the rest is the slack the
   dynamic programme (:func:`allocate_bits`) spends on widths;
4. the tensors of type ``t`` given width ``b`` form one new type ``"t/<b>bit"`` (one segment on
   the wire, one level set); its levels are re-fitted to that group's statistics (kept only when
   they beat ``L_{t,b}`` on the group).

The result meets the budget by construction and is checked against ``message_bits`` of the final
plan.  It is a deterministic function of the statistics, so workers that all-reduce their
statistics derive the same widths and levels (the plan fingerprint, sent in every message
header, changes with them: a worker with another allocation is rejected).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from qoda.quant.config import QuantizerConfig
from qoda.quant.fitting import MagnitudeStats, fit_alq, fit_amq, levels_for_bits
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.quant.quantizer import num_buckets

#: Widths the allocation chooses from by default (sign + index bits per coordinate).
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
#: Largest exact dynamic programme (cost units); larger problems are rounded (still feasible).
EXACT_UNITS = 1 << 18

MessageBits = Callable[[LayerPlan], int]


def allocate_bits(
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    resolution: int = 4096,
) -> list[int]:
    """Choose one option per layer minimising ``sum errors[i][k]`` with ``sum costs[i][k] <= budget``.

    Knapsack by dynamic programming over the cost *above* each layer's cheapest option.  Integer
    costs are solved exactly (in units of their greatest common divisor) when the slack is at
    most :data:`EXACT_UNITS` units; otherwise costs are rounded *up* to ``slack / resolution``
    units, so the allocation always meets the real budget and the all-cheapest allocation is
    always feasible.  Raises if even the cheapest options do not fit.
    """
    base = [min(row) for row in costs]
    slack = budget - sum(base)
    tol = 1e-9 * max(1.0, abs(budget))
    if slack < -tol:
        raise ValueError("budget: too small for the cheapest option of every layer")
    cheapest = [int(np.argmin(row)) for row in costs]
    extra = [[c - b for c in row] for row, b in zip(costs, base, strict=True)]
    if slack <= tol:  # only the cheapest options fit
        return cheapest
    c_units: list[list[int]]
    if all(float(x).is_integer() for row in extra for x in row):
        g = 0
        for row in extra:
            for x in row:
                g = math.gcd(g, int(x))
        cap = 0 if g == 0 else int((slack + tol) // g)  # g == 0: every option costs the same
        if cap <= EXACT_UNITS:
            c_units = [[int(x) // max(g, 1) for x in row] for row in extra]
            return _knapsack(errors, c_units, cap) if cap > 0 else _cheapest_best(errors, costs)
    unit = slack / resolution
    c_units = [[math.ceil(x / unit - 1e-9) for x in row] for row in extra]
    return _knapsack(errors, c_units, resolution)


def _cheapest_best(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]) -> list[int]:
    """Among each layer's cheapest options, the one with the least error."""
    picks = []
    for e, c in zip(errors, costs, strict=True):
        lo = min(c)
        picks.append(min((k for k in range(len(c)) if c[k] == lo), key=lambda k: e[k]))
    return picks


def _knapsack(errors: Sequence[Sequence[float]], c_units: Sequence[Sequence[int]], cap: int) -> list[int]:
    n = len(errors)
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        for k, (e, c) in enumerate(zip(errors[i], c_units[i], strict=True)):
            if c > cap:
                continue
            shifted = np.full(cap + 1, np.inf)
            shifted[c:] = dp[: cap + 1 - c] + e
            better = shifted < new
            new[better] = shifted[better]
            choice[i, better] = k
        dp = new
    end = int(np.argmin(dp))
    picks = [0] * n
    for i in range(n - 1, -1, -1):
        k = int(choice[i, end])
        picks[i] = k
        end -= c_units[i][k]
    return picks


def width_type(type_name: str, bits: int) -> str:
    """The type of the tensors of ``type_name`` given ``bits`` bits: ``"generator.conv/3bit"``."""
    return f"{type_name}/{bits}bit"


def estimate_message_bits(plan: LayerPlan) -> int:
    """Codes, bucket norms (float32) and uncompressed tensors (float32), without headers.

    The quantizer's own share of the wire; :mod:`qoda.comm` passes the codec's exact
    message size (headers included) instead.
    """
    total = 0
    for e in plan.entries:
        if e.type_name is None:
            total += 32 * e.numel
        else:
            cfg = plan.configs[e.type_name]
            total += cfg.bits * e.numel + 32 * num_buckets((e.numel,), cfg.bucket_size)
    return total


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    w = tuple(widths)
    if not w or any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 12 for b in w):
        raise ValueError(f"widths: must be integers in [2, 12], got {widths!r}")
    if len(set(w)) != len(w):
        raise ValueError(f"widths: must be distinct, got {widths!r}")
    return tuple(sorted(w))


@dataclass(frozen=True)
class Allocation:
    """A bit-allocated plan and what it costs.

    Attributes:
        plan: types ``"<type>/<b>bit"`` (one per type and width in use), levels fitted per type.
        widths: bits per coordinate of every compressed tensor (by entry name).
        budget: the average bits per coordinate allowed (all bits on the wire counted).
        message_bits: bits of one full message of ``plan`` (as ``message_bits`` counts them).
        numel: coordinates of the plan (compressed and uncompressed).
        variance: expected ``E||Q(g) - g||^2`` of the statistics under ``plan`` (their units).
    """

    plan: LayerPlan
    widths: Mapping[str, int]
    budget: float
    message_bits: int
    numel: int
    variance: float

    @property
    def average_bits(self) -> float:
        """Bits on the wire per coordinate."""
        return self.message_bits / self.numel if self.numel else 0.0


def _with_bits(config: QuantizerConfig, bits: int, levels: LevelSet | None = None) -> QuantizerConfig:
    return replace(config, levels=levels if levels is not None else LevelSet.for_bits(bits))


def _fit(stats: MagnitudeStats, bits: int, method: str) -> LevelSet:
    fit = fit_alq if method == "alq" else fit_amq
    return fit(stats, levels_for_bits(bits))


def _summed(stats: Sequence[MagnitudeStats], bins: int) -> MagnitudeStats:
    total = np.zeros(bins, dtype=np.float64)
    for s in stats:
        total += s.counts
    return MagnitudeStats(bins, 0.0, total)


def allocated_plan(base: LayerPlan, widths: Mapping[str, int], levels: Mapping[str, LevelSet]) -> LayerPlan:
    """The plan giving every compressed entry of ``base`` its width (types ``"t/<b>bit"``) and each
    such type its levels (``levels`` by derived type; uniform levels where missing)."""
    entries, configs = [], {}
    for e in base.entries:
        if e.type_name is None:
            entries.append(e)
            continue
        if e.name not in widths:
            raise ValueError(f"widths: no width for tensor {e.name!r}")
        b = int(widths[e.name])
        t = width_type(e.type_name, b)
        entries.append(LayerEntry(e.name, e.shape, t))
        if t not in configs:
            lv = levels.get(t)
            if lv is not None and lv.code_bits != b:
                raise ValueError(f"levels: {t!r} has {len(lv.values)} levels, which do not fit {b} bits")
            configs[t] = _with_bits(base.configs[e.type_name], b, lv)
    return LayerPlan(tuple(entries), configs)


def _fixed_bits(base: LayerPlan, widths: Sequence[int], message_bits: MessageBits) -> tuple[int, int]:
    """Step 3: the budget's fixed part (``message_bits`` of the all-smallest plan less its codes)
    and the reserve for the framing of the segments a split by width can add."""
    units = [e for e in base.entries if e.type_name is not None]
    wmin = widths[0]
    cheapest = allocated_plan(base, {e.name: wmin for e in units}, {})
    fixed = message_bits(cheapest) - sum(e.numel * wmin for e in units)
    extra_segments, framing = 0, 0
    for t in base.types:
        members = [e for e in units if e.type_name == t]
        extra_segments += min(len(members), len(widths)) - 1
    if extra_segments:  # one more segment's framing: split one tensor of a multi-tensor type off
        t = next(t for t in base.types if sum(e.type_name == t for e in units) > 1)
        first = next(e for e in units if e.type_name == t)
        split = LayerPlan(
            tuple(LayerEntry(e.name, e.shape, f"{e.type_name}/split") if e.name == first.name else e
                      for e in cheapest.entries),
            {**cheapest.configs, width_type(t, wmin) + "/split": cheapest.configs[width_type(t, wmin)]},
        )  # fmt: skip
        framing = message_bits(split) - message_bits(cheapest) + 16  # + padding of both segments
    return fixed, extra_segments * framing + 8 * (len(base.types) + extra_segments)


def minimum_budget(
    base: LayerPlan, widths: Sequence[int] = WIDTHS, message_bits: MessageBits = estimate_message_bits
) -> float:
    """The smallest budget (bits per coordinate) :func:`allocate_plan` accepts for ``base``: every
    tensor at the smallest width plus the fixed part and the framing reserve."""
    widths = check_widths(widths)
    fixed, reserve = _fixed_bits(base, widths, message_bits)
    numel = sum(e.numel for e in base.entries)
    codes = sum(e.numel * widths[0] for e in base.entries if e.type_name is not None)
    return (fixed + reserve + codes) / max(numel, 1) * (1 + 1e-12) + 1e-12


def allocate_plan(
    base: LayerPlan,
    stats: Mapping[str, MagnitudeStats],
    budget: float,
    widths: Sequence[int] = WIDTHS,
    method: str = "alq",
    message_bits: MessageBits = estimate_message_bits,
) -> Allocation:
    """Per-tensor widths and per-(type, width) levels minimising the expected variance under
    ``budget`` bits per coordinate (see the module docstring, steps 1-4).

    ``stats``: statistics per compressed entry name (missing or empty: a proxy that spreads
    the bits evenly, used before any statistics exist).  ``message_bits``: bits of one message
    of a plan, every bit on the wire included (default: :func:`estimate_message_bits`).
    """
    widths = check_widths(widths)
    if not isinstance(budget, int | float) or isinstance(budget, bool) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget: must be a positive number of bits per coordinate, got {budget!r}")
    if method not in ("alq", "amq"):
        raise ValueError(f"method: expected 'alq' or 'amq', got {method!r}")
    units = [e for e in base.entries if e.type_name is not None]
    numel = sum(e.numel for e in base.entries)
    bins = next((s.bins for s in stats.values()), None)
    have = bins is not None and any(float(stats[e.name].counts.sum()) > 0 for e in units if e.name in stats)
    wmin = widths[0]
    fixed, reserve = _fixed_bits(base, widths, message_bits)
    total = budget * numel
    if total < fixed + reserve + sum(e.numel * wmin for e in units) - 1e-9:
        smallest = minimum_budget(base, widths, message_bits)
        raise ValueError(
            f"budget: {budget:g} bits per coordinate cannot hold this plan; the smallest is {smallest:.4f} "
            f"(every tensor at {wmin} bits, plus bucket norms, headers and uncompressed tensors)"
        )
    # 1. levels per (type, width) from the type's summed statistics
    type_levels: dict[tuple[str, int], LevelSet] = {}
    if have:
        for t in base.types:
            summed = _summed([stats[e.name] for e in units if e.type_name == t and e.name in stats], bins)
            for b in widths:
                type_levels[t, b] = _fit(summed, b, method)
    # 2. errors and costs per tensor and width (before statistics: a proxy, numel * 4^-b)
    errors = []
    for e in units:
        st = stats.get(e.name)
        if have and st is not None:
            errors.append([st.variance(type_levels[e.type_name, b]) for b in widths])
        else:
            errors.append([0.0 if have else e.numel * 4.0**-b for b in widths])
    costs = [[e.numel * b for b in widths] for e in units]
    picks = allocate_bits(errors, costs, total - fixed - reserve)
    chosen = {e.name: widths[k] for e, k in zip(units, picks, strict=True)}
    # 4. one type per (type, width) in use; levels re-fitted on the group when that is better
    levels: dict[str, LevelSet] = {}
    variance = 0.0
    for t in base.types:
        for b in widths:
            group = [e for e in units if e.type_name == t and chosen[e.name] == b]
            if not group:
                continue
            if not have:
                levels[width_type(t, b)] = LevelSet.for_bits(b)
                continue
            g_stats = _summed([stats[e.name] for e in group if e.name in stats], bins)
            own = _fit(g_stats, b, method)
            shared = type_levels[t, b]
            best = own if g_stats.variance(own) < g_stats.variance(shared) else shared
            levels[width_type(t, b)] = best
            variance += g_stats.variance(best)
    plan = allocated_plan(base, chosen, levels)
    bits = int(message_bits(plan))
    if bits > total + 1e-6 * max(1.0, total):
        raise RuntimeError(f"bit allocation: {bits} bits exceed the budget of {total:.0f} (please report)")
    return Allocation(plan, chosen, float(budget), bits, numel, variance)


__all__ = [
    "EXACT_UNITS", "WIDTHS", "Allocation", "allocate_bits", "allocate_plan", "allocated_plan", "check_widths",
    "estimate_message_bits", "minimum_budget", "width_type",
]  # fmt: skip
