"""The built-in protocols (:mod:`qoda.comm.protocol`): ``fp32``, ``fp16``, ``allgather``, ``two_phase``.

Every collective is issued with ``async_op=True``; the synchronous caller waits at once.  No
failure all-reduce, no size exchange with fixed-width coding (every message size is known from
the plan): two-phase is one all-to-all and one all-gather (``2(K-1)`` latency terms), allgather
one all-gather (``K-1``), fp32/fp16 one ring all-reduce.  Entropy-coded messages have
data-dependent sizes: their sizes are exchanged first (one more small collective per phase),
as :meth:`~qoda.comm.protocol.Protocol.cost` counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from time import perf_counter as _now

import torch
import torch.distributed as dist

from qoda.codec.format import CodecError
from qoda.codec.layerwise import EncodedMessage, LayerwiseCodec, MessageStatus, SenderFailed
from qoda.comm.averager import CommStats
from qoda.comm.collective_cost import ExchangeCost, all_gather, all_to_all, ring_allreduce
from qoda.comm.partition import ExchangeLayout
from qoda.comm.protocol import (
    AggregationError,
    Protocol,
    charge,
    concat,
    derive_seed,
    error_text,
    nbytes,
    padded,
    raise_for,
    register_protocol,
    to_wire,
)


class Mode(StrEnum):
    """The built-in protocols' names (any registered name is a mode too)."""

    FP32 = "fp32"
    FP16 = "fp16"
    ALLGATHER = "allgather"
    TWO_PHASE = "two_phase"


class AllreduceExchange(Protocol):
    """Uncompressed ring all-reduce of the flat vector (scaled by ``1/K`` before the cast, like
    PyTorch's ``fp16_compress_hook``), for comparison.  Subclasses set the wire dtype."""

    wire_dtype: torch.dtype

    @classmethod
    def cost(cls, k: int, sizes: Sequence[float], rank: int = 0, sized: bool = False) -> ExchangeCost:
        return ring_allreduce(k, sizes[0])

    @classmethod
    def codec_work(cls, k: int) -> tuple[float, float]:
        return 0.0, 0.0

    def first_stage(self) -> dist.Work:
        ctx = self.ctx
        t0 = _now()
        flat = torch.cat([t.detach().reshape(-1).float() for t in self.tensors]).to(ctx.wire_device)
        flat.mul_(1.0 / ctx.world)
        self.wire = flat if self.wire_dtype is torch.float32 else flat.to(self.wire_dtype)
        self.t1 = _now()
        self.stats.encode_seconds += self.t1 - t0
        return dist.all_reduce(self.wire, group=ctx.group, async_op=True)

    def complete(self) -> CommStats:
        st, wire = self.stats, self.wire
        t2 = _now()
        flat = wire.float() if wire.dtype is not torch.float32 else wire
        if wire.dtype is torch.float16 and not bool(torch.isfinite(wire).all()):
            # every rank holds the same reduced vector, so every rank raises here
            raise AggregationError(
                "fp16 all-reduce overflowed (a value beyond +-65504 or a NaN/Inf input on some rank); "
                "use fp32 or a quantized mode, which carry per-bucket float32 norms"
            )
        offset = 0
        for t in self.tensors:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))  # any strides
            offset += t.numel()
        size = wire.numel() * wire.element_size()
        st.payload_bits = 8 * size
        charge(st, self.cost(self.ctx.world, [size]))
        st.comm_seconds += t2 - self.t1
        st.decode_seconds += _now() - t2
        return st


@register_protocol
class Fp32Exchange(AllreduceExchange):
    name = Mode.FP32
    element_bytes = 4
    wire_dtype = torch.float32


@register_protocol
class Fp16Exchange(AllreduceExchange):
    name = Mode.FP16
    element_bytes = 2
    wire_dtype = torch.float16


