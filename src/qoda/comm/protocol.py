"""The protocol contract: one collective exchange of quantized (or plain) tensors, as stages.

A *protocol* is how the ``K`` ranks of a group turn their per-layer tensors into the average.
Every protocol is a subclass of :class:`Protocol`, registered by name in :data:`PROTOCOLS`
(:func:`register_protocol`); its name is the averager's ``mode``.  A protocol states:

* the **layout** of its messages for ``K`` workers (:meth:`Protocol.layout`: which parts of the
  plan's group buffers each message carries, :class:`~qoda.comm.partition.ExchangeLayout`) and
  their sizes (:meth:`Protocol.message_sizes`: fixed by the plan, ``None`` with entropy coding);
* its **cost** per rank (:meth:`Protocol.cost`, in the terms of :mod:`qoda.comm.collective_cost`)
  and its **codec work** (:meth:`Protocol.codec_work`: whole-vector encodes and decodes per
  rank), which the cost model (:mod:`qoda.comm.cost`) and the step-time model
  (:mod:`qoda.comm.step_time`) read, and which the exchange charges to its own
  :class:`CommStats`, so the model and the accounting are one statement;
* its **asynchronous stages**, with the same names for every protocol: :meth:`Protocol.start`
  encodes and issues the first collective, :meth:`Protocol.advance` (``stages(K) - 1`` times)
  completes the stage in flight and issues the next, :meth:`Protocol.finish` (once the last
  stage's :attr:`Protocol.work` has completed; it never waits, so it may run in the work's
  completion callback) decodes, writes the average into the tensors and returns the costs.
  :meth:`Protocol.run` runs them back to back (the synchronous
  :class:`~qoda.comm.aggregate.Aggregator`); the DDP hook (:mod:`qoda.comm.ddp_hook`) issues the
  stages from its hook bodies, across buckets, and finishes in a future's continuation.

A protocol sees the group only through its :class:`ExchangeContext` (codec, group, rank, seed,
wire device, layout, message sizes, named reusable send buffers), built once per plan by the
averager.  The built-in protocols are in :mod:`qoda.comm.exchanges`.

Failures travel in the payload (wire format 2, :mod:`qoda.codec.layerwise`): a rank that cannot
encode sends a *failure message* of the size its receivers expect (:meth:`ExchangeContext.failure`),
so it takes part in every collective and every rank raises :class:`AggregationError` naming the
origin rank.  Every rank decodes the same bytes in the same order with the same arithmetic, so
results are bitwise identical across ranks, and so are failures found while decoding them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from qoda.codec.device import DeviceCodec
from qoda.codec.format import CodecError
from qoda.codec.layerwise import EncodedMessage, LayerwiseCodec, MessageStatus, SenderFailed, failure_message
from qoda.comm.averager import CommStats
from qoda.comm.collective_cost import ExchangeCost
from qoda.comm.partition import ExchangeLayout


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


def charge(st: CommStats, c: ExchangeCost) -> None:
    """Add the bytes of ``c`` (a protocol's :meth:`Protocol.cost`) to ``st``."""
    st.bytes_sent += int(c.bytes_sent)
    st.bytes_received += int(c.bytes_received)


# ---------------------------------------------------------------------------- messages on the wire
Bytes = np.ndarray | torch.Tensor  # a message: on the host (CPU codec) or the wire device (device codec)


def error_text(e: BaseException) -> str:
    """The reason a failure message carries."""
    return f"{type(e).__name__}: {e}" if not isinstance(e, CodecError | ValueError) else str(e)


def raise_for(e: SenderFailed, what: str) -> None:
    """Raise the :class:`AggregationError` a received failure message stands for."""
    if e.status is MessageStatus.ENCODE_FAILED:
        raise AggregationError(f"rank {e.origin} could not encode its {what}: {e.text}") from None
    raise AggregationError(f"rank {e.origin} received a damaged payload (nothing was applied): {e.text}") from None


def to_wire(arr: Bytes, dev: torch.device) -> torch.Tensor:
    """``arr`` as a tensor on ``dev`` (no copy if it is one already)."""
    t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr)
    return t if t.device == dev else t.to(dev)


def nbytes(arr: Bytes) -> int:
    return int(arr.numel() if isinstance(arr, torch.Tensor) else arr.size)


