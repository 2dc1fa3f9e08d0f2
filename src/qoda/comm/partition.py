"""The messages of an exchange as parts of the group buffers; two-phase chunks, one per rank.

Chunk boundaries fall on bucket starts, so that a chunk quantized on its own (its pieces of
layers given as layer sizes) is bucketed exactly as the whole group would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qoda.codec.layerwise import Group
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


@dataclass
class ExchangeLayout:
    """The messages one rank sends in an exchange, as parts of the plan's group buffers.

    Message ``i`` carries, of every group ``g``, the coordinates ``bounds[g][i]:bounds[g][i+1]``,
    given to the codec as layer pieces ``pieces[i][g]`` (``bounds is None``: one message of the
    whole groups, ``pieces == [None]``).  The one place the two-phase chunking is computed
    (:meth:`chunks`): the protocol, the cost model and the codec benchmark read it from here.
    """

    pieces: list[list[tuple[int, ...]] | None]
    bounds: list[list[int]] | None = None

    @classmethod
    def whole(cls) -> ExchangeLayout:
        """One message of the whole plan (allgather, all-reduce)."""
        return cls([None])

    @classmethod
    def chunks(cls, groups: Sequence[Group], k: int) -> ExchangeLayout:
        """``k`` chunk messages, chunk ``c`` of every group (:func:`chunk_bounds`: chunks end on
        bucket starts, so each is bucketed as the whole group would be)."""
        bounds = [chunk_bounds(g.numels, None if g.config is None else g.config.bucket_size, k) for g in groups]
        pieces = [
            [chunk_pieces(g.numels, b[c], b[c + 1]) for g, b in zip(groups, bounds, strict=True)] for c in range(k)
        ]
        return cls(pieces, bounds)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.pieces)

    def part(self, flats: Sequence[torch.Tensor], i: int) -> list[torch.Tensor]:
        """Message ``i``'s part of every group buffer (views)."""
        if self.bounds is None:
            return list(flats)
        return [f[b[i] : b[i + 1]] for f, b in zip(flats, self.bounds, strict=True)]
