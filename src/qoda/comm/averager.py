"""The averager contract: what every way of averaging the dual vector across workers provides.

The optimizers, the trainer and the DDP hook see only :class:`Averager`, never a concrete
class.  Implementations: :class:`~qoda.comm.aggregate.Aggregator` (fp32, fp16, allgather,
two-phase), :class:`~qoda.comm.adaptive.AdaptiveAggregator` (levels re-fitted on a schedule),
:class:`~qoda.comm.compressed.CompressedAverager` (any :class:`~qoda.codec.compressor.Compressor`),
:class:`~qoda.comm.baselines.PowerSGDAverager`, :class:`~qoda.comm.baselines.LocalAverager`
(no communication), :class:`~qoda.comm.overlap.OverlappedAverager` (parts averaged in the
background) and the VI simulator's in-process averagers (:mod:`qoda.vi.simulator`).

The contract:

* ``average_(tensors, step)`` replaces every tensor by its average over the workers, in place,
  and returns this call's costs (:class:`CommStats`, ``calls == 1``), which it also adds to
  ``stats`` (cumulative).  ``step`` is the exchange counter: it drives the quantization noise,
  so every worker passes the same value.
* ``plan``: the current layer plan, levels included (they change when levels adapt), or
  ``None`` for averagers that do not quantize with a plan (PowerSGD, local).
* ``communicates``: ``False`` only for averagers that exchange nothing (the benchmarks'
  compute-only bound); the trainer then skips its collective checks too.
* ``starts_parts`` / ``start(part, tensors, step)``: averagers that can begin averaging a part
  of the tensors before the others exist (in the background) say so; ``average_`` then
  completes the exchange.
* ``simulates_workers`` / ``set_worker_tensors(worker_tensors)``: averagers that stand for all K
  workers inside one process (the VI simulator's) say so and receive every worker's tensors
  before each ``average_``; an averager across real processes has only its own tensors.
* ``state_dict()`` / ``load_state_dict()``: everything a resumed run needs to average exactly
  like an uninterrupted one; the base holds ``{"stats": ...}`` and subclasses add their keys.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from qoda.quant.policy import LayerPlan


@dataclass
class CommStats:
    """What one or more aggregation calls cost (bytes are per rank, as the algorithm sends them)."""

    calls: int = 0
    payload_bits: int = 0  # bits of the encoded vector(s) this rank produced, headers excluded
    bytes_sent: int = 0
    bytes_received: int = 0
    encode_seconds: float = 0.0
    comm_seconds: float = 0.0
    decode_seconds: float = 0.0

    def __iadd__(self, other: CommStats) -> CommStats:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Averager(abc.ABC):
    """Average per-layer tensors across workers, in place (see the module docstring)."""

    #: ``False`` only for averagers that exchange nothing (every worker keeps its own tensors).
    communicates: ClassVar[bool] = True
    #: whether :meth:`start` can begin averaging a part of the tensors ahead of :meth:`average_`.
    starts_parts: ClassVar[bool] = False
    #: whether this averager simulates all workers in one process (fed by :meth:`set_worker_tensors`).
    simulates_workers: ClassVar[bool] = False

    def __init__(self) -> None:
        self.stats = CommStats()  # cumulative costs of every average_ call

    @abc.abstractmethod
    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        """Replace every tensor by its average over the workers; returns this call's costs
        (also added to :attr:`stats`)."""

    @property
    def plan(self) -> LayerPlan | None:
        """The current layer plan (levels included), or ``None`` if this averager does not
        quantize with one."""
        return None

    def start(self, part: int, tensors: Sequence[torch.Tensor], step: int) -> None:
        """Begin averaging ``part`` of the tensors for exchange ``step`` (only if :attr:`starts_parts`)."""
        raise NotImplementedError(f"{type(self).__name__} averages all tensors in one exchange (no start)")

    def set_worker_tensors(self, worker_tensors: Sequence[Sequence[torch.Tensor]]) -> None:
        """Every simulated worker's tensors for the next :meth:`average_` (only if :attr:`simulates_workers`)."""
        raise NotImplementedError(f"{type(self).__name__} averages across processes (no simulated workers)")

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (here: the cumulative costs); subclasses add their keys."""
        return {"stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.stats = CommStats(**state["stats"])


__all__ = ["Averager", "CommStats"]
