"""Averaging tensors across a ProcessGroup with layer-wise quantization.

Modes (:class:`Mode`):

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
the payload (:mod:`qoda.comm.protocol`, the one implementation of the quantized protocols): a
rank that cannot encode, or cannot decode its phase-1 chunk, sends a failure message instead,
so all ranks raise instead of one waiting forever.  Settings are compared across ranks when the
aggregator is built (plan fingerprint, mode, world size).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np
import torch
import torch.distributed as dist

from qoda.codec.device import DeviceCodec
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm import cost
from qoda.comm.averager import Averager, CommStats  # CommStats: also importable from here, as before
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.comm.protocol import AggregationError, AllgatherExchange, TwoPhaseExchange, charge, derive_seed
from qoda.quant.policy import LayerPlan

__all__ = [
    "AggregationError", "Aggregator", "CommStats", "Mode", "allreduce_sum", "average_payloads",
    "compare_across_ranks", "derive_seed",
]  # fmt: skip


class Mode(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    ALLGATHER = "allgather"
    TWO_PHASE = "two_phase"


_MODE_CODES = {m: i for i, m in enumerate(Mode)}


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
        mode: see :class:`Mode`.
        group: the process group (default: the world).
        seed: base seed; quantization noise is derived from ``(seed, step, rank, phase)``.
        check: compare settings across ranks now (one small all-gather).
    """

    def __init__(
        self, plan: LayerPlan, mode: Mode | str = Mode.ALLGATHER, group: dist.ProcessGroup | None = None,
        seed: int = 0, check: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ValueError(f"mode: expected one of {[m.value for m in Mode]}, got {mode!r}") from None
        self.group = group
        self.codec = LayerwiseCodec(plan)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seed = int(seed)
        self._buffers: dict[int, np.ndarray] = {}  # reused send buffers, see send_buffer
        #: bytes of this rank's message, fixed by the plan (``None`` with entropy coding: data-dependent)
        self.message_size = self.codec.message_size()
        # NCCL moves CUDA tensors only: there the codec runs on the GPU too (decided once, here)
        nccl = dist.get_backend(group) == "nccl"
        self.wire_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        #: the codec on the wire device when it is a GPU (:mod:`qoda.codec.device`: no host copy of
        #: the gradients); ``None``: the CPU (numba) codec
        self.device_codec = DeviceCodec(self.codec, self.wire_device) if self.wire_device.type != "cpu" else None
        self._device_buffers: dict[int, torch.Tensor] = {}
        if check:
            self._check_consistency()
        self.bounds: list[list[int]] = []
        self.pieces: list[list[tuple[int, ...]]] = []  # [chunk][group] layer pieces
        if self.mode is Mode.TWO_PHASE:
            for g in self.codec.groups:
                bs = None if g.config is None else g.config.bucket_size
                self.bounds.append(chunk_bounds(g.numels, bs, self.world))
            self.pieces = [
                [chunk_pieces(g.numels, b[c], b[c + 1]) for g, b in zip(self.codec.groups, self.bounds, strict=True)]
                for c in range(self.world)
            ]
        #: two-phase: bytes of chunk ``c``'s messages (both phases; ``None`` with entropy coding)
        self.chunk_sizes: list[int] | None = None
        if self.mode is Mode.TWO_PHASE and self.message_size is not None:
            self.chunk_sizes = [int(self.codec.message_size(p)) for p in self.pieces]  # type: ignore[arg-type]

    @property
    def plan(self) -> LayerPlan:
        """The plan this aggregator was built with (fixed: adapting levels builds a new aggregator)."""
        return self.codec.plan

    # ------------------------------------------------------------------ set-up
    def _check_consistency(self) -> None:
        mine = torch.tensor([self.codec.plan_id, _MODE_CODES[self.mode], self.world], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.group)
        bad = [r for r, t in enumerate(everyone) if not torch.equal(t, everyone[0])]
        if bad:
            desc = ", ".join(
                f"rank {r}: plan {int(t[0]):08x} mode {list(Mode)[int(t[1])].value}" for r, t in enumerate(everyone)
            )
            raise AggregationError(
                f"aggregation settings differ across ranks (layers, shapes, quantizer settings or mode): {desc}"
            )

    # ------------------------------------------------------------------ entry point
    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        """Replace every tensor by its average over the ranks; returns this call's costs."""
        self.codec.check_tensors(tensors)
        if self.mode in (Mode.FP32, Mode.FP16):
            stats = self._allreduce(tensors)
        elif self.mode is Mode.ALLGATHER:
            stats = AllgatherExchange(self, tensors, step).run()
        else:
            stats = TwoPhaseExchange(self, tensors, step).run()
        stats.calls = 1
        self.stats += stats
        return stats

    # ------------------------------------------------------------------ modes
    def _allreduce(self, tensors: Sequence[torch.Tensor]) -> CommStats:
        st = CommStats()
        t0 = time.perf_counter()
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(self.wire_device).mul_(1.0 / self.world)
        wire = flat.half() if self.mode is Mode.FP16 else flat
        t1 = time.perf_counter()
        dist.all_reduce(wire, group=self.group)
        t2 = time.perf_counter()
        flat = wire.float() if self.mode is Mode.FP16 else wire
        if self.mode is Mode.FP16 and not bool(torch.isfinite(wire).all()):
            # every rank holds the same reduced vector, so every rank raises here
            raise AggregationError(
                "fp16 all-reduce overflowed (a value beyond +-65504 or a NaN/Inf input on some rank); "
                "use fp32 or a quantized mode, which carry per-bucket float32 norms"
            )
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))  # any strides
            offset += t.numel()
        st.payload_bits = 8 * wire.numel() * wire.element_size()
        charge(st, cost.ring_allreduce(self.world, wire.numel() * wire.element_size()))
        st.encode_seconds, st.comm_seconds, st.decode_seconds = t1 - t0, t2 - t1, time.perf_counter() - t2
        return st

    def send_buffer(self, which: int) -> np.ndarray | None:
        """A reused send buffer (``None`` with entropy coding, whose sizes depend on the data):
        0 the allgather message, 1 the ``K`` phase-1 chunk messages back to back, 2 this rank's
        phase-2 message with zero padding up to the longest chunk message (the padding is never
        written, so it stays zero).  Reuse spares the allocator's fresh-page faults on every step;
        a buffer is free again once the exchange that used it has finished."""
        if self.message_size is None:
            return None
        buf = self._buffers.get(which)
        if buf is None:
            sizes = self.chunk_sizes or [self.message_size]
            n = (self.message_size, sum(sizes), max(sizes))[which]
            buf = self._buffers[which] = np.zeros(n, dtype=np.uint8)
        return buf

    def device_send_buffer(self, which: int) -> torch.Tensor | None:
        """:meth:`send_buffer` on the wire device, for the device codec (zero padding likewise)."""
        host = self.send_buffer(which)
        if host is None:
            return None
        buf = self._device_buffers.get(which)
        if buf is None:
            buf = self._device_buffers[which] = torch.zeros(host.size, dtype=torch.uint8, device=self.wire_device)
        return buf

    def chunk(self, flats: Sequence[torch.Tensor], c: int) -> list[torch.Tensor]:
        """Chunk ``c`` of every group buffer (two-phase)."""
        return [f[b[c] : b[c + 1]] for f, b in zip(flats, self.bounds, strict=True)]
