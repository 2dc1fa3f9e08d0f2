"""Levels (and bit widths) that adapt during training: a schedule and the per-worker adapter.

:class:`LevelAdapter` gathers statistics of the local gradients (:mod:`qoda.quant.fitting`),
sums them over the workers at every re-fit (an injected ``reduce``) and fits, identically on
every worker, either

* ``allocation="uniform"``: one level set per type at the plan's widths (ALQ / AMQ), or
* ``allocation="dp"``: per-tensor widths under an average-bits budget and one level set per
  (type, width) (:func:`qoda.quant.allocation.allocate_plan`).

The statistics, fitting and allocation names are re-exported here for compatibility.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qoda.quant.allocation import (
    WIDTHS,
    Allocation,
    MessageBits,
    allocate_bits,
    allocate_plan,
    allocated_plan,
    check_widths,
    estimate_message_bits,
    predicted_variance,
    width_type,
)
from qoda.quant.fitting import (
    DEFAULT_BINS,
    MIN_GAP,
    MagnitudeStats,
    _alq_sweeps,
    alq_update,
    expected_variance,
    fit_alq,
    fit_amq,
    levels_for_bits,
    plan_statistics,
)
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPlan


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
ALLOCATIONS = ("uniform", "dp")


@dataclass(frozen=True)
class AdaptConfig:
    """How levels (and widths) adapt during training.

    Attributes:
        method: ``alq`` (coordinate descent, several initialisations) or ``amq`` (exponential base).
        schedule: when to re-fit (default 0/200/1000/5000, then every 5000 steps).
        observe_every: gather statistics every this many steps (and at every re-fit step).
        bins: histogram bins per type (per tensor with ``allocation="dp"``).
        allocation: ``uniform`` keeps the plan's widths; ``dp`` chooses every compressed tensor's
            width from ``widths`` by dynamic programming under ``budget``.
        budget: ``dp`` only: average bits per coordinate over all the plan's coordinates, every
            bit on the wire counted (codes, bucket norms, headers, uncompressed tensors);
            fractional budgets (2.5) are fine.
        widths: ``dp`` only: the widths to choose from (default 2..8).
        follow: ``dp`` only: steps from the start during which every ``follow_every``-th step
            (default 2) is an observation step (default 100 steps); the widths are re-allocated at
            every observation step, during and after them.  A re-allocation chooses the widths again by
            DP on the all-reduced statistics with the levels of the last re-fit (no fitting: a few
            milliseconds); levels are re-fitted on ``schedule``.  Measured rule: docs/quantization.md
            ("Widths that follow the gradients").  ``0``: widths change only at re-fits.
        guard: ``dp`` only: per-tensor widths are adopted only if their predicted variance is at most
            ``1 - guard`` times that of uniform widths (every tensor at the widest single width whose
            message fits the budget, same levels) on the statistics of the current *and* of the
            previous decision; otherwise the uniform widths are used.  It keeps an allocation chosen
            on one step's young statistics from losing to uniform widths when the gradients move.
            ``None``: no guard.  Measured: docs/quantization.md.
    """

    method: str = "alq"
    schedule: RefitSchedule = field(default_factory=RefitSchedule)
    observe_every: int = 10
    bins: int = DEFAULT_BINS
    allocation: str = "uniform"
    budget: float | None = None
    widths: tuple[int, ...] = WIDTHS
    follow: int = 100
    follow_every: int = 2
    guard: float | None = 0.0

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise ValueError(f"method: expected one of {FIT_METHODS}, got {self.method!r}")
        if not isinstance(self.observe_every, int) or self.observe_every < 1:
            raise ValueError(f"observe_every: must be a positive int, got {self.observe_every!r}")
        if not isinstance(self.follow, int) or isinstance(self.follow, bool) or self.follow < 0:
            raise ValueError(f"follow: must be a non-negative int, got {self.follow!r}")
        if not isinstance(self.follow_every, int) or isinstance(self.follow_every, bool) or self.follow_every < 1:
            raise ValueError(f"follow_every: must be a positive int, got {self.follow_every!r}")
        g = self.guard
        if g is not None and (not isinstance(g, int | float) or isinstance(g, bool) or not 0 <= g < 1):
            raise ValueError(f"guard: must be None or a number in [0, 1), got {g!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {self.allocation!r}")
        object.__setattr__(self, "widths", check_widths(self.widths))
        b = self.budget
        if self.allocation == "dp":
            ok = isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) and b > 0
            if not ok:
                raise ValueError(f"budget: bit allocation needs a positive average bits per coordinate, got {b!r}")
        elif b is not None:
            raise ValueError("budget: only used with allocation='dp' (uniform allocation keeps the plan's widths)")

    def observes(self, step: int) -> bool:
        """Whether ``step`` is an observation step (every ``observe_every`` steps, every re-fit step and,
        with ``dp``, every ``follow_every``-th step before ``follow``)."""
        following = self.allocates and step < self.follow and not step % self.follow_every
        return not (step % self.observe_every) or self.schedule.due(step) or following

    def reallocates(self, step: int) -> bool:
        """Whether the widths are chosen again at ``step`` (``dp``: observation steps, and ``follow`` > 0)."""
        return self.allocates and self.follow > 0 and self.observes(step)

    @property
    def allocates(self) -> bool:
        return self.allocation == "dp"


class LevelAdapter:
    """Per-type (or per-tensor) statistics and re-fitting on a schedule, identical on every worker.

    Every worker calls :meth:`observe` with its gradients and :meth:`refit` at every step.
    Re-fitting sums the statistics over workers with ``reduce`` (for example
    :func:`qoda.comm.aggregate.allreduce_sum`) and then fits deterministically, so all
    workers derive the same levels (and widths); the new plan's fingerprint changes, and
    receivers reject payloads quantized with other levels (level-set id in every header).

    ``plan`` is the policy's plan (types and their settings).  With ``allocation="dp"`` the
    adapter's :attr:`plan` has types ``"<type>/<b>bit"`` and statistics are kept per tensor;
    ``message_bits`` measures a plan's message (:mod:`qoda.comm` passes the codec's exact size;
    the default counts codes, norms and raw tensors but no headers).  Before the first fit the
    widths spread the budget evenly by size, with uniform levels.

    ``per_tensor``: keep statistics per compressed tensor (by name) with ``uniform`` allocation
    too, summed per type (in plan order) at each re-fit (the DDP hook keeps them so, whatever its
    buckets).
    ``budget_floor``: with ``dp``, a budget the plan cannot hold is raised to ``budget_floor(plan)``
    (for example :func:`~qoda.quant.allocation.minimum_budget`) with a one-time warning, instead of
    failing.
    """

    def __init__(
        self, plan: LayerPlan, config: AdaptConfig | None = None,
        reduce: Callable[[np.ndarray], np.ndarray] | None = None, message_bits: MessageBits | None = None,
        per_tensor: bool = False, budget_floor: Callable[[LayerPlan], float] | None = None,
    ) -> None:  # fmt: skip
        self.base_plan = plan
        self.config = config or AdaptConfig()
        self.reduce = reduce
        self.message_bits = message_bits or estimate_message_bits
        self.per_tensor = per_tensor or self.config.allocates
        self.budget_floor = budget_floor
        self._warned_budget = False
        self.fits = 0
        self.reallocations = 0  # width changes between re-fits
        self.guarded = 0  # decisions where the guard kept the uniform widths
        self.previous_stats: dict[str, MagnitudeStats] | None = None  # the last decision's (dp)
        self.last_fit_step = -1  # the last step that re-fitted or re-allocated
        self.allocation: Allocation | None = None
        if self.config.allocates:
            self.allocation = self._allocate({})
            self.plan = self.allocation.plan
        else:
            self.plan = plan
        self.stats = self._empty_stats()

    # ------------------------------------------------------------------ statistics
    @property
    def _keys(self) -> tuple[str, ...]:
        """What statistics are kept for: types (uniform) or compressed tensors by name (dp)."""
        if self.per_tensor:
            return tuple(e.name for e in self.base_plan.entries if e.type_name is not None)
        return self.base_plan.types

    def _empty_stats(self) -> dict[str, MagnitudeStats]:
        return {k: MagnitudeStats(self.config.bins) for k in self._keys}

    def observe(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        """Add this worker's gradients (plan order) to the statistics if ``step`` is an observation step."""
        if self.config.observes(step):
            plan_statistics(self.base_plan, tensors, self.per_tensor, self.config.bins, into=self.stats)

    # ------------------------------------------------------------------ fitting
    def _allocate(
        self, stats: dict[str, MagnitudeStats], type_levels: Mapping[tuple[str, int], LevelSet] | None = None
    ) -> Allocation:
        c = self.config
        assert c.budget is not None
        budget = float(c.budget)
        if self.budget_floor is not None:
            floor = self.budget_floor(self.base_plan)
            if budget < floor:
                if not self._warned_budget:
                    warnings.warn(
                        f"budget: {budget:g} bits per coordinate cannot hold this plan (every tensor at "
                        f"{c.widths[0]} bits, bucket norms, headers and uncompressed tensors need {floor:.4f}); "
                        f"using {floor:.4f}",
                        stacklevel=2,
                    )
                    self._warned_budget = True
                budget = floor
        return allocate_plan(self.base_plan, stats, budget, c.widths, c.method, self.message_bits, type_levels)

    def refit(self, step: int, force: bool = False) -> LayerPlan | None:
        """Re-fit if ``step`` is due (or ``force``) and statistics exist, or re-allocate the widths on
        a re-allocation step (:meth:`AdaptConfig.reallocates`); returns the new plan (``None`` when
        nothing was done or the widths stayed the same).

        Every worker must call it at the same steps with the same ``force``: it all-reduces.
        """
        full = force or self.config.schedule.due(step)
        if step == self.last_fit_step or not (full or (self.config.reallocates(step) and self.fits)):
            return None
        keys = self._keys
        counts = np.stack([self.stats[k].counts for k in keys]) if keys else np.zeros((0, self.config.bins))
        if self.reduce is not None:
            counts = np.asarray(self.reduce(counts), dtype=np.float64)
        if float(counts.sum()) == 0.0:
            return None
        summed = {k: MagnitudeStats(self.config.bins, 0.0, c.copy()) for k, c in zip(keys, counts, strict=True)}
        if self.per_tensor and not self.config.allocates:  # per type, summed in plan order
            summed = {
                t: MagnitudeStats(self.config.bins, 0.0, np.sum([summed[e.name].counts for e in self.base_plan.entries
                                                                  if e.type_name == t], axis=0))
                for t in self.base_plan.types
            }  # fmt: skip
        if self.config.allocates and not full:  # re-allocation: the widths again, the last re-fit's levels
            self.stats = self._empty_stats()
            self.last_fit_step = step
            previous = self.allocation
            self.allocation = self._guard(self._allocate(summed, previous.type_levels if previous else None), summed)
            if previous is not None and dict(self.allocation.widths) == dict(previous.widths):
                self.allocation = previous  # same widths: keep the plan (no new aggregator)
                return None
            self.plan = self.allocation.plan
            self.reallocations += 1
            return self.plan
        if self.config.allocates:
            self.allocation = self._guard(self._allocate(summed), summed)
            self.plan = self.allocation.plan
        else:
            fit = fit_alq if self.config.method == "alq" else fit_amq
            configs = dict(self.base_plan.configs)
            for t in self.base_plan.types:
                configs[t] = replace(configs[t], levels=fit(summed[t], configs[t].levels.s))
            self.plan = LayerPlan(self.base_plan.entries, configs)
        self.stats = self._empty_stats()
        self.fits += 1
        self.last_fit_step = step
        return self.plan

    def _guard(self, candidate: Allocation, stats: dict[str, MagnitudeStats]) -> Allocation:
        """``AdaptConfig.guard``: ``candidate`` if its predicted variance is at most ``1 - guard`` times
        that of the uniform widths (the widest one width that fits the budget, with the candidate's
        per-(type, width) levels) on ``stats`` and on the previous decision's statistics, else the
        uniform widths.  Records ``stats`` as the previous decision's."""
        previous, self.previous_stats = self.previous_stats, stats
        g = self.config.guard
        if g is None or not candidate.type_levels:
            return candidate
        reference = self._uniform_widths(candidate)
        if reference is None:
            return candidate  # no single width fits the budget: nothing to guard against
        uniform, widths, bits = reference
        if dict(candidate.widths) == widths:
            return candidate
        views = [stats] if previous is None else [stats, previous]
        if all(predicted_variance(candidate.plan, s) <= (1 - g) * predicted_variance(uniform, s) for s in views):
            return candidate
        self.guarded += 1
        return Allocation(uniform, widths, candidate.budget, bits, candidate.numel,
                          predicted_variance(uniform, stats), candidate.type_levels)  # fmt: skip

    def _uniform_widths(self, candidate: Allocation) -> tuple[LayerPlan, dict[str, int], int] | None:
        """The plan with every compressed tensor at the widest width of ``widths`` whose message fits
        ``candidate``'s budget (levels: ``candidate.type_levels``), its widths and its message bits."""
        base = self.base_plan
        names = [e.name for e in base.entries if e.type_name is not None]
        for b in sorted(self.config.widths, reverse=True):
            if not all((t, b) in candidate.type_levels for t in base.types):
                continue
            plan = allocated_plan(base, dict.fromkeys(names, b),
                                  {width_type(t, b): candidate.type_levels[t, b] for t in base.types})  # fmt: skip
            bits = int(self.message_bits(plan))
            if bits <= candidate.budget * candidate.numel:
                return plan, dict.fromkeys(names, b), bits
        return None

    @property
    def widths(self) -> dict[str, int]:
        """Bits per coordinate of every compressed tensor (by name) in the current plan."""
        return self.plan.widths()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state = {
            "levels": {t: list(self.plan.configs[t].levels.values) for t in self.plan.types},
            "stats": {k: s.state_dict() for k, s in self.stats.items()},
            "fits": self.fits,
            "last_fit_step": self.last_fit_step,
        }
        if self.config.allocates:
            state["widths"] = self.widths
            state["reallocations"] = self.reallocations
            state["guarded"] = self.guarded
            prev = self.previous_stats
            state["previous_stats"] = None if prev is None else {k: s.state_dict() for k, s in prev.items()}
            tl = self.allocation.type_levels if self.allocation is not None else {}
            state["type_levels"] = {f"{t}@{b}": list(lv.values) for (t, b), lv in tl.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        levels = {t: LevelSet(tuple(v), "fitted") for t, v in state["levels"].items()}
        if self.config.allocates:
            if "widths" not in state:
                raise ValueError("adapter state: no 'widths' (written without bit allocation)")
            plan = allocated_plan(self.base_plan, {k: int(v) for k, v in state["widths"].items()}, levels)
            extra = set(levels) - set(plan.types)
            if extra:
                raise ValueError(f"adapter state: types {sorted(extra)} are not in this plan")
        else:
            if "widths" in state:
                raise ValueError("adapter state: written with bit allocation, this adapter keeps uniform widths")
            configs = dict(self.base_plan.configs)
            for t, lv in levels.items():
                if t not in configs:
                    raise ValueError(f"adapter state: type {t!r} is not in this plan")
                configs[t] = replace(configs[t], levels=lv)
            plan = LayerPlan(self.base_plan.entries, configs)
        stats = {k: MagnitudeStats.from_state_dict(s) for k, s in state["stats"].items()}
        if set(stats) != set(self._keys):
            raise ValueError("adapter state: its statistics are for other tensors or types than this plan's")
        self.plan = plan
        if self.config.allocates:
            type_levels = {
                (k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): LevelSet(tuple(v), "fitted")
                for k, v in state.get("type_levels", {}).items()
            }  # fmt: skip
            self.allocation = Allocation(
                plan, self.widths, float(self.config.budget or 0), int(self.message_bits(plan)),
                sum(e.numel for e in plan.entries), math.nan, type_levels,
            )  # fmt: skip
            self.reallocations = int(state.get("reallocations", 0))
            self.guarded = int(state.get("guarded", 0))
            prev = state.get("previous_stats")
            self.previous_stats = None if prev is None else {k: MagnitudeStats.from_state_dict(s)
                                                             for k, s in prev.items()}  # fmt: skip
        self.stats = stats
        self.fits = int(state["fits"])
        self.last_fit_step = int(state["last_fit_step"])


__all__ = [
    "ALLOCATIONS", "DEFAULT_BINS", "FIT_METHODS", "MIN_GAP", "WIDTHS", "AdaptConfig", "Allocation", "LevelAdapter",
    "MagnitudeStats", "RefitSchedule", "_alq_sweeps", "allocate_bits", "allocate_plan", "alq_update",
    "expected_variance", "fit_alq", "fit_amq", "levels_for_bits",
]  # fmt: skip
