"""An averager whose levels adapt during training: :class:`Aggregator` + :class:`LevelAdapter`.

Per call (``average_(tensors, step)``):

1. the local tensors feed the adapter's per-type statistics (on its observation steps);
2. on a re-fit step (and at the first call) the statistics are summed over the workers and
   every worker fits the same levels (ALQ/AMQ); the aggregator is rebuilt with the new plan,
   which re-checks the plan fingerprint across ranks (a worker with other levels or other
   settings fails here, on every rank, with :class:`AggregationError`);
3. the tensors are averaged by the current aggregator.

``state_dict()`` holds the adapter (levels, statistics) and the cumulative costs, so a
resumed run quantizes with exactly the levels and noise of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from qoda.comm.aggregate import Aggregator, CommStats, Mode, allreduce_sum
from qoda.quant.adapt import AdaptConfig, LevelAdapter
from qoda.quant.policy import LayerPlan


class AdaptiveAggregator:
    """Average tensors across ``group`` with levels re-fitted on ``adapt``'s schedule."""

    def __init__(
        self, plan: LayerPlan, mode: Mode | str = Mode.ALLGATHER, group: dist.ProcessGroup | None = None,
        seed: int = 0, adapt: AdaptConfig | None = None,
    ) -> None:  # fmt: skip
        self.mode, self.group, self.seed = Mode(mode), group, int(seed)
        if self.mode in (Mode.FP32, Mode.FP16):
            raise ValueError(f"mode: adaptive levels need a quantized mode (allgather or two_phase), got {mode!r}")
        self.adapter = LevelAdapter(plan, adapt or AdaptConfig(), reduce=allreduce_sum(group))
        self.aggregator = Aggregator(self.adapter.plan, self.mode, group, seed=self.seed)
        self.stats = CommStats()

    @property
    def plan(self) -> LayerPlan:
        return self.adapter.plan

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        self.adapter.observe(step, tensors)
        if self.adapter.refit(step, force=self.adapter.fits == 0) is not None:
            self.aggregator = Aggregator(self.adapter.plan, self.mode, self.group, seed=self.seed)
        stats = self.aggregator.average_(tensors, step)
        self.stats += stats
        return stats

    def state_dict(self) -> dict:
        return {"adapter": self.adapter.state_dict(), "stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.stats = CommStats(**state["stats"])
        self.aggregator = Aggregator(self.adapter.plan, self.mode, self.group, seed=self.seed)
