"""Averaging over a torch.distributed ProcessGroup with layer-wise quantization.

``averager`` (the contract every averager implements: :class:`Averager`, :class:`CommStats`),
``aggregate`` (the allgather / two-phase / fp32 / fp16 modes and their statistics), ``adaptive``
(levels re-fitted on a schedule), ``compressed`` (any compressor, by all-gather),
``overlap`` (one player's exchange on a background thread),
``baselines`` (PowerSGD, the benchmarks' local averager), ``partition`` (two-phase chunks) and
``ddp_hook`` (the DDP communication hook and its checkpointable state).
"""

from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import AggregationError, Aggregator, Mode
from qoda.comm.averager import Averager, CommStats
from qoda.comm.baselines import LocalAverager, PowerSGDAverager
from qoda.comm.compressed import CompressedAverager
from qoda.comm.ddp_hook import QodaHookState, qoda_hook
from qoda.comm.overlap import OverlappedAverager

__all__ = [
    "AdaptiveAggregator", "AggregationError", "Aggregator", "Averager", "CommStats", "CompressedAverager",
    "LocalAverager", "Mode",
    "OverlappedAverager", "PowerSGDAverager", "QodaHookState", "qoda_hook",
]  # fmt: skip
