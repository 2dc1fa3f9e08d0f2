"""One quantized exchange as explicit steps: the wire protocols of ``allgather`` and ``two_phase``.

The one implementation of both protocols: :class:`~qoda.comm.aggregate.Aggregator` runs the
steps back to back, the DDP hook (:mod:`qoda.comm.ddp_hook`) issues them from its hook bodies
and finishes them in a future's continuation.  Every collective is issued with
``async_op=True``; the synchronous caller waits at once.

Failures travel in the payload (wire format 2, :mod:`qoda.codec.layerwise`): a rank that cannot
encode (NaN/Inf input, norm overflow) sends a *failure message* of the size its receivers expect,
with the reason as text, so it takes part in every collective and every rank raises
:class:`AggregationError` naming the origin rank.  No failure all-reduce, no size exchange with
fixed-width coding (every message size is known from the plan): two-phase is one all-to-all
and one all-gather (``2(K-1)`` latency terms), allgather one all-gather (``K-1``).  Entropy-coded
messages have data-dependent sizes: their sizes are exchanged first (one more small collective
per phase), as :mod:`qoda.comm.cost` counts.

Every rank decodes the same bytes in the same order with the same arithmetic, so results are
bitwise identical across ranks, and so are failures found while decoding them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from qoda.codec.format import CodecError
from qoda.codec.layerwise import EncodedMessage, LayerwiseCodec, MessageStatus, SenderFailed, failure_message
from qoda.comm import cost
from qoda.comm.averager import CommStats

if TYPE_CHECKING:  # pragma: no cover
    from qoda.comm.aggregate import Aggregator


class AggregationError(RuntimeError):
    """A rank failed during aggregation (reported on every rank)."""


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 chain): independent noise per step/rank/phase."""
    mask = 0xFFFFFFFFFFFFFFFF
    z = 0x243F6A8885A308D3
    for p in parts:
        z = (z ^ (p & mask)) + 0x9E3779B97F4A7C15 & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return z


def charge(st: CommStats, c: cost.ExchangeCost) -> None:
    """Add the bytes of ``c`` (:mod:`qoda.comm.cost`, the one statement of each protocol's cost)."""
    st.bytes_sent += int(c.bytes_sent)
    st.bytes_received += int(c.bytes_received)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, CodecError | ValueError) else str(e)


def _failure(codec: LayerwiseCodec, tag: int, status: MessageStatus, origin: int, text: str, size: int | None,
             out: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    return failure_message(len(codec.groups), codec.plan_id ^ tag, status, origin, text, size, out)


def _raise_for(e: SenderFailed, what: str) -> None:
    if e.status is MessageStatus.ENCODE_FAILED:
        raise AggregationError(f"rank {e.origin} could not encode its {what}: {e.text}") from None
    raise AggregationError(f"rank {e.origin} received a damaged payload (nothing was applied): {e.text}") from None


Bytes = np.ndarray | torch.Tensor  # a message: on the host (CPU codec) or the wire device (device codec)


def _wire(arr: Bytes, dev: torch.device) -> torch.Tensor:
    t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr)
    return t if t.device == dev else t.to(dev)


def _nbytes(arr: Bytes) -> int:
    return int(arr.numel() if isinstance(arr, torch.Tensor) else arr.size)


def _padded(arr: Bytes, width: int, dev: torch.device) -> torch.Tensor:
    """``arr`` with zero padding up to ``width`` bytes (all-gathers need equal sizes), on ``dev``."""
    out = torch.zeros(width, dtype=torch.uint8, device=dev)
    out[: _nbytes(arr)] = _wire(arr, dev)
    return out


def _concat(arrs: Sequence[Bytes], dev: torch.device) -> torch.Tensor:
    return torch.cat([_wire(a, dev) for a in arrs])


def _received(outs: Sequence[torch.Tensor], sizes: Sequence[int], on_device: bool) -> list[Bytes]:
    """The received messages cut to their sizes: where they arrived (device codec) or on the host."""
    return [o[:n] if on_device else o[:n].cpu().numpy() for o, n in zip(outs, sizes, strict=True)]


def _host(arr: Bytes) -> np.ndarray:
    """A received message on the host (the CPU codec, or naming the sender of a damaged payload)."""
    return arr.cpu().numpy() if isinstance(arr, torch.Tensor) else arr


