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
   tensor at the smallest width (norms, headers, layer sizes, raw tensors, padding; one segment
   per type) and the framing one further segment adds; the dynamic programme
   (:func:`allocate_bits`) spends the rest on widths, charging each segment the plan it chooses
   has beyond one per type (its state tracks the widths in use per type), so it is exact for the
   framing it produces (byte padding: exact when every tensor's codes fill whole bytes, else up to
   7 bits per segment are reserved);
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
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from qoda.quant.config import QuantizerConfig
from qoda.quant.fitting import MagnitudeStats, fit_alq, fit_amq, levels_for_bits
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.quant.quantizer import num_buckets

#: Widths the allocation chooses from by default (sign + index bits per coordinate).
WIDTHS = (2, 3, 4, 5, 6, 7, 8)
#: Largest exact dynamic programme: cost units, and units x option sets x options (vector operations
#: of ``cap`` elements); larger problems are rounded up (still feasible).
EXACT_UNITS = 1 << 18
EXACT_WORK = 1 << 24

MessageBits = Callable[[LayerPlan], int]


def allocate_bits(
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    resolution: int = 4096,
    groups: Sequence[Hashable] | None = None,
    segment_cost: float = 0.0,
) -> list[int]:
    """Choose one option per layer minimising ``sum errors[i][k]`` with its cost ``<= budget``.

    The cost of a choice ``k_i`` is ``sum_i costs[i][k_i] + segment_cost * sum_g (|{k_i : i in g}| - 1)``:
    ``groups[i]`` is the group (level type) of layer ``i`` (default: every layer its own); layers of
    one group that choose the same option share one segment on the wire, every group's first
    segment is in the base cost and each further one costs ``segment_cost``.  That is exactly the
    framing of the chosen plan, not a worst case.

    Dynamic programming over the cost *above* each layer's cheapest option, with the set of options
    used so far in the current group in the state (only the reachable sets are kept).  Integer
    costs are solved exactly (in units of their greatest common divisor) when the slack is at most
    :data:`EXACT_UNITS` units and the work (sets x options x units) at most :data:`EXACT_WORK`;
    otherwise costs are rounded *up* to ``slack / resolution`` units, so the allocation always meets
    the real budget.  When even that is too much work (groups of many layers), the framing of every
    further segment a group could have is reserved instead (feasible, not exact).  Raises if no
    choice fits.
    """
    n = len(costs)
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n or len(errors) != n:
        raise ValueError("allocate_bits: errors, costs and groups need one row per layer")
    base = [min(row) for row in costs]
    slack = budget - sum(base)
    tol = 1e-9 * max(1.0, abs(budget))
    if slack < -tol:
        raise ValueError("budget: too small for the cheapest option of every layer")
    slack = max(slack, 0.0)
    first = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    order = sorted(range(n), key=lambda i: first[groups[i]])  # stable: each group contiguous
    seg = float(segment_cost) if len(first) < n else 0.0  # no group of two layers: no further segment
    extra = [[c - b for c in row] for row, b in zip(costs, base, strict=True)]
    grouped = [groups[i] for i in order]
    work = _dp_work(grouped, [len(costs[i]) for i in order])
    exact = _exact_units(extra, seg, slack, tol)
    if seg and (exact is None or (exact[1] + 1) * work > EXACT_WORK) and (resolution + 1) * work > EXACT_WORK:
        # too many option sets to track: reserve every further segment the groups could have
        sizes = {g: min(grouped.count(g), len(costs[first[g]])) for g in first}
        slack -= seg * sum(m - 1 for m in sizes.values())
        if slack < -tol:
            raise ValueError("budget: too small for the cheapest option of every layer and the segments' framing")
        slack, seg, grouped = max(slack, 0.0), 0.0, list(range(n))
        work = _dp_work(grouped, [len(costs[i]) for i in order])
        exact = _exact_units(extra, seg, slack, tol)
    if exact is not None and (exact[1] + 1) * work <= EXACT_WORK:
        unit, cap = exact
    else:
        cap = resolution if slack > tol else 0
        unit = slack / cap if cap else 1.0
    picks = _knapsack(
        [errors[i] for i in order], [[_units(x, unit) for x in extra[i]] for i in order],
        grouped, _units(seg, unit), cap,
    )  # fmt: skip
    out = [0] * n
    for pos, i in enumerate(order):
        out[i] = picks[pos]
    return out


