"""What one exchange costs on the wire: pure arithmetic, no collectives.

Each exchange protocol's cost per rank, stated by the protocol (:meth:`Protocol.cost`), as the
averagers account it (``CommStats.bytes_sent`` / ``bytes_received``; ``tests/test_cost.py``
checks the equality on real gloo processes), and the latency and byte terms of the step-time
model (:mod:`qoda.comm.step_time`).  ``K`` ranks, ``B`` bytes of an uncompressed vector, ``m`` bytes
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

The collectives' terms are :mod:`qoda.comm.collective_cost`; each protocol's cost is its own
:meth:`~qoda.comm.protocol.Protocol.cost` (the one statement, which the exchanges also charge to
their statistics); this module applies them to a plan (:func:`exchange_cost`, through the
protocol registry) or to given sizes (measured, or entropy-coded: data-dependent;
:func:`allgather`, :func:`two_phase`).  Message sizes come from the plan for fixed-width coding
(:meth:`Protocol.message_sizes`; two-phase chunks from
:meth:`qoda.comm.partition.ExchangeLayout.chunks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.baselines import powersgd_payload_floats
from qoda.comm.collective_cost import SIZE_BYTES, ExchangeCost, all_gather, all_to_all, ring_allreduce, size_exchange
from qoda.comm.exchanges import AllgatherExchange, Fp16Exchange, Fp32Exchange, TwoPhaseExchange
from qoda.comm.partition import ExchangeLayout
from qoda.comm.protocol import PROTOCOLS, protocol_named
from qoda.quant.policy import LayerPlan


# ---------------------------------------------------------------------------- modes
def fp32(k: int, numel: float) -> ExchangeCost:
    return Fp32Exchange.cost(k, [Fp32Exchange.element_bytes * numel])


def fp16(k: int, numel: float) -> ExchangeCost:
    return Fp16Exchange.cost(k, [Fp16Exchange.element_bytes * numel])


def powersgd(k: int, floats: float) -> ExchangeCost:
    """A compressing PowerSGD exchange: ``floats`` per worker (:func:`qoda.comm.baselines.powersgd_payload_floats`)
    over three ring all-reduces (the uncompressed tensors, ``P``, ``Q``)."""
    return ring_allreduce(k, 4 * floats, collectives=3)


def allgather(k: int, message_bytes: float | Sequence[float], sized: bool = False) -> ExchangeCost:
    """``message_bytes``: every rank's message (one number if all are equal, as with fixed width);
    ``sized``: entropy coding (sizes exchanged first)."""
    sizes = list(message_bytes) if isinstance(message_bytes, Sequence) else [message_bytes]
    return AllgatherExchange.cost(k, sizes, sized=sized)


def two_phase(
    k: int, chunk_bytes: Sequence[float], rank: int = 0, averaged_bytes: Sequence[float] | None = None,
    sized: bool = False,
) -> ExchangeCost:  # fmt: skip
    """Rank ``rank``'s cost; ``chunk_bytes[c]``: the phase-1 message of chunk ``c`` (the same from
    every rank), ``averaged_bytes[c]``: the phase-2 message of chunk ``c`` (default: ``chunk_bytes``,
    as with fixed width); ``sized``: entropy coding (sizes exchanged first in both phases)."""
    averaged = chunk_bytes if averaged_bytes is None else averaged_bytes
    return TwoPhaseExchange.chunk_cost(k, chunk_bytes, averaged, rank, sized)


def allgather_message_bytes(k: int, bytes_sent: float, sized: bool = False) -> float:
    """The message size behind an allgather exchange's ``bytes_sent`` (inverse of :func:`allgather`)."""
    return bytes_sent / (k - 1) - (SIZE_BYTES if sized else 0)


# ---------------------------------------------------------------------------- from a plan
def two_phase_pieces(codec: LayerwiseCodec, k: int) -> list[list[tuple[int, ...]]]:
    """``[chunk][group]`` layer pieces of the two-phase chunks (:meth:`ExchangeLayout.chunks`)."""
    return ExchangeLayout.chunks(codec.groups, k).pieces  # type: ignore[return-value]


def exchange_cost(
    mode: str, k: int, plan: LayerPlan | None = None, *, shapes: Sequence[torch.Size] | None = None,
    powersgd_rank: int = 1, compressing: bool = True, rank: int = 0,
) -> ExchangeCost:  # fmt: skip
    """Rank ``rank``'s cost of one exchange of ``mode`` (a registered protocol, or ``powersgd``) among
    ``k`` ranks, from the plan (fixed-width coding; uncompressed protocols and ``powersgd`` need
    only the shapes).  ``compressing=False``: PowerSGD before its ``start_iter`` (a plain all-reduce)."""
    if shapes is None and plan is not None:
        shapes = [e.shape for e in plan.entries]
    if mode == "powersgd":
        numel = _numel(mode, shapes)
        return powersgd(k, powersgd_payload_floats(shapes, powersgd_rank)) if compressing else fp32(k, numel)  # type: ignore[arg-type]
    if mode not in PROTOCOLS:
        raise ValueError(f"mode: expected one of {[*PROTOCOLS, 'powersgd']}, got {mode!r}")
    proto = protocol_named(mode)
    if proto.element_bytes is not None:
        return proto.cost(k, [proto.element_bytes * _numel(mode, shapes)], rank)
    if plan is None:
        raise ValueError(f"{mode}: needs the plan")
    codec = LayerwiseCodec(plan)
    sizes = proto.message_sizes(codec, proto.layout(codec, k))
    if sizes is None:
        raise ValueError(
            "an entropy-coded plan: message sizes depend on the data; give them to allgather()/two_phase()"
        )
    return proto.cost(k, sizes, rank)


def _numel(mode: str, shapes: Sequence[torch.Size] | None) -> int:
    if shapes is None:
        raise ValueError(f"{mode}: needs the plan or the shapes")
    return sum(int(torch.Size(s).numel()) for s in shapes)


__all__ = [
    "SIZE_BYTES", "ExchangeCost", "all_gather", "all_to_all", "allgather", "allgather_message_bytes", "exchange_cost",
    "fp16", "fp32", "powersgd", "ring_allreduce", "size_exchange", "two_phase", "two_phase_pieces",
]  # fmt: skip