@register_protocol
class AllgatherExchange(Protocol):
    """Every rank quantizes its tensors once; the messages (padded to equal length, as gloo
    requires) are all-gathered; every rank decodes all of them in rank order and averages.

    1. :meth:`start`: encode this rank's message (seed ``(seed, step, rank)``) into the reused
       send buffer, or a failure message of the same size; entropy coding: all-gather the sizes
       first (blocking); issue the all-gather of the messages (padded to the longest).
    2. :meth:`finish`: decode the ``K`` messages in rank order, summing, divide by ``K`` and write
       the average into the tensors.  A failure message or a damaged payload makes every rank
       raise (all decode the same bytes).
    """

    name = Mode.ALLGATHER

    @classmethod
    def cost(cls, k: int, sizes: Sequence[float], rank: int = 0, sized: bool = False) -> ExchangeCost:
        """One all-gather of every rank's message padded to the longest (``sizes``: every rank's)."""
        return all_gather(k, max(sizes), sized)

    @classmethod
    def codec_work(cls, k: int) -> tuple[float, float]:
        return 1.0, float(k)  # encode one message, decode all K

    def first_stage(self) -> dist.Work:
        ctx = self.ctx
        t0 = _now()
        self.msg, data, self.error = ctx.encode_own(self.tensors, self.step, "message")
        if ctx.sizes is not None:
            self.sizes = ctx.sizes * ctx.world
            send = to_wire(data, ctx.wire_device)
        else:
            self.sizes = ctx.gather_sizes(nbytes(data))
            send = padded(data, max(self.sizes), ctx.wire_device)
        self.outs = [torch.empty_like(send) for _ in range(ctx.world)]
        self.t1 = _now()
        self.stats.encode_seconds += self.t1 - t0
        return dist.all_gather(self.outs, send, group=ctx.group, async_op=True)

    def complete(self) -> CommStats:
        ctx, st = self.ctx, self.stats
        t2 = _now()
        if self.error is not None:
            raise AggregationError(f"rank {ctx.rank} could not encode its gradients: {self.error}") from self.error
        # the device codec decodes where the messages arrived; the CPU codec on the host
        acc = ctx.average_messages(ctx.received(self.outs, self.sizes))
        ctx.codec.scatter(acc, self.tensors, accumulate=False)
        assert self.msg is not None
        st.payload_bits = self.msg.code_bits
        charge(st, self.cost(ctx.world, self.sizes, ctx.rank, sized=not ctx.fixed))
        st.comm_seconds += t2 - self.t1
        st.decode_seconds += _now() - t2
        return st