def _gather_sizes(agg: Aggregator, n: int) -> list[int]:
    """Blocking all-gather of one size per rank (entropy coding: sizes depend on the data)."""
    size = torch.tensor([n], dtype=torch.int64, device=agg.wire_device)
    sizes = [torch.empty_like(size) for _ in range(agg.world)]
    dist.all_gather(sizes, size, group=agg.group)
    return [int(s) for s in sizes]


class AllgatherExchange:
    """One allgather exchange of ``tensors`` (plan order) at ``step``.

    1. :meth:`start`: encode this rank's message (seed ``(seed, step, rank)``) into the
       aggregator's reused send buffer, or a failure message of the same size; entropy coding:
       all-gather the sizes first (blocking); issue the all-gather of the messages (padded to the
       longest) asynchronously.
    2. :meth:`finish` (after :attr:`work` completed): decode the ``K`` messages in rank order,
       summing, divide by ``K`` and write the average into the tensors.  A failure message or a
       damaged payload makes every rank raise (all decode the same bytes).
    """

    def __init__(self, agg: Aggregator, tensors: Sequence[torch.Tensor], step: int) -> None:
        self.agg, self.tensors, self.step = agg, list(tensors), step
        self.stats = CommStats()
        self.msg: EncodedMessage | None = None
        self.error: Exception | None = None
        self.work: dist.Work | None = None

    def start(self) -> None:
        agg, codec, st = self.agg, self.agg.codec, self.stats
        t0 = time.perf_counter()
        fixed = agg.message_size
        dc = agg.device_codec
        try:
            flats, seed = codec.gather(self.tensors), derive_seed(agg.seed, self.step, agg.rank)
            if dc is None:
                self.msg = codec.encode_flats(flats, seed, out=agg.send_buffer(0))
            else:
                self.msg = dc.encode_flats(flats, seed, out=agg.device_send_buffer(0))
            data = self.msg.data
        except Exception as e:  # told to every rank in the payload
            self.error = e
            data = _failure(codec, 0, MessageStatus.ENCODE_FAILED, agg.rank, _error_text(e), fixed, agg.send_buffer(0))
        if fixed is not None:
            self.sizes = [fixed] * agg.world
            send = _wire(data, agg.wire_device)
        else:
            self.sizes = _gather_sizes(agg, _nbytes(data))
            send = _padded(data, max(self.sizes), agg.wire_device)
        self.outs = [torch.empty_like(send) for _ in range(agg.world)]
        self.t1 = time.perf_counter()
        st.encode_seconds += self.t1 - t0
        self.work = dist.all_gather(self.outs, send, group=agg.group, async_op=True)

    def run(self) -> CommStats:
        """Both steps back to back (the synchronous exchange)."""
        self.start()
        assert self.work is not None
        self.work.wait()
        return self.finish()

    def finish(self) -> CommStats:
        """Step 2, once :attr:`work` has completed (never waits: it may run in the work's own
        completion callback, where waiting deadlocks)."""
        agg, codec, st = self.agg, self.agg.codec, self.stats
        t2 = time.perf_counter()
        if self.error is not None:
            raise AggregationError(f"rank {agg.rank} could not encode its gradients: {self.error}") from self.error
        dc = agg.device_codec
        # the device codec decodes where the messages arrived; the CPU codec on the host
        arrays = _received(self.outs, self.sizes, dc is not None)
        acc = [torch.zeros(g.numel, dtype=torch.float32, device=dc.device if dc else None) for g in codec.groups]
        try:
            for a in arrays:
                (dc or codec).decode_flats_into(a, acc, accumulate=True)
        except SenderFailed as e:
            _raise_for(e, "gradients")
        except CodecError:  # name the sender(s) of what does not decode
            bad = []
            for r, a in enumerate(arrays):
                try:
                    codec.decode(_host(a))
                except CodecError as e:
                    bad.append(f"rank {r}: {e}")
            raise AggregationError(f"received a damaged payload (nothing was applied) from {'; '.join(bad)}") from None
        for a in acc:
            a.mul_(1.0 / agg.world)
        codec.scatter(acc, self.tensors, accumulate=False)
        assert self.msg is not None
        st.payload_bits = self.msg.code_bits
        charge(st, cost.allgather(agg.world, max(self.sizes), sized=agg.message_size is None))
        st.comm_seconds += t2 - self.t1
        st.decode_seconds += time.perf_counter() - t2
        st.calls = 1
        return st


