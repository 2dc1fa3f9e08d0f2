"""An averager whose levels adapt during training: :class:`Aggregator` + :class:`LevelAdapter`.

Per call (``average_(tensors, step)``):

1. the local tensors feed the adapter's per-type statistics (on its observation steps);
2. on a re-fit step (and at the first call) the statistics are summed over the workers and
   every worker fits the same levels (ALQ/AMQ); the aggregator is rebuilt with the new plan,
   which re-checks the plan fingerprint across ranks (a worker with other levels or other
   settings fails here, on every rank, with :class:`AggregationError`);
3. the tensors are averaged by the current aggregator.

Steps 1 and 2 are also public (:meth:`AdaptiveAggregator.observe`, :meth:`AdaptiveAggregator.refresh`)
for callers that observe on other steps than they average: the DDP hook keeps one
``AdaptiveAggregator`` per bucket, observes during its fp32 warm-up and averages with the
aggregator ``refresh`` returns (on its own overlapped paths).

``state_dict()`` holds the adapter (levels, statistics) and the cumulative costs, so a
resumed run quantizes with exactly the levels and noise of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist

from qoda.codec.layerwise import fixed_message_bits
from qoda.comm.aggregate import AggregationError, Aggregator, Mode, allreduce_sum, compare_across_ranks
from qoda.comm.averager import Averager, CommStats
from qoda.comm.protocol import protocol_named
from qoda.quant.adapt import AdaptConfig, LevelAdapter
from qoda.quant.policy import LayerPlan


def check_adapt_settings(adapt: AdaptConfig, group: dist.ProcessGroup | None = None) -> None:
    """Compare ``adapt``'s fields across the ranks of ``group`` (one small all-gather); raise
    :class:`AggregationError` on every rank naming the fields that differ (``budget``, ``widths``,
    ``allocation``, ...): each would give the ranks other levels or widths."""
    differ, _ = compare_across_ranks({f.name: getattr(adapt, f.name) for f in fields(adapt)}, group)
    if differ:
        raise AggregationError(
            f"adaptive settings differ across ranks: {', '.join(differ)} (this rank: "
            + ", ".join(f"{n}={getattr(adapt, n)!r}" for n in differ)
            + "); every rank must use the same AdaptConfig"
        )


class AdaptiveAggregator(Averager):
    """Average tensors across ``group`` with levels re-fitted on ``adapt``'s schedule.

    ``check``: build the aggregator now, comparing the settings across ranks (one small
    all-gather); ``False`` builds it at the first :meth:`refresh` (no collective before then).
    """

    def __init__(
        self, plan: LayerPlan, mode: Mode | str = Mode.ALLGATHER, group: dist.ProcessGroup | None = None,
        seed: int = 0, adapt: AdaptConfig | None = None, check: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        protocol = protocol_named(mode)
        self.mode, self.group, self.seed = protocol.name, group, int(seed)
        if not protocol.quantizes():
            raise ValueError(f"mode: adaptive levels need a quantized mode (allgather or two_phase), got {mode!r}")
        adapt = adapt or AdaptConfig()
        if check:  # before the adapter: a budget one rank cannot meet must not leave the others waiting
            check_adapt_settings(adapt, group)
        self.adapter = LevelAdapter(plan, adapt, reduce=allreduce_sum(group), message_bits=fixed_message_bits)
        self.aggregator: Aggregator | None = self._build() if check else None

    def _build(self) -> Aggregator:
        """An aggregator for the adapter's current levels (compares the plan across ranks)."""
        return Aggregator(self.adapter.plan, self.mode, self.group, seed=self.seed)

    @property
    def plan(self) -> LayerPlan:
        return self.adapter.plan

    def observe(self, tensors: Sequence[torch.Tensor], step: int) -> None:
        """Step 1: add this rank's tensors (plan order) to the statistics if ``step`` is an
        observation step (no communication)."""
        self.adapter.observe(step, tensors)

    def refresh(self, step: int) -> Aggregator:
        """Step 2: re-fit the levels if ``step`` is a re-fit step (or nothing was fitted yet);
        returns the aggregator of the current levels (rebuilt when they changed).

        Collective (the statistics are summed over the ranks): every rank calls it at the same
        steps, once per step."""
        if self.adapter.refit(step, force=self.adapter.fits == 0) is not None or self.aggregator is None:
            self.aggregator = self._build()
        return self.aggregator

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        self.observe(tensors, step)
        stats = self.refresh(step).average_(tensors, step)
        self.stats += stats
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adapter": self.adapter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_adapter_state(state["adapter"])
        super().load_state_dict(state)

    def load_adapter_state(self, state: dict[str, Any]) -> None:
        """Restore the adapter alone (levels, statistics, fit counters: ``state_dict()["adapter"]``);
        an aggregator already built is rebuilt for the restored levels, else built at :meth:`refresh`."""
        self.adapter.load_state_dict(state)
        if self.aggregator is not None:
            self.aggregator = self._build()