def _exact_units(extra: Sequence[Sequence[float]], seg: float, slack: float, tol: float) -> tuple[float, int] | None:
    """``(unit, slack in units)`` with the greatest common divisor of integer costs as the unit, when
    the slack is at most :data:`EXACT_UNITS` units (else ``None``: round)."""
    values = [x for row in extra for x in row] + [seg]
    if not all(float(x).is_integer() for x in values):
        return None
    g = 0
    for x in values:
        g = math.gcd(g, int(x))
    g = max(g, 1)
    cap = int((slack + tol) // g)
    return (float(g), cap) if cap <= EXACT_UNITS else None


def _units(x: float, unit: float) -> int:
    """``x`` in cost units, rounded up (exact when ``x`` is a multiple of ``unit``)."""
    return max(0, math.ceil(x / unit - 1e-9))


def _dp_work(groups: Sequence[Hashable], options: Sequence[int]) -> int:
    """Vector operations of :func:`_knapsack`: per layer, (reachable option sets) x options."""
    work, m = 0, 0
    for i, k in enumerate(options):
        m = m + 1 if i and groups[i] == groups[i - 1] else 1
        work += k * min(1 << k, sum(math.comb(k, j) for j in range(m)))
    return max(work, 1)


def _knapsack(
    errors: Sequence[Sequence[float]], c_units: Sequence[Sequence[int]], groups: Sequence[Hashable], seg: int,
    cap: int,
) -> list[int]:  # fmt: skip
    """Exact DP on integer costs (layers ordered with every group contiguous).  State per group:
    (set of options used so far as a bit mask, cost); a new option in a non-empty set adds ``seg``."""
    n = len(errors)
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choices: list[dict[int, np.ndarray]] = []  # per layer: mask -> option + 16 * (option new in the set)
    ends: list[tuple[int, int, list[int], np.ndarray]] = []  # per group: layers [i, j), masks, best mask per cost
    i = 0
    while i < n:
        j = i
        while j < n and groups[j] == groups[i]:
            j += 1
        states = {0: dp}
        for layer in range(i, j):
            new: dict[int, np.ndarray] = {}
            choice: dict[int, np.ndarray] = {}
            for mask, arr in states.items():
                for k, (e, c) in enumerate(zip(errors[layer], c_units[layer], strict=True)):
                    fresh = not (mask >> k) & 1
                    cost = c + (seg if fresh and mask else 0)
                    if cost > cap:
                        continue
                    nm = mask | (1 << k)
                    if nm not in new:
                        new[nm], choice[nm] = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=np.int8)
                    shifted = np.full(cap + 1, np.inf)
                    shifted[cost:] = arr[: cap + 1 - cost] + e
                    better = shifted < new[nm]
                    new[nm][better] = shifted[better]
                    choice[nm][better] = k + 16 * fresh
            states = new
            choices.append(choice)
        masks = sorted(states)
        dp, best = states[masks[0]].copy(), np.zeros(cap + 1, dtype=np.int16)
        for m_index, m in enumerate(masks[1:], 1):
            better = states[m] < dp
            dp[better], best[better] = states[m][better], m_index
        ends.append((i, j, masks, best))
        i = j
    if n and not np.isfinite(dp).any():
        raise ValueError("budget: too small for any choice (segment framing included)")
    end = int(np.argmin(dp))
    picks = [0] * n
    for i, j, masks, best in reversed(ends):
        mask = masks[int(best[end])]
        for layer in range(j - 1, i - 1, -1):
            v = int(choices[layer][mask][end])
            k, fresh = v % 16, v >= 16
            prev = mask & ~(1 << k) if fresh else mask
            end -= c_units[layer][k] + (seg if fresh and prev else 0)
            picks[layer], mask = k, prev
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
        type_levels: the levels fitted per (type, width) in step 1 (empty before statistics).
    """

    plan: LayerPlan
    widths: Mapping[str, int]
    budget: float
    message_bits: int
    numel: int
    variance: float
    type_levels: Mapping[tuple[str, int], LevelSet] = field(default_factory=dict)

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


def uniform_plan(base: LayerPlan, bits: int, type_levels: Mapping[tuple[str, int], LevelSet]) -> LayerPlan:
    """Every compressed tensor of ``base`` at ``bits``, each type with the levels ``type_levels[type, bits]``
    (an :class:`Allocation`'s step-1 levels: what uniform widths fit on the same statistics; uniform
    levels where missing).  The reference an allocation is compared with on the same gradients (its
    message is the budget when the budget is that of one ``bits``-bit message)."""
    levels = {width_type(t, bits): type_levels[t, bits] for t in base.types if (t, bits) in type_levels}
    return allocated_plan(base, {e.name: bits for e in base.entries if e.type_name is not None}, levels)


def predicted_variance(plan: LayerPlan, stats: Mapping[str, MagnitudeStats]) -> float:
    """``sum_i S_i.variance(L_{type(i)})``: the expected variance of ``plan`` on the statistics ``stats``
    (per compressed entry name; entries without statistics count 0), in the statistics' units."""
    return sum(stats[e.name].variance(plan.configs[e.type_name].levels) for e in plan.entries
               if e.type_name is not None and e.name in stats)  # fmt: skip