@register_protocol
class TwoPhaseExchange(Protocol):
    """A compressed reduce-scatter, then an all-gather of the re-quantized averaged chunks.  On
    rank ``r`` of ``K``, chunk ``c`` of every group is message ``c`` of the layout
    (:meth:`ExchangeLayout.chunks`: chunks end on bucket starts).

    Still unbiased (``E[Q2(a)] = a``); the extra variance is that of the second quantization,
    ``E||Q2(a) - a||^2 <= eps_Q E||a||^2`` with ``a`` the phase-1 average.  Bytes per rank stay
    ``~2 x`` one compressed vector whatever ``K``.

    Stage 1 (:meth:`start`):

    1. quantize chunk ``d`` of the local tensors for every rank ``d`` (seed
       ``(seed, step, r, 1, d)``) into one reused buffer; a rank that cannot encode sends
       failure messages of the same sizes;
    2. entropy coding only: all-to-all of the message sizes (blocking);
    3. all-to-all of the messages (asynchronous).

    Stage 2 (:meth:`advance`, once step 3 completed):

    4. decode the ``K`` messages of chunk ``r`` in source-rank order, summing, and divide by
       ``K``; a failure message or a damaged payload is remembered for step 5;
    5. re-quantize the averaged chunk ``r`` (seed ``(seed, step, r, 2)``), or send a failure
       message relaying step 4's failure (its origin kept);
    6. entropy coding only: all-gather of the sizes (blocking);
    7. all-gather of the averaged chunks padded to the longest (asynchronous).

    :meth:`finish`: 8. decode chunk ``c`` from rank ``c``'s message into the tensors; any failure
    message makes every rank raise, naming the origin.
    """

    name = Mode.TWO_PHASE

    @classmethod
    def stages(cls, k: int) -> int:
        return 2

    @classmethod
    def layout(cls, codec: LayerwiseCodec, k: int) -> ExchangeLayout:
        return ExchangeLayout.chunks(codec.groups, k)

    @classmethod
    def model_sizes(cls, k: int, message_bytes: float) -> list[float]:
        """An even split of the message (chunk headers neglected)."""
        return [message_bytes / k] * k

    @classmethod
    def cost(cls, k: int, sizes: Sequence[float], rank: int = 0, sized: bool = False) -> ExchangeCost:
        """``sizes[c]``: chunk ``c``'s message, the same from every rank and in both phases."""
        return cls.chunk_cost(k, sizes, sizes, rank, sized)

    @classmethod
    def chunk_cost(
        cls, k: int, chunks: Sequence[float], averaged: Sequence[float], rank: int = 0, sized: bool = False
    ) -> ExchangeCost:
        """``chunks[c]`` / ``averaged[c]``: chunk ``c``'s phase-1 / phase-2 message (the same from every rank)."""
        if len(chunks) != k or not 0 <= rank < k:
            raise ValueError(f"two_phase: need {k} chunk sizes and a rank in [0, {k}), got {len(chunks)} and {rank}")
        sent = sum(b for c, b in enumerate(chunks) if c != rank)
        return cls.traffic(k, sent, (k - 1) * chunks[rank], max(averaged), sized)

    @classmethod
    def traffic(cls, k: int, sent: float, received: float, averaged: float, sized: bool = False) -> ExchangeCost:
        """An all-to-all of ``sent`` / ``received`` bytes (phase 1), an all-gather of averaged chunks
        padded to ``averaged`` bytes (phase 2)."""
        return all_to_all(k, sent, received, sized) + all_gather(k, averaged, sized)

    @classmethod
    def codec_work(cls, k: int) -> tuple[float, float]:
        # encode the K chunks and the own average; decode K own chunks, the K averages
        return 1.0 + 1.0 / k, 2.0

    def first_stage(self) -> dist.Work:
        ctx, codec, st = self.ctx, self.ctx.codec, self.stats
        k, r, dev, layout = ctx.world, ctx.rank, ctx.wire_device, ctx.layout
        t0 = _now()
        fixed = ctx.sizes  # None with entropy coding
        self.msgs: list[EncodedMessage] | None = None
        self.error: Exception | None = None  # this rank's own encode failure
        self.relay: tuple[MessageStatus, int, str] | None = None  # what phase 2 reports, if anything
        buf = ctx.codec_buffer("chunks", None if fixed is None else sum(fixed))
        try:  # 1.
            flats = codec.gather(self.tensors)
            msgs, pos = [], 0
            for d in range(k):
                out = None if buf is None else buf[pos:]
                m = ctx.encoder.encode_flats(
                    layout.part(flats, d), derive_seed(ctx.seed, self.step, r, 1, d), layout.pieces[d], tag=d + 1,
                    out=out,
                )  # fmt: skip
                msgs.append(m)
                pos += len(m)
            self.msgs = msgs
            datas = [m.data for m in msgs]
        except Exception as e:  # told to every rank in the payload
            self.error = e
            text = error_text(e)
            datas = [
                ctx.failure(d + 1, MessageStatus.ENCODE_FAILED, r, text, None if fixed is None else fixed[d])
                for d in range(k)
            ]
        if fixed is not None:
            self.send_sizes, self.recv_sizes = list(fixed), [fixed[r]] * k
            contiguous = self.msgs is not None and buf is not None
            send = to_wire(buf[: sum(fixed)], dev) if contiguous else concat(datas, dev)  # type: ignore[index]
        else:  # 2.
            ss = torch.tensor([nbytes(d) for d in datas], dtype=torch.int64)
            rs = torch.empty(k, dtype=torch.int64, device=dev)
            dist.all_to_all_single(rs, ss.to(dev), group=ctx.group)
            self.send_sizes, self.recv_sizes = ss.tolist(), rs.cpu().tolist()
            send = concat(datas, dev)
        self.recv = torch.empty(sum(self.recv_sizes), dtype=torch.uint8, device=dev)
        self.t1 = _now()
        st.encode_seconds += self.t1 - t0
        return dist.all_to_all_single(  # 3.
            self.recv, send, output_split_sizes=self.recv_sizes, input_split_sizes=self.send_sizes,
            group=ctx.group, async_op=True,
        )  # fmt: skip

    def _average_own_chunk(self) -> list[torch.Tensor]:
        """Step 4: this rank's averaged chunk; a failure is kept in :attr:`relay`."""
        ctx = self.ctx
        k, r = ctx.world, ctx.rank
        own = ctx.layout.pieces[r]
        assert own is not None
        dc = ctx.device_codec
        acc = ctx.zeros([sum(p) for p in own])
        if self.error is not None:
            self.relay = (MessageStatus.ENCODE_FAILED, r, error_text(self.error))
            return acc
        recv = self.recv if dc else self.recv.cpu()
        for src, part in enumerate(recv.split(self.recv_sizes)):  # source-rank order
            try:
                payload = part if dc else part.numpy()
                ctx.encoder.decode_flats_into(payload, acc, accumulate=True, pieces=own, tag=r + 1)
            except SenderFailed as e:
                self.relay = (e.status, e.origin, e.text)
                return acc
            except Exception as e:
                self.relay = (MessageStatus.DECODE_FAILED, r, f"from rank {src}: {error_text(e)}")
                return acc
        for a in acc:
            a.mul_(1.0 / k)
        return acc

    def next_stage(self) -> dist.Work:
        ctx, st = self.ctx, self.stats
        k, r, dev = ctx.world, ctx.rank, ctx.wire_device
        t2 = _now()
        st.comm_seconds += t2 - self.t1
        acc = self._average_own_chunk()  # 4.
        t3 = _now()
        fixed = ctx.sizes
        width = None if fixed is None else max(fixed)
        buf = ctx.codec_buffer("average", width)
        self.msg2: EncodedMessage | None = None
        if self.relay is None:  # 5.
            try:
                self.msg2 = ctx.encoder.encode_flats(
                    acc, derive_seed(ctx.seed, self.step, r, 2), ctx.layout.pieces[r], tag=k + 1 + r, out=buf
                )
                data = self.msg2.data
            except Exception as e:
                self.relay = (MessageStatus.ENCODE_FAILED, r, error_text(e))
        if self.relay is not None:
            status, origin, text = self.relay
            data = ctx.failure(k + 1 + r, status, origin, text, None if fixed is None else fixed[r])
        if fixed is not None:
            self.sizes2 = list(fixed)
            # the reused buffer already holds zero padding behind the message (see send_buffer)
            in_place = buf is not None and self.msg2 is not None
            send = to_wire(buf[:width], dev) if in_place else padded(data, width, dev)  # type: ignore[index,arg-type]
        else:  # 6.
            self.sizes2 = ctx.gather_sizes(nbytes(data))
            send = padded(data, max(self.sizes2), dev)
        self.outs = [torch.empty_like(send) for _ in range(k)]
        self.t4 = _now()
        st.decode_seconds += t3 - t2
        st.encode_seconds += self.t4 - t3
        return dist.all_gather(self.outs, send, group=ctx.group, async_op=True)  # 7.

    def complete(self) -> CommStats:
        ctx, st = self.ctx, self.stats
        k, r, layout = ctx.world, ctx.rank, ctx.layout
        t5 = _now()
        if self.error is not None:
            raise AggregationError(f"rank {r} could not encode its chunks: {self.error}") from self.error
        payloads = ctx.received(self.outs, self.sizes2)
        result = ctx.zeros([g.numel for g in ctx.codec.groups], fill=False)  # 8.
        try:
            for c, p in enumerate(payloads):
                ctx.encoder.decode_flats_into(
                    p, layout.part(result, c), accumulate=False, pieces=layout.pieces[c], tag=k + 1 + c
                )
        except SenderFailed as e:
            raise_for(e, "chunks")
        except CodecError as e:
            raise AggregationError(f"received a damaged averaged chunk (nothing was applied) from rank {c}: {e}") from e
        ctx.codec.scatter(result, self.tensors, accumulate=False)
        assert self.msgs is not None and self.msg2 is not None
        st.payload_bits = sum(m.code_bits for d, m in enumerate(self.msgs) if d != r) + self.msg2.code_bits
        sent = sum(self.send_sizes) - self.send_sizes[r]
        received = sum(self.recv_sizes) - self.recv_sizes[r]
        charge(st, self.traffic(k, sent, received, max(self.sizes2), sized=not ctx.fixed))
        st.comm_seconds += t5 - self.t4
        st.decode_seconds += _now() - t5
        return st


__all__ = ["AllgatherExchange", "AllreduceExchange", "Fp16Exchange", "Fp32Exchange", "Mode", "TwoPhaseExchange"]
