"""What one exchange costs on the wire: pure arithmetic, no collectives.

The one statement of each exchange protocol's cost, per rank, as the averagers account it
(``CommStats.bytes_sent`` / ``bytes_received``; ``tests/test_cost.py`` checks the equality on
real gloo processes), and the latency and byte terms of the alpha-beta
model of ``qoda bench scaling``.  ``K`` ranks, ``B`` bytes of an uncompressed vector, ``m`` bytes
of a quantized message, ``S = 8`` bytes of one size message (an int64):

=========  ================================================================  ===========  =======
mode       collectives, in order                                             bytes sent   latency
=========  ================================================================  ===========  =======
fp32/fp16  ring all-reduce of the vector (``B = 4n`` / ``2n``)               2(K-1)B//K   2(K-1)
powersgd   3 ring all-reduces (whole tensors, ``P``, ``Q``) of ``f`` floats  2(K-1)4f//K  6(K-1)
           (before ``start_iter``: one ring all-reduce of the vector, as fp32)
allgather  all-gather of the messages (fixed width: all ``m`` bytes, known    (K-1)m       K-1
           from the plan; entropy coding: sizes all-gathered first, then
           the messages padded to the longest ``m``: ``+(K-1)S``, ``+K-1``)
two_phase  all-to-all of the chunk messages, all-gather of the averaged      see below    2(K-1)
           chunks padded to the longest ``a`` (entropy coding: a size
           all-to-all and a size all-gather first: ``+2(K-1)S``, ``+2(K-1)``)
=========  ================================================================  ===========  =======

Failures travel in the payload (a status field of wire format 2, :mod:`qoda.comm.protocol`),
so no protocol has a failure collective.

Two-phase, rank ``r``, chunk ``c``'s message ``m_c`` bytes (the same from every rank with
fixed-width coding): sent ``sum_{c != r} m_c + (K-1) a``, received ``(K-1) m_r + (K-1) a``, with
``a = max_c m_c`` for fixed-width coding (plus ``2(K-1) S`` each way with entropy coding).

Latency terms count sequential message latencies (``alpha`` in the model): ``K-1`` per all-gather
and all-to-all (ring / pairwise steps), ``2(K-1)`` per ring all-reduce.

Message sizes come from the plan for fixed-width coding (:meth:`LayerwiseCodec.message_size`;
two-phase chunks from :mod:`qoda.comm.partition`, see :func:`two_phase_pieces`), or are given
(measured, or entropy-coded: data-dependent) to :func:`allgather` and :func:`two_phase`.  Integer
sizes give the averagers' integer accounting; float sizes (a model's averages) float costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.quant.policy import LayerPlan

SIZE_BYTES = 8  # one int64 message size, sent before variable-length payloads


@dataclass(frozen=True)
class ExchangeCost:
    """Per-rank cost of one exchange (or of several, added with ``+``).

    ``size_bytes`` is the part of both ``bytes_sent`` and ``bytes_received`` that is size
    messages: latency-bound, so the alpha-beta model (:meth:`seconds`) counts them as latency
    terms only.
    """

    bytes_sent: float = 0
    bytes_received: float = 0
    size_bytes: float = 0
    collectives: int = 0
    latency_terms: int = 0

    def __add__(self, other: ExchangeCost) -> ExchangeCost:
        return ExchangeCost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def payload_bytes(self) -> float:
        """Bytes of data on the busier direction of this rank's link, size messages excluded."""
        return max(self.bytes_sent, self.bytes_received) - self.size_bytes

    def seconds(self, alpha: float, beta: float) -> float:
        """Alpha-beta time: ``latency_terms * alpha + payload_bytes / beta`` (``beta`` bytes/s)."""
        return self.latency_terms * alpha + self.payload_bytes / beta


# ---------------------------------------------------------------------------- collectives
def ring_allreduce(k: int, nbytes: float, collectives: int = 1) -> ExchangeCost:
    """``collectives`` ring all-reduces of ``nbytes`` bytes in all: ``2(K-1)/K`` of them each way
    (rounded down to whole bytes for integer ``nbytes``, as the averagers count them; exact, the
    mean over ranks, for a float)."""
    moved = 2 * (k - 1) * nbytes // k if isinstance(nbytes, int) else 2 * (k - 1) * nbytes / k
    return ExchangeCost(moved, moved, 0, collectives, 2 * (k - 1) * collectives)


def all_gather(k: int, nbytes: float, sized: bool = False) -> ExchangeCost:
    """An all-gather of ``nbytes`` per rank (messages padded to the longest); ``sized``: their sizes
    all-gathered first (data-dependent sizes)."""
    moved = (k - 1) * nbytes
    data = ExchangeCost(moved, moved, 0, 1, k - 1)
    return _size_exchange(k) + data if sized else data


def all_to_all(k: int, sent: float, received: float, sized: bool = False) -> ExchangeCost:
    """An all-to-all: ``sent`` / ``received`` bytes to / from the ``K-1`` peers; ``sized``: one size
    per peer exchanged first."""
    data = ExchangeCost(sent, received, 0, 1, k - 1)
    return _size_exchange(k) + data if sized else data


