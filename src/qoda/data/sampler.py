"""Per-worker shards and a stateless batch schedule (so a resumed run draws the same batches).

Worker ``r`` of ``K`` owns the indices ``perm[r::K]`` of one seeded permutation of the data
set: disjoint shards of (almost) equal size.  The batch of step ``t`` is a slice of the
shard's permutation for epoch ``t * B // n_shard``, seeded by ``(seed, rank, epoch)``: no
iterator state to checkpoint, and resuming at step ``t`` gives exactly the batches an
uninterrupted run would have used.
"""

from __future__ import annotations

import torch


def shard_indices(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    if not 0 <= rank < world:
        raise ValueError(f"rank: must be in [0, {world}), got {rank}")
    if n < world:
        raise ValueError(f"dataset: {n} images cannot be sharded over {world} workers")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[rank::world]


class ShardSampler:
    """Batches of a worker's shard, a pure function of ``(seed, rank, step)``."""

    def __init__(self, n: int, rank: int, world: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.indices = shard_indices(n, rank, world, seed)
        self.rank, self.batch_size, self.seed = rank, batch_size, seed
        self._epoch, self._perm = -1, self.indices

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * self.rank + epoch + 1)
            self._perm, self._epoch = self.indices[torch.randperm(len(self.indices), generator=g)], epoch
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """Indices of step ``step``'s batch (wraps across epochs)."""
        n, b = len(self.indices), self.batch_size
        start = step * b
        out = []
        while b > 0:
            epoch, pos = divmod(start, n)
            take = min(b, n - pos)
            out.append(self._epoch_perm(epoch)[pos : pos + take])
            start, b = start + take, b - take
        return torch.cat(out)
