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
payloads in the same order with the same arithmetic.  Failures are collective: a rank that
cannot decode its phase-1 chunk tells the others through a one-integer all-reduce, so all
ranks raise instead of one waiting forever.  Settings are compared across ranks when the
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

from qoda.codec.format import CodecError
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm import cost
from qoda.comm.averager import Averager, CommStats  # CommStats: also importable from here, as before
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.quant.policy import LayerPlan

_MASK64 = 0xFFFFFFFFFFFFFFFF


class Mode(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    ALLGATHER = "allgather"
    TWO_PHASE = "two_phase"


_MODE_CODES = {m: i for i, m in enumerate(Mode)}


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 chain): independent noise per step/rank/phase."""
    z = 0x243F6A8885A308D3
    for p in parts:
        z = (z ^ (p & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


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


def _charge(st: CommStats, c: cost.ExchangeCost) -> None:
    """Add the bytes of ``c`` (:mod:`qoda.comm.cost`, the one statement of each protocol's cost)."""
    st.bytes_sent += int(c.bytes_sent)
    st.bytes_received += int(c.bytes_received)


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


class AggregationError(RuntimeError):
    """A rank failed during aggregation (reported on every rank)."""


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
        self._buffer: np.ndarray | None = None  # reused send buffer (allgather), see _send_buffer
        self._message_size = self.codec.message_size()  # fixed by the plan; None for entropy coding
        # NCCL moves CUDA tensors only; codes are packed and decoded on the host either way
        nccl = dist.get_backend(group) == "nccl"
        self.wire_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
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
            stats = self._allgather(tensors, step)
        else:
            stats = self._two_phase(tensors, step)
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
        _charge(st, cost.ring_allreduce(self.world, wire.numel() * wire.element_size()))
        st.encode_seconds, st.comm_seconds, st.decode_seconds = t1 - t0, t2 - t1, time.perf_counter() - t2
        return st

    def _all_gather_bytes(self, payload: torch.Tensor, what: str) -> tuple[list[torch.Tensor], int]:
        """All-gather variable-length uint8 payloads (sizes first, then padded data).

        An empty payload means "this rank failed to encode": every rank then raises.
        """
        dev = self.wire_device
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        n = [int(s) for s in sizes]
        failed = [r for r, k in enumerate(n) if k == 0]
        if failed:
            raise AggregationError(f"rank(s) {failed} could not encode their {what} (see their errors)")
        padded = torch.zeros(max(n), dtype=torch.uint8, device=dev)
        padded[: payload.numel()] = payload.to(dev)
        outs = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(outs, padded, group=self.group)
        return [o[:k].cpu() for o, k in zip(outs, n, strict=True)], max(n)

    def _send_buffer(self) -> np.ndarray | None:
        """The reused buffer this rank's allgather message is encoded into (``None`` for
        entropy coding, whose size depends on the data).  Reuse spares the default allocator's
        fresh-page faults on every step; the message is copied into the wire tensor before the
        next call."""
        if self._message_size is None:
            return None
        if self._buffer is None:
            self._buffer = np.empty(self._message_size, dtype=np.uint8)
        return self._buffer

    def _encode_or_empty(self, fn, *args, **kwargs):
        """Encode; on failure return ``(None, error)`` so the rank can still tell the others."""
        try:
            return fn(*args, **kwargs), None
        except Exception as e:
            return None, e

    def _allgather(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        st = CommStats()
        t0 = time.perf_counter()
        msg, err = self._encode_or_empty(
            self.codec.encode_flats, self.codec.gather(tensors), derive_seed(self.seed, step, self.rank),
            out=self._send_buffer(),
        )  # fmt: skip
        t1 = time.perf_counter()
        data = torch.from_numpy(msg.data) if msg is not None else torch.zeros(0, dtype=torch.uint8)
        try:
            payloads, longest = self._all_gather_bytes(data, "gradients")
        except AggregationError as e:
            if err is None:
                raise
            raise AggregationError(f"rank {self.rank} could not encode its gradients: {err}") from e
        t2 = time.perf_counter()
        arrays = [p.numpy() for p in payloads]
        try:
            acc = average_payloads(self.codec, arrays, self.world)
        except CodecError:
            # every rank decodes the same payloads, so every rank fails here; name the sender(s)
            bad = []
            for r, a in enumerate(arrays):
                try:
                    self.codec.decode(a)
                except CodecError as e:
                    bad.append(f"rank {r}: {e}")
            raise AggregationError(f"received a damaged payload (nothing was applied) from {'; '.join(bad)}") from None
        self.codec.scatter(acc, tensors, accumulate=False)
        st.payload_bits = msg.code_bits
        _charge(st, cost.variable_all_gather(self.world, longest))
        st.encode_seconds, st.comm_seconds, st.decode_seconds = t1 - t0, t2 - t1, time.perf_counter() - t2
        return st

    def _chunk(self, flats: Sequence[torch.Tensor], c: int) -> list[torch.Tensor]:
        return [f[b[c] : b[c + 1]] for f, b in zip(flats, self.bounds, strict=True)]

    def _collective_failure(self, err: Exception | None) -> None:
        """All ranks learn whether any rank failed; all raise if one did."""
        flag = torch.tensor([0 if err is None else self.rank + 1], dtype=torch.int64, device=self.wire_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag) == 0:
            return
        if err is not None:
            raise AggregationError(f"rank {self.rank} could not decode its phase-1 chunk: {err}") from err
        raise AggregationError(f"rank {int(flag) - 1} could not decode its phase-1 chunk (see that rank's error)")

    def _two_phase(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        """Two-phase average: a compressed reduce-scatter, then an all-gather of the re-quantized
        averaged chunks.  On rank ``r`` of ``K``, chunk ``c`` of every group is ``bounds[c]``:

        Phase 1 (:meth:`_phase1`), rank ``r`` ends with the average of chunk ``r``:

        1. quantize chunk ``d`` of the local tensors for every rank ``d`` (seed
           ``(seed, step, r, 1, d)``); a rank that cannot encode sends sizes of 0;
        2. all-to-all the message sizes; a size of 0 anywhere makes every rank raise;
        3. all-to-all the messages;
        4. decode the ``K`` messages of chunk ``r`` in source-rank order, summing them, and
           divide by ``K``; a decode failure is reported collectively (one-integer all-reduce)
           so every rank raises.

        Phase 2 (:meth:`_phase2`), every rank ends with every averaged chunk:

        5. re-quantize the averaged chunk ``r`` (seed ``(seed, step, r, 2)``);
        6. all-gather the re-quantized chunks (sizes, then padded messages);
        7. decode chunk ``c`` from rank ``c``'s message and write the result into the tensors.
        """
        st = CommStats()
        own_avg = self._phase1(tensors, step, st)
        self._phase2(own_avg, tensors, step, st)
        return st

    def _phase1(self, tensors: Sequence[torch.Tensor], step: int, st: CommStats) -> list[torch.Tensor]:
        """Steps 1-4 of :meth:`_two_phase`: this rank's averaged chunk (one flat per group);
        phase 1's costs go into ``st``."""
        k, r, dev = self.world, self.rank, self.wire_device
        t0 = time.perf_counter()
        flats = self.codec.gather(tensors)

        def encode_chunks() -> list:  # 1.
            return [
                self.codec.encode_flats(
                    self._chunk(flats, d), derive_seed(self.seed, step, r, 1, d), self.pieces[d], tag=d + 1
                )
                for d in range(k)
            ]

        msgs, enc_err = self._encode_or_empty(encode_chunks)
        if msgs is None:  # size 0 to everyone: "this rank failed"
            send = torch.zeros(0, dtype=torch.uint8)
            send_sizes = torch.zeros(k, dtype=torch.int64)
        else:
            send = torch.from_numpy(np.concatenate([m.data for m in msgs]))
            send_sizes = torch.tensor([len(m) for m in msgs], dtype=torch.int64)
        t1 = time.perf_counter()
        recv_sizes = torch.empty(k, dtype=torch.int64, device=dev)  # 2.
        dist.all_to_all_single(recv_sizes, send_sizes.to(dev), group=self.group)
        recv_sizes = recv_sizes.cpu()
        failed = [src for src in range(k) if int(recv_sizes[src]) == 0]
        if failed or msgs is None:
            why = f"rank {r} could not encode its chunks: {enc_err}" if enc_err else (
                f"rank(s) {failed} could not encode")  # fmt: skip
            raise AggregationError(why) from enc_err
        recv = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8, device=dev)  # 3.
        dist.all_to_all_single(
            recv, send.to(dev), output_split_sizes=recv_sizes.tolist(), input_split_sizes=send_sizes.tolist(),
            group=self.group,
        )  # fmt: skip
        recv = recv.cpu()
        t2 = time.perf_counter()
        own = self.pieces[r]  # 4.
        acc = [torch.zeros(sum(p), dtype=torch.float32) for p in own]
        dec_err: Exception | None = None
        try:
            for part in recv.split(recv_sizes.tolist()):  # source-rank order
                self.codec.decode_flats_into(part.numpy(), acc, accumulate=True, pieces=own, tag=r + 1)
        except Exception as e:  # reported collectively below
            dec_err = e
        self._collective_failure(dec_err)
        for a in acc:
            a.mul_(1.0 / k)
        t3 = time.perf_counter()
        st.payload_bits += sum(m.code_bits for d, m in enumerate(msgs) if d != r)
        sent, received = int(send_sizes.sum()) - len(msgs[r]), int(recv_sizes.sum()) - int(recv_sizes[r])
        _charge(st, cost.sized_all_to_all(k, sent, received))  # messages and sizes (step 2)
        st.encode_seconds += t1 - t0
        st.comm_seconds += t2 - t1
        st.decode_seconds += t3 - t2
        return acc

    def _phase2(self, own_avg: list[torch.Tensor], tensors: Sequence[torch.Tensor], step: int, st: CommStats) -> None:
        """Steps 5-7 of :meth:`_two_phase`: every rank's averaged chunk, written into ``tensors``;
        phase 2's costs go into ``st``."""
        k, r = self.world, self.rank
        t3 = time.perf_counter()
        msg2 = self.codec.encode_flats(own_avg, derive_seed(self.seed, step, r, 2), self.pieces[r], tag=k + 1 + r)  # 5.
        t4 = time.perf_counter()
        payloads, longest = self._all_gather_bytes(torch.from_numpy(msg2.data), "averaged chunk")  # 6.
        t5 = time.perf_counter()
        result = [torch.empty(g.numel, dtype=torch.float32) for g in self.codec.groups]  # 7.
        for c, p in enumerate(payloads):
            self.codec.decode_flats_into(
                p.numpy(), self._chunk(result, c), accumulate=False, pieces=self.pieces[c], tag=k + 1 + c
            )
        self.codec.scatter(result, tensors, accumulate=False)
        st.payload_bits += msg2.code_bits
        _charge(st, cost.variable_all_gather(k, longest))  # padded messages and their sizes
        st.encode_seconds += t4 - t3
        st.comm_seconds += t5 - t4
        st.decode_seconds += time.perf_counter() - t5
