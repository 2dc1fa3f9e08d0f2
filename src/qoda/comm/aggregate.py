"""Averaging tensors across a ProcessGroup with layer-wise quantization: :class:`Aggregator`.

The aggregator runs one registered protocol (:mod:`qoda.comm.protocol`, the contract; the
built-ins in :mod:`qoda.comm.exchanges`) back to back on its :class:`ExchangeContext`.  Modes
(:class:`Mode`, or any name registered with :func:`~qoda.comm.protocol.register_protocol`):

* ``allgather`` - every rank quantizes its tensors once; payloads (padded to equal length,
  as gloo requires) are all-gathered; every rank decodes all of them in rank order and
  averages.  Faithful to the theory: ``Vbar = (1/K) sum_k Q(g_k)``, variance
  ``(1/K^2) sum_k E||Q(g_k) - g_k||^2``.  Bytes per rank grow with ``K``.
* ``two_phase`` - a compressed reduce-scatter (rank ``r`` receives every rank's quantized
  chunk ``r``, decodes and averages it), then the averaged chunk is re-quantized and
  all-gathered.  Bytes per rank stay ``~2 x`` one compressed vector whatever ``K``.  Still
  unbiased (``E[Q2(a)] = a``); the extra variance is that of the second quantization,
  ``E||Q2(a) - a||^2 <= eps_Q E||a||^2`` with ``a`` the phase-1 average.
* ``fp32`` / ``fp16`` - uncompressed all-reduce (fp16: scaled by ``1/K`` before the cast,
  like PyTorch's ``fp16_compress_hook``), for comparison.

Every mode leaves bitwise identical results on every rank: all ranks decode the same
payloads in the same order with the same arithmetic.  Failures are collective and travel in
the payload (:mod:`qoda.comm.protocol`): a
rank that cannot encode, or cannot decode its phase-1 chunk, sends a failure message instead,
so all ranks raise instead of one waiting forever.  Settings are compared across ranks when the
aggregator is built (plan fingerprint, mode, world size).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from qoda.codec.device import DeviceCodec
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.averager import Averager, CommStats  # CommStats: also importable from here, as before
from qoda.comm.exchanges import Mode
from qoda.comm.protocol import PROTOCOLS, AggregationError, ExchangeContext, Protocol, derive_seed, protocol_named
from qoda.quant.policy import LayerPlan

__all__ = [
    "AggregationError", "Aggregator", "CommStats", "Mode", "allreduce_sum", "average_payloads",
    "compare_across_ranks", "derive_seed",
]  # fmt: skip


def _mode_code(name: str) -> int:
    return zlib.crc32(name.encode())


def average_payloads(codec: LayerwiseCodec, payloads: Sequence[object], world: int) -> list[torch.Tensor]:
    """``(1/K) sum_k decode(payload_k)`` per group, summed in payload (rank) order.

    The one place the average is computed: the distributed modes and the in-process
    simulator share it, so both give bit-identical results.
    """
    acc = [torch.zeros(g.numel, dtype=torch.float32) for g in codec.groups]
    for p in payloads:
        codec.decode_flats_into(p, acc, accumulate=True)
    for a in acc:
        a.mul_(1.0 / world)
    return acc


def allreduce_sum(group: dist.ProcessGroup | None = None):
    """A ``reduce`` for :class:`qoda.quant.adapt.LevelAdapter`: sums a float64 array over the group."""

    def reduce(arr: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=group)
        return t.cpu().numpy()

    return reduce


def compare_across_ranks(
    values: Mapping[str, object], group: dist.ProcessGroup | None = None
) -> tuple[list[str], list[list[int]]]:
    """Compare settings across the ranks of ``group`` with one small all-gather of the CRC-32 of
    each value's ``str``: the names whose values differ between ranks, and every rank's digests
    (in ``values``' order).  Every rank must pass the same names in the same order."""
    mine = torch.tensor([zlib.crc32(str(v).encode()) for v in values.values()], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":  # NCCL moves CUDA tensors only
        mine = mine.to(torch.device("cuda", torch.cuda.current_device()))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    digests = [e.cpu().tolist() for e in everyone]
    differ = [name for i, name in enumerate(values) if len({d[i] for d in digests}) > 1]
    return differ, digests


class Aggregator(Averager):
    """Average per-layer tensors (plan order) across ``group``, in place (an :class:`Averager`).

    Args:
        plan: the layer plan (types and quantizer settings); identical on every rank.
        mode: a registered protocol's name (see :class:`Mode` for the built-ins).
        group: the process group (default: the world).
        seed: base seed; quantization noise is derived from ``(seed, step, rank, phase)``.
        check: compare settings across ranks now (one small all-gather).
    """

    def __init__(
        self, plan: LayerPlan, mode: Mode | str = Mode.ALLGATHER, group: dist.ProcessGroup | None = None,
        seed: int = 0, check: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        #: the protocol class every exchange runs (:data:`qoda.comm.protocol.PROTOCOLS`)
        self.protocol: type[Protocol] = protocol_named(mode)
        self.mode = self.protocol.name
        self.group = group
        self.codec = LayerwiseCodec(plan)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seed = int(seed)
        #: what the protocol sees: layout, message sizes, wire device, codec, reused send buffers
        self.context = ExchangeContext.build(self.codec, self.protocol, group, self.seed)
        #: bytes of this rank's whole message, fixed by the plan (``None`` with entropy coding: data-dependent)
        self.message_size = self.context.message_size
        if check:
            self._check_consistency()

    @property
    def plan(self) -> LayerPlan:
        """The plan this aggregator was built with (fixed: adapting levels builds a new aggregator)."""
        return self.codec.plan

    @property
    def wire_device(self) -> torch.device:
        """Where messages travel: the current GPU with NCCL, else the CPU."""
        return self.context.wire_device

    @property
    def device_codec(self) -> DeviceCodec | None:
        """The codec on the wire device when it is a GPU (:mod:`qoda.codec.device`), else ``None``."""
        return self.context.device_codec

    # ------------------------------------------------------------------ set-up
    def _check_consistency(self) -> None:
        mine = torch.tensor([self.codec.plan_id, _mode_code(self.mode), self.world], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.group)
        bad = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
        if bad:
            names = {_mode_code(n): n for n in PROTOCOLS}
            desc = ", ".join(
                f"rank {r}: plan {int(t[0]):08x} mode {names.get(int(t[1]), 'unregistered')}"
                for r, t in enumerate(everyone)
            )
            raise AggregationError(
                f"aggregation settings differ across ranks (layers, shapes, quantizer settings or mode): {desc}"
            )

    # ------------------------------------------------------------------ entry points
    def exchange(self, tensors: Sequence[torch.Tensor], step: int) -> Protocol:
        """One exchange of ``tensors`` at ``step``, not yet started (its stages: :class:`Protocol`)."""
        return self.protocol(self.context, tensors, step)

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        """Replace every tensor by its average over the ranks; returns this call's costs."""
        self.codec.check_tensors(tensors)
        stats = self.exchange(tensors, step).run()
        self.stats += stats
        return stats