def padded(arr: Bytes, width: int, dev: torch.device) -> torch.Tensor:
    """``arr`` with zero padding up to ``width`` bytes (all-gathers need equal sizes), on ``dev``."""
    out = torch.zeros(width, dtype=torch.uint8, device=dev)
    out[: nbytes(arr)] = to_wire(arr, dev)
    return out


def concat(arrs: Sequence[Bytes], dev: torch.device) -> torch.Tensor:
    return torch.cat([to_wire(a, dev) for a in arrs])


def on_host(arr: Bytes) -> np.ndarray:
    """A received message on the host (the CPU codec, or naming the sender of a damaged payload)."""
    return arr.cpu().numpy() if isinstance(arr, torch.Tensor) else arr


# ---------------------------------------------------------------------------- the context
@dataclass
class ExchangeContext:
    """What a protocol may use of its averager: fixed for a plan, shared by its exchanges.

    ``sizes``: the bytes of each message of ``layout`` (:meth:`Protocol.message_sizes`), ``None``
    with entropy coding (data-dependent: exchanged first); ``message_size``: the bytes of one whole
    message of the plan (``None`` likewise).  ``device_codec``: the codec on the
    wire device when it is a GPU (NCCL moves CUDA tensors only; no host copy of the gradients),
    ``None``: the CPU (numba) codec.
    """

    codec: LayerwiseCodec
    group: dist.ProcessGroup | None
    world: int
    rank: int
    seed: int
    wire_device: torch.device
    device_codec: DeviceCodec | None
    layout: ExchangeLayout
    sizes: list[int] | None
    message_size: int | None
    _host_buffers: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _device_buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, codec: LayerwiseCodec, protocol: type[Protocol], group: dist.ProcessGroup | None = None, seed: int = 0
    ) -> ExchangeContext:
        """The context of ``protocol`` on ``group`` (the wire device decided once, here)."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"
        wire = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        layout = protocol.layout(codec, world)
        return cls(
            codec, group, world, rank, int(seed), wire, DeviceCodec(codec, wire) if wire.type != "cpu" else None,
            layout, protocol.message_sizes(codec, layout), codec.message_size(),
        )  # fmt: skip

    @property
    def fixed(self) -> bool:
        """Whether every message size is known from the plan (fixed-width coding)."""
        return self.sizes is not None

    @property
    def encoder(self) -> LayerwiseCodec | DeviceCodec:
        """The codec that encodes and decodes: the device codec if there is one, else the CPU codec."""
        return self.device_codec or self.codec

    def send_buffer(self, name: str, size: int | None) -> np.ndarray | None:
        """The reused host send buffer ``name`` of ``size`` bytes (``None`` for ``size=None``: entropy
        coding, whose sizes depend on the data).  Zeroed once; bytes behind what a message writes stay
        zero (its padding).  Reuse spares the allocator's fresh-page faults on every step; a buffer is
        free again once the exchange that used it has finished."""
        if size is None:
            return None
        buf = self._host_buffers.get(name)
        if buf is None:
            buf = self._host_buffers[name] = np.zeros(size, dtype=np.uint8)
        return buf

    def codec_buffer(self, name: str, size: int | None) -> np.ndarray | torch.Tensor | None:
        """:meth:`send_buffer` where the codec writes: on the wire device with the device codec."""
        host = self.send_buffer(name, size)
        if host is None or self.device_codec is None:
            return host
        buf = self._device_buffers.get(name)
        if buf is None:
            buf = self._device_buffers[name] = torch.zeros(host.size, dtype=torch.uint8, device=self.wire_device)
        return buf

    def failure(
        self, tag: int, status: MessageStatus, origin: int, text: str, size: int | None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """A failure message of ``size`` bytes (what receivers expect), tagged like the message it replaces."""
        return failure_message(len(self.codec.groups), self.codec.plan_id ^ tag, status, origin, text, size, out)

    def gather_sizes(self, n: int) -> list[int]:
        """Blocking all-gather of one size per rank (entropy coding: sizes depend on the data)."""
        size = torch.tensor([n], dtype=torch.int64, device=self.wire_device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        return [int(s) for s in sizes]

    def received(self, outs: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[Bytes]:
        """The received messages cut to their sizes: where they arrived (device codec) or on the host."""
        dev = self.device_codec is not None
        return [o[:n] if dev else o[:n].cpu().numpy() for o, n in zip(outs, sizes, strict=True)]

    def zeros(self, numels: Sequence[int], fill: bool = True) -> list[torch.Tensor]:
        """float32 accumulators where the codec decodes (``fill=False``: uninitialised, for a
        decode that overwrites every coordinate)."""
        on = self.device_codec.device if self.device_codec else None
        new = torch.zeros if fill else torch.empty
        return [new(n, dtype=torch.float32, device=on) for n in numels]

    def encode_own(
        self, tensors: Sequence[torch.Tensor], step: int, buffer: str
    ) -> tuple[EncodedMessage | None, Bytes, Exception | None]:
        """This rank's whole message (seed ``(seed, step, rank)``, into send buffer ``buffer``), or a
        failure message of the same size: ``(message or None, bytes to send, error or None)``."""
        size = self.message_size
        try:
            flats = self.codec.gather(tensors)
            msg = self.encoder.encode_flats(flats, derive_seed(self.seed, step, self.rank),
                                            out=self.codec_buffer(buffer, size))  # fmt: skip
            return msg, msg.data, None
        except Exception as e:  # told to every rank in the payload
            failed = self.failure(0, MessageStatus.ENCODE_FAILED, self.rank, error_text(e), size,
                                  self.send_buffer(buffer, size))  # fmt: skip
            return None, failed, e

    def average_messages(self, messages: Sequence[Bytes]) -> list[torch.Tensor]:
        """``(1/K) sum_k decode(message_k)`` per group, the ``K`` whole messages decoded in rank order.
        A failure message or a damaged payload raises :class:`AggregationError` (every rank decodes
        the same bytes, so every rank raises), naming the sender."""
        codec = self.codec
        acc = self.zeros([g.numel for g in codec.groups])
        try:
            for m in messages:
                self.encoder.decode_flats_into(m, acc, accumulate=True)
        except SenderFailed as e:
            raise_for(e, "gradients")
        except CodecError:  # name the sender(s) of what does not decode
            bad = []
            for r, m in enumerate(messages):
                try:
                    codec.decode(on_host(m))
                except CodecError as e:
                    bad.append(f"rank {r}: {e}")
            raise AggregationError(f"received a damaged payload (nothing was applied) from {'; '.join(bad)}") from None
        for a in acc:
            a.mul_(1.0 / self.world)
        return acc


# ---------------------------------------------------------------------------- the contract
class Protocol(abc.ABC):
    """One exchange of ``tensors`` (plan order) at ``step`` on ``ctx``, in asynchronous stages.

    Subclasses set :attr:`name`, implement :meth:`first_stage` (and :meth:`next_stage` when
    :meth:`stages` is more than 1), :meth:`complete`, :meth:`cost` and :meth:`codec_work`, and
    override :meth:`layout` / :meth:`stages` / :meth:`model_sizes` where theirs differ from one
    whole message in one stage.  Quantization noise is derived from ``(ctx.seed, step, rank, ...)``.
    """

    #: the registry key, the averager's ``mode``
    name: ClassVar[str]
    #: bytes per coordinate on the wire of an uncompressed protocol (all-reduce); ``None``: the
    #: protocol sends the codec's messages
    element_bytes: ClassVar[int | None] = None

    def __init__(self, ctx: ExchangeContext, tensors: Sequence[torch.Tensor], step: int) -> None:
        self.ctx, self.tensors, self.step = ctx, list(tensors), step
        self.stats = CommStats()
        self.work: dist.Work | None = None  # the collective in flight
        self.issued = 0  # stages issued so far

    # ------------------------------------------------------------------ what it sends, what it costs
    @classmethod
    def quantizes(cls) -> bool:
        """Whether this protocol sends the codec's messages (else: plain floats)."""
        return cls.element_bytes is None

    @classmethod
    def stages(cls, k: int) -> int:
        """Collectives issued one after the other (each may need the previous one's result)."""
        return 1

    @classmethod
    def layout(cls, codec: LayerwiseCodec, k: int) -> ExchangeLayout:
        """The messages one rank encodes for ``k`` workers (default: one whole message)."""
        return ExchangeLayout.whole()

    @classmethod
    def message_sizes(cls, codec: LayerwiseCodec, layout: ExchangeLayout) -> list[int] | None:
        """Bytes of each message of ``layout`` (``None`` with entropy coding); an uncompressed
        protocol's one message is the vector, ``element_bytes`` per coordinate."""
        if cls.element_bytes is not None:
            return [cls.element_bytes * sum(e.numel for e in codec.plan.entries)]
        sizes = [codec.message_size(p) for p in layout.pieces]
        return None if any(s is None for s in sizes) else sizes  # type: ignore[return-value]

    @classmethod
    def model_sizes(cls, k: int, message_bytes: float) -> list[float]:
        """The layout's message sizes for a whole message of ``message_bytes`` (the step-time model's
        measured sizes; default: the one whole message)."""
        return [message_bytes]

    @classmethod
    @abc.abstractmethod
    def cost(cls, k: int, sizes: Sequence[float], rank: int = 0, sized: bool = False) -> ExchangeCost:
        """Rank ``rank``'s cost among ``k`` ranks; ``sizes[i]``: message ``i`` of the layout (the same
        from every rank); ``sized``: entropy coding (sizes exchanged first)."""

    @classmethod
    @abc.abstractmethod
    def codec_work(cls, k: int) -> tuple[float, float]:
        """``(encodes, decodes)`` per rank and exchange, in whole-vector passes of the codec."""

    # ------------------------------------------------------------------ the stages
    @property
    def remaining(self) -> int:
        """Stages not yet issued."""
        return self.stages(self.ctx.world) - self.issued

    def start(self) -> None:
        """Stage 1: encode and issue the first collective asynchronously (:attr:`work`)."""
        if self.issued:
            raise RuntimeError(f"{self.name}: start() called twice")
        self.work = self.first_stage()
        self.issued = 1

    def advance(self) -> None:
        """Wait for the stage in flight, then issue the next (from a hook body, never a callback)."""
        if not 0 < self.issued < self.stages(self.ctx.world):
            raise RuntimeError(f"{self.name}: advance() with no stage to issue ({self.issued} issued)")
        assert self.work is not None
        self.work.wait()
        self.work = self.next_stage()
        self.issued += 1

    def finish(self) -> CommStats:
        """Once the last stage's :attr:`work` has completed: decode, write the average into the
        tensors, return this exchange's costs (never waits)."""
        if self.remaining:
            raise RuntimeError(f"{self.name}: finish() with {self.remaining} stage(s) not issued")
        st = self.complete()
        st.calls = 1
        return st

    def run(self) -> CommStats:
        """All stages back to back (the synchronous exchange)."""
        self.start()
        while self.remaining:
            self.advance()
        assert self.work is not None
        self.work.wait()
        return self.finish()

    @abc.abstractmethod
    def first_stage(self) -> dist.Work:
        """Encode and issue the first collective (``async_op=True``); returns its work."""

    def next_stage(self) -> dist.Work:
        """The previous stage's work has completed: use its result, issue the next collective."""
        raise NotImplementedError(f"{self.name}: one stage only")

    @abc.abstractmethod
    def complete(self) -> CommStats:
        """The last work has completed: decode, write the tensors, account (:func:`charge`)."""


#: name -> protocol class: the averagers' modes (built-ins: :mod:`qoda.comm.exchanges`)
PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: add ``cls`` to :data:`PROTOCOLS` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_protocol: {cls.__name__} needs a non-empty str name")
    name = str(name)  # a StrEnum member's value
    if PROTOCOLS.get(name, cls) is not cls and PROTOCOLS[name].__qualname__ != cls.__qualname__:
        raise ValueError(f"register_protocol: {name!r} is already {PROTOCOLS[name].__qualname__}")
    PROTOCOLS[name] = cls
    return cls


def protocol_named(name: object) -> type[Protocol]:
    """The protocol registered as ``name`` (a clear error naming the ``mode`` otherwise)."""
    proto = PROTOCOLS.get(str(name)) if isinstance(name, str) else None
    if proto is None:
        raise ValueError(f"mode: expected one of {list(PROTOCOLS)}, got {name!r}")
    return proto


__all__ = [
    "PROTOCOLS", "AggregationError", "Bytes", "ExchangeContext", "Protocol", "charge", "derive_seed",
    "protocol_named", "register_protocol",
]  # fmt: skip
