"""Averaging over a torch.distributed ProcessGroup with layer-wise quantization.

``averager`` (the contract every averager implements: :class:`Averager`, :class:`CommStats`),
``protocol`` (the contract every exchange protocol implements, its context and registry:
:class:`Protocol`, :func:`register_protocol`), ``exchanges`` (the fp32 / fp16 / allgather /
two-phase protocols), ``aggregate`` (:class:`Aggregator`: runs a protocol), ``adaptive`` (levels
re-fitted on a schedule), ``compressed`` (any
:class:`~qoda.codec.compressor.Compressor`, by all-gather), ``overlap`` (one player's exchange on a background thread),
``baselines`` (PowerSGD, the benchmarks' local averager), ``partition`` (message layouts,
two-phase chunks), ``collective_cost`` / ``cost`` (bytes and latency terms), ``step_time`` (the
alpha-beta step-time model) and ``ddp_hook`` (the DDP communication hook and its checkpointable
state).
"""

from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import AggregationError, Aggregator, Mode
from qoda.comm.averager import Averager, CommStats
from qoda.comm.baselines import LocalAverager, PowerSGDAverager
from qoda.comm.compressed import CompressedAverager
from qoda.comm.ddp_hook import QodaHookState, qoda_hook
from qoda.comm.overlap import OverlappedAverager
from qoda.comm.protocol import PROTOCOLS, ExchangeContext, Protocol, register_protocol

__all__ = [
    "PROTOCOLS", "AdaptiveAggregator", "AggregationError", "Aggregator", "Averager", "CommStats",
    "CompressedAverager", "ExchangeContext", "LocalAverager", "Mode", "OverlappedAverager", "PowerSGDAverager",
    "Protocol", "QodaHookState", "qoda_hook", "register_protocol",
]  # fmt: skip
