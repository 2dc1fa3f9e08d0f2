"""What one collective costs a rank on the wire: pure arithmetic, no collectives, no codec.

The terms every protocol's cost is written in (:meth:`qoda.comm.protocol.Protocol.cost`): ``K``
ranks, ``S = 8`` bytes of one size message (an int64).  Latency terms count sequential message
latencies (``alpha`` of the alpha-beta model): ``K-1`` per all-gather and all-to-all (ring /
pairwise steps), ``2(K-1)`` per ring all-reduce.  Integer sizes give the averagers' integer
accounting; float sizes (a model's averages) float costs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    return size_exchange(k) + data if sized else data


def all_to_all(k: int, sent: float, received: float, sized: bool = False) -> ExchangeCost:
    """An all-to-all: ``sent`` / ``received`` bytes to / from the ``K-1`` peers; ``sized``: one size
    per peer exchanged first."""
    data = ExchangeCost(sent, received, 0, 1, k - 1)
    return size_exchange(k) + data if sized else data


def size_exchange(k: int) -> ExchangeCost:
    """One int64 size to / from each of the ``K-1`` peers (a collective of its own, latency-bound)."""
    s = (k - 1) * SIZE_BYTES
    return ExchangeCost(s, s, s, 1, k - 1)


__all__ = ["SIZE_BYTES", "ExchangeCost", "all_gather", "all_to_all", "ring_allreduce", "size_exchange"]