def _framing(base: LayerPlan, widths: Sequence[int], message_bits: MessageBits) -> tuple[int, int]:
    """Step 3: ``(fixed, segment)``: the bits of the all-smallest plan besides its codes (one segment
    per type: norms, headers, layer sizes, raw tensors) and the bits one further segment adds (its
    framing, measured by splitting a tensor off a type), plus up to 7 bits of byte padding per
    segment when some tensor's codes do not fill whole bytes."""
    units = [e for e in base.entries if e.type_name is not None]
    wmin = widths[0]
    cheapest = allocated_plan(base, {e.name: wmin for e in units}, {})
    pad = 0 if all(e.numel * b % 8 == 0 for e in units for b in widths) else 7
    fixed = message_bits(cheapest) - sum(e.numel * wmin for e in units) + pad * len(base.types)
    shared = [t for t in base.types if sum(e.type_name == t for e in units) > 1]
    if not shared:
        return fixed, 0
    first = next(e for e in units if e.type_name == shared[0])
    split = LayerPlan(
        tuple(LayerEntry(e.name, e.shape, f"{e.type_name}/split") if e.name == first.name else e
              for e in cheapest.entries),
        {**cheapest.configs, width_type(shared[0], wmin) + "/split": cheapest.configs[width_type(shared[0], wmin)]},
    )  # fmt: skip
    return fixed, message_bits(split) - message_bits(cheapest) + 2 * pad


def minimum_budget(
    base: LayerPlan, widths: Sequence[int] = WIDTHS, message_bits: MessageBits = estimate_message_bits
) -> float:
    """The smallest budget (bits per coordinate) :func:`allocate_plan` accepts for ``base``: every
    tensor at the smallest width (one segment per type) plus the fixed part."""
    widths = check_widths(widths)
    fixed, _ = _framing(base, widths, message_bits)
    numel = sum(e.numel for e in base.entries)
    codes = sum(e.numel * widths[0] for e in base.entries if e.type_name is not None)
    return (fixed + codes) / max(numel, 1) * (1 + 1e-12) + 1e-12


def allocate_plan(
    base: LayerPlan,
    stats: Mapping[str, MagnitudeStats],
    budget: float,
    widths: Sequence[int] = WIDTHS,
    method: str = "alq",
    message_bits: MessageBits = estimate_message_bits,
    type_levels: Mapping[tuple[str, int], LevelSet] | None = None,
) -> Allocation:
    """Per-tensor widths and per-(type, width) levels minimising the expected variance under
    ``budget`` bits per coordinate (see the module docstring, steps 1-4).

    ``stats``: statistics per compressed entry name (missing or empty: a proxy that spreads
    the bits evenly, used before any statistics exist).  ``message_bits``: bits of one message
    of a plan, every bit on the wire included (default: :func:`estimate_message_bits`).
    ``type_levels``: levels per (type, width) of an earlier allocation (its
    :attr:`Allocation.type_levels`): only the widths are chosen again (steps 2-3, no fitting; each
    (type, width) group keeps its type's levels): the cheap re-allocation
    :class:`~qoda.quant.adapt.LevelAdapter` runs between re-fits.
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
    fixed, segment = _framing(base, widths, message_bits)
    total = budget * numel
    if total < fixed + sum(e.numel * wmin for e in units) - 1e-9:
        smallest = minimum_budget(base, widths, message_bits)
        raise ValueError(
            f"budget: {budget:g} bits per coordinate cannot hold this plan; the smallest is {smallest:.4f} "
            f"(every tensor at {wmin} bits, plus bucket norms, headers and uncompressed tensors)"
        )
    # 1. levels per (type, width) from the type's summed statistics
    reuse = have and type_levels is not None and all((t, b) in type_levels for t in base.types for b in widths)
    type_levels = dict(type_levels) if reuse and type_levels is not None else {}
    if have and not reuse:
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
    picks = allocate_bits(errors, costs, total - fixed, groups=[e.type_name for e in units], segment_cost=segment)
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
            shared = type_levels[t, b]
            best = shared
            if not reuse:
                own = _fit(g_stats, b, method)
                best = own if g_stats.variance(own) < g_stats.variance(shared) else shared
            levels[width_type(t, b)] = best
            variance += g_stats.variance(best)
    plan = allocated_plan(base, chosen, levels)
    bits = int(message_bits(plan))
    if bits > total + 1e-6 * max(1.0, total):
        raise RuntimeError(f"bit allocation: {bits} bits exceed the budget of {total:.0f} (please report)")
    return Allocation(plan, chosen, float(budget), bits, numel, variance, type_levels)


__all__ = [
    "EXACT_UNITS", "WIDTHS", "Allocation", "allocate_bits", "allocate_plan", "allocated_plan", "check_widths",
    "estimate_message_bits", "minimum_budget", "predicted_variance", "uniform_plan", "width_type",
]  # fmt: skip