class TwoPhaseExchange:
    """One two-phase exchange: a compressed reduce-scatter, then an all-gather of the re-quantized
    averaged chunks.  On rank ``r`` of ``K``, chunk ``c`` of every group is ``agg.bounds[c]``.

    Phase 1 (:meth:`start_phase1`, then the first half of :meth:`start_phase2`):

    1. quantize chunk ``d`` of the local tensors for every rank ``d`` (seed
       ``(seed, step, r, 1, d)``) into one reused buffer; a rank that cannot encode sends
       failure messages of the same sizes;
    2. entropy coding only: all-to-all of the message sizes (blocking);
    3. all-to-all of the messages (asynchronous);
    4. decode the ``K`` messages of chunk ``r`` in source-rank order, summing, and divide by
       ``K``; a failure message or a damaged payload is remembered for step 5.

    Phase 2 (:meth:`start_phase2`, :meth:`finish`):

    5. re-quantize the averaged chunk ``r`` (seed ``(seed, step, r, 2)``), or send a failure
       message relaying step 4's failure (its origin kept);
    6. entropy coding only: all-gather of the sizes (blocking);
    7. all-gather of the averaged chunks padded to the longest (asynchronous);
    8. decode chunk ``c`` from rank ``c``'s message into the tensors; any failure message makes
       every rank raise, naming the origin.
    """

    def __init__(self, agg: Aggregator, tensors: Sequence[torch.Tensor], step: int) -> None:
        self.agg, self.tensors, self.step = agg, list(tensors), step
        self.stats = CommStats()
        self.msgs: list[EncodedMessage] | None = None
        self.error: Exception | None = None  # this rank's own encode failure
        self.relay: tuple[MessageStatus, int, str] | None = None  # what phase 2 reports, if anything
        self.work1: dist.Work | None = None
        self.work2: dist.Work | None = None

    # ------------------------------------------------------------------ phase 1
    def start_phase1(self) -> None:
        agg, codec, st = self.agg, self.agg.codec, self.stats
        k, r, dev = agg.world, agg.rank, agg.wire_device
        t0 = time.perf_counter()
        fixed = agg.chunk_sizes  # None with entropy coding
        dc = agg.device_codec
        buf = agg.send_buffer(1) if dc is None else agg.device_send_buffer(1)
        try:  # 1.
            flats = codec.gather(self.tensors)
            msgs, pos = [], 0
            for d in range(k):
                out = None if buf is None else buf[pos:]
                m = (dc or codec).encode_flats(
                    agg.chunk(flats, d), derive_seed(agg.seed, self.step, r, 1, d), agg.pieces[d], tag=d + 1, out=out
                )
                msgs.append(m)
                pos += len(m)
            self.msgs = msgs
            datas = [m.data for m in msgs]
        except Exception as e:  # told to every rank in the payload
            self.error = e
            text = _error_text(e)
            datas = [
                _failure(codec, d + 1, MessageStatus.ENCODE_FAILED, r, text, None if fixed is None else fixed[d])
                for d in range(k)
            ]
        if fixed is not None:
            self.send_sizes, self.recv_sizes = list(fixed), [fixed[r]] * k
            contiguous = self.msgs is not None and buf is not None
            send = _wire(buf[: sum(fixed)], dev) if contiguous else _concat(datas, dev)
        else:  # 2.
            ss = torch.tensor([_nbytes(d) for d in datas], dtype=torch.int64)
            rs = torch.empty(k, dtype=torch.int64, device=dev)
            dist.all_to_all_single(rs, ss.to(dev), group=agg.group)
            self.send_sizes, self.recv_sizes = ss.tolist(), rs.cpu().tolist()
            send = _concat(datas, dev)
        self.recv = torch.empty(sum(self.recv_sizes), dtype=torch.uint8, device=dev)
        self.t1 = time.perf_counter()
        st.encode_seconds += self.t1 - t0
        self.work1 = dist.all_to_all_single(  # 3.
            self.recv, send, output_split_sizes=self.recv_sizes, input_split_sizes=self.send_sizes,
            group=agg.group, async_op=True,
        )  # fmt: skip

    def _average_own_chunk(self) -> list[torch.Tensor]:
        """Step 4: this rank's averaged chunk; a failure is kept in :attr:`relay`."""
        agg, codec = self.agg, self.agg.codec
        k, r = agg.world, agg.rank
        own = agg.pieces[r]
        dc = agg.device_codec
        acc = [torch.zeros(sum(p), dtype=torch.float32, device=dc.device if dc else None) for p in own]
        if self.error is not None:
            self.relay = (MessageStatus.ENCODE_FAILED, r, _error_text(self.error))
            return acc
        recv = self.recv if dc else self.recv.cpu()
        for src, part in enumerate(recv.split(self.recv_sizes)):  # source-rank order
            try:
                payload = part if dc else part.numpy()
                (dc or codec).decode_flats_into(payload, acc, accumulate=True, pieces=own, tag=r + 1)
            except SenderFailed as e:
                self.relay = (e.status, e.origin, e.text)
                return acc
            except Exception as e:
                self.relay = (MessageStatus.DECODE_FAILED, r, f"from rank {src}: {_error_text(e)}")
                return acc
        for a in acc:
            a.mul_(1.0 / k)
        return acc

    # ------------------------------------------------------------------ phase 2
    def start_phase2(self) -> None:
        agg, codec, st = self.agg, self.agg.codec, self.stats
        k, r, dev = agg.world, agg.rank, agg.wire_device
        assert self.work1 is not None
        self.work1.wait()
        t2 = time.perf_counter()
        st.comm_seconds += t2 - self.t1
        acc = self._average_own_chunk()  # 4.
        t3 = time.perf_counter()
        fixed = agg.chunk_sizes
        width = None if fixed is None else max(fixed)
        dc = agg.device_codec
        buf = agg.send_buffer(2) if dc is None else agg.device_send_buffer(2)
        self.msg2: EncodedMessage | None = None
        if self.relay is None:  # 5.
            try:
                self.msg2 = (dc or codec).encode_flats(
                    acc, derive_seed(agg.seed, self.step, r, 2), agg.pieces[r], tag=k + 1 + r, out=buf
                )
                data = self.msg2.data
            except Exception as e:
                self.relay = (MessageStatus.ENCODE_FAILED, r, _error_text(e))
        if self.relay is not None:
            status, origin, text = self.relay
            data = _failure(codec, k + 1 + r, status, origin, text, None if fixed is None else fixed[r])
        if fixed is not None:
            self.sizes2 = list(fixed)
            # the reused buffer already holds zero padding behind the message (see send_buffer)
            in_place = buf is not None and self.msg2 is not None
            send = _wire(buf[:width], dev) if in_place else _padded(data, width, dev)
        else:  # 6.
            self.sizes2 = _gather_sizes(agg, _nbytes(data))
            send = _padded(data, max(self.sizes2), dev)
        self.outs = [torch.empty_like(send) for _ in range(k)]
        self.t4 = time.perf_counter()
        st.decode_seconds += t3 - t2
        st.encode_seconds += self.t4 - t3
        self.work2 = dist.all_gather(self.outs, send, group=agg.group, async_op=True)  # 7.

    def run(self) -> CommStats:
        """All steps back to back (the synchronous exchange)."""
        self.start_phase1()
        self.start_phase2()
        assert self.work2 is not None
        self.work2.wait()
        return self.finish()

    def finish(self) -> CommStats:
        """Step 8, once :attr:`work2` has completed (never waits: it may run in the work's own
        completion callback, where waiting deadlocks)."""
        agg, codec, st = self.agg, self.agg.codec, self.stats
        k, r = agg.world, agg.rank
        t5 = time.perf_counter()
        if self.error is not None:
            raise AggregationError(f"rank {r} could not encode its chunks: {self.error}") from self.error
        dc = agg.device_codec
        payloads = _received(self.outs, self.sizes2, dc is not None)
        on = dc.device if dc else None
        result = [torch.empty(g.numel, dtype=torch.float32, device=on) for g in codec.groups]  # 8.
        try:
            for c, p in enumerate(payloads):
                (dc or codec).decode_flats_into(
                    p, agg.chunk(result, c), accumulate=False, pieces=agg.pieces[c], tag=k + 1 + c
                )
        except SenderFailed as e:
            _raise_for(e, "chunks")
        except CodecError as e:
            raise AggregationError(f"received a damaged averaged chunk (nothing was applied) from rank {c}: {e}") from e
        codec.scatter(result, self.tensors, accumulate=False)
        assert self.msgs is not None and self.msg2 is not None
        st.payload_bits = sum(m.code_bits for d, m in enumerate(self.msgs) if d != r) + self.msg2.code_bits
        sent = sum(self.send_sizes) - self.send_sizes[r]
        received = sum(self.recv_sizes) - self.recv_sizes[r]
        sized = agg.chunk_sizes is None
        charge(st, cost.all_to_all(k, sent, received, sized=sized) + cost.all_gather(k, max(self.sizes2), sized=sized))
        st.comm_seconds += t5 - self.t4
        st.decode_seconds += time.perf_counter() - t5
        st.calls = 1
        return st
