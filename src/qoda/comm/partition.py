"""Splitting a group's flat coordinate range into one chunk per rank (two-phase aggregation).

Chunk boundaries fall on bucket starts, so that a chunk quantized on its own (its pieces of
layers given as layer sizes) is bucketed exactly as the whole group would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qoda.quant.quantizer import bucket_starts


def chunk_bounds(numels: Sequence[int], bucket_size: int | None, k: int) -> list[int]:
    """``k + 1`` non-decreasing offsets ``0 = c_0 <= ... <= c_k = n``, as even as bucket starts allow."""
    n = int(sum(numels))
    if bucket_size is None:
        return [round(i * n / k) for i in range(k + 1)]
    starts = bucket_starts(numels, bucket_size)
    out = [0]
    for i in range(1, k):
        target = i * n / k
        j = int(np.searchsorted(starts, target))
        cands = [int(starts[m]) for m in (j - 1, j) if 0 <= m < len(starts)]
        best = min(cands, key=lambda c: (abs(c - target), c))
        out.append(max(best, out[-1]))
    out.append(n)
    return out


def chunk_pieces(numels: Sequence[int], lo: int, hi: int) -> tuple[int, ...]:
    """Sizes of the non-empty intersections of consecutive layers with ``[lo, hi)``."""
    pieces = []
    offset = 0
    for n in numels:
        a, b = max(offset, lo), min(offset + n, hi)
        if b > a:
            pieces.append(b - a)
        offset += n
    return tuple(pieces)