def _size_exchange(k: int) -> ExchangeCost:
    """One int64 size to / from each of the ``K-1`` peers (a collective of its own, latency-bound)."""
    s = (k - 1) * SIZE_BYTES
    return ExchangeCost(s, s, s, 1, k - 1)


# ---------------------------------------------------------------------------- modes
def fp32(k: int, numel: float) -> ExchangeCost:
    return ring_allreduce(k, 4 * numel)


def fp16(k: int, numel: float) -> ExchangeCost:
    return ring_allreduce(k, 2 * numel)


def powersgd(k: int, floats: float) -> ExchangeCost:
    """A compressing PowerSGD exchange: ``floats`` per worker (:func:`qoda.comm.baselines.powersgd_payload_floats`)
    over three ring all-reduces (the uncompressed tensors, ``P``, ``Q``)."""
    return ring_allreduce(k, 4 * floats, collectives=3)


def allgather(k: int, message_bytes: float | Sequence[float], sized: bool = False) -> ExchangeCost:
    """``message_bytes``: every rank's message (one number if all are equal, as with fixed width);
    ``sized``: entropy coding (sizes exchanged first)."""
    longest = max(message_bytes) if isinstance(message_bytes, Sequence) else message_bytes
    return all_gather(k, longest, sized)


def two_phase(
    k: int, chunk_bytes: Sequence[float], rank: int = 0, averaged_bytes: Sequence[float] | None = None,
    sized: bool = False,
) -> ExchangeCost:  # fmt: skip
    """Rank ``rank``'s cost; ``chunk_bytes[c]``: the phase-1 message of chunk ``c`` (the same from
    every rank), ``averaged_bytes[c]``: the phase-2 message of chunk ``c`` (default: ``chunk_bytes``,
    as with fixed width); ``sized``: entropy coding (sizes exchanged first in both phases)."""
    if len(chunk_bytes) != k or not 0 <= rank < k:
        raise ValueError(f"two_phase: need {k} chunk sizes and a rank in [0, {k}), got {len(chunk_bytes)} and {rank}")
    averaged = chunk_bytes if averaged_bytes is None else averaged_bytes
    sent = sum(b for c, b in enumerate(chunk_bytes) if c != rank)
    return all_to_all(k, sent, (k - 1) * chunk_bytes[rank], sized) + all_gather(k, max(averaged), sized)


def allgather_message_bytes(k: int, bytes_sent: float, sized: bool = False) -> float:
    """The message size behind an allgather exchange's ``bytes_sent`` (inverse of :func:`allgather`)."""
    return bytes_sent / (k - 1) - (SIZE_BYTES if sized else 0)


# ---------------------------------------------------------------------------- from a plan
def two_phase_pieces(codec: LayerwiseCodec, k: int) -> list[list[tuple[int, ...]]]:
    """``[chunk][group]`` layer pieces of the two-phase chunks: chunks end on bucket starts."""
    bounds = [chunk_bounds(g.numels, None if g.config is None else g.config.bucket_size, k) for g in codec.groups]
    return [
        [chunk_pieces(g.numels, b[c], b[c + 1]) for g, b in zip(codec.groups, bounds, strict=True)] for c in range(k)
    ]


def _fixed_size(size: int | None) -> int:
    if size is None:
        raise ValueError(
            "an entropy-coded plan: message sizes depend on the data; give them to allgather()/two_phase()"
        )
    return size


def exchange_cost(
    mode: str, k: int, plan: LayerPlan | None = None, *, shapes: Sequence[torch.Size] | None = None,
    powersgd_rank: int = 1, compressing: bool = True, rank: int = 0,
) -> ExchangeCost:  # fmt: skip
    """Rank ``rank``'s cost of one exchange of ``mode`` among ``k`` ranks, from the plan (fixed-width
    coding; ``fp32``, ``fp16`` and ``powersgd`` need only the shapes).  ``compressing=False``:
    PowerSGD before its ``start_iter`` (a plain all-reduce)."""
    if shapes is None and plan is not None:
        shapes = [e.shape for e in plan.entries]
    if mode in ("fp32", "fp16", "powersgd"):
        if shapes is None:
            raise ValueError(f"{mode}: needs the plan or the shapes")
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        if mode == "fp16":
            return fp16(k, numel)
        if mode == "powersgd" and compressing:
            from qoda.comm.baselines import powersgd_payload_floats

            return powersgd(k, powersgd_payload_floats(shapes, powersgd_rank))
        return fp32(k, numel)
    if mode not in ("allgather", "two_phase"):
        raise ValueError(f"mode: expected one of fp32, fp16, powersgd, allgather, two_phase, got {mode!r}")
    if plan is None:
        raise ValueError(f"{mode}: needs the plan")
    codec = LayerwiseCodec(plan)
    if mode == "allgather":
        return allgather(k, _fixed_size(codec.message_size()))
    chunks = [_fixed_size(codec.message_size(p)) for p in two_phase_pieces(codec, k)]
    return two_phase(k, chunks, rank)
