"""Averagers the benchmarks compare qoda against: PyTorch's PowerSGD and a no-communication floor.

Both implement the averager contract (:class:`qoda.comm.averager.Averager`), so the trainer
runs them exactly like :class:`qoda.comm.aggregate.Aggregator`; neither has a layer plan.

* :class:`PowerSGDAverager` runs PyTorch's own ``powerSGD_hook`` (Vogels et al. 2019: rank-``r``
  power iteration with error feedback and warm start; vectors travel uncompressed) on one
  bucket holding the whole operator.  The hook only calls ``buffer()``, ``index()``,
  ``is_last()`` and ``gradients()`` on its bucket, and ``GradBucket`` has no Python
  constructor, so :class:`_Bucket` provides those four.  Tuning: see the hook's docstring;
  ``rank = 1`` is the most compressing setting, ``start_iter`` plain all-reduce iterations
  come first (PyTorch requires at least 2 with error feedback).
* :class:`LocalAverager` communicates nothing: every worker keeps its own gradient.  It is the
  compute-only lower bound of ``qoda bench e2e`` (same processes, same steps), not a training
  method.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from qoda.comm.averager import Averager, CommStats
from qoda.comm.collective_cost import ring_allreduce


class _Bucket:
    """The part of ``dist.GradBucket``'s interface that ``powerSGD_hook`` uses."""

    def __init__(self, buffer: torch.Tensor, shapes: Sequence[torch.Size]) -> None:
        self._buffer = buffer
        self._grads, offset = [], 0
        for s in shapes:
            n = int(torch.Size(s).numel())
            self._grads.append(buffer[offset : offset + n].view(s))
            offset += n

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def gradients(self) -> list[torch.Tensor]:
        return self._grads


def powersgd_payload_floats(shapes: Sequence[torch.Size], rank: int) -> int:
    """Floats one worker contributes per compressed exchange: ``(n + m) r`` per matrix
    (``P`` then ``Q``), every other tensor whole (the hook's split: ``ndim > 1`` and
    ``(n + m) r < n m``)."""
    total = 0
    for s in shapes:
        s = torch.Size(s)
        if len(s) > 1:
            n, m = s[0], s.numel() // s[0]
            r = min(n, m, rank)
            if (n + m) * r < n * m:
                total += (n + m) * r
                continue
        total += s.numel()
    return total


class PowerSGDAverager(Averager):
    """Average with PyTorch's PowerSGD hook (error feedback and warm start on)."""

    def __init__(
        self, shapes: Sequence[torch.Size], rank: int = 1, start_iter: int = 2, group: dist.ProcessGroup | None = None,
        seed: int = 0,
    ) -> None:  # fmt: skip
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        super().__init__()
        if rank < 1:
            raise ValueError(f"powersgd_rank: must be >= 1, got {rank}")
        if start_iter < 2:
            raise ValueError(f"powersgd_start_iter: must be >= 2 (PyTorch's hook, error feedback), got {start_iter}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.rank = rank
        self.world = dist.get_world_size(group)
        self._hook = powerSGD_hook.powerSGD_hook
        self.state = powerSGD_hook.PowerSGDState(
            process_group=group, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter, random_seed=seed
        )
        self.numel = sum(s.numel() for s in self.shapes)
        self.compressed_floats = powersgd_payload_floats(self.shapes, rank)

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        st = CommStats(calls=1)
        t0 = time.perf_counter()
        compressing = self.state.iter >= self.state.start_powerSGD_iter
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        bucket = _Bucket(flat, self.shapes)
        t1 = time.perf_counter()
        out = self._hook(self.state, bucket).wait()  # compression, all-reduces, decompression
        t2 = time.perf_counter()
        offset = 0
        for t in tensors:
            t.copy_(out[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        floats = self.compressed_floats if compressing else self.numel
        st.payload_bits = 32 * floats
        moved = ring_allreduce(self.world, 4 * floats)  # three ring all-reduces, counted as one total
        st.bytes_sent, st.bytes_received = int(moved.bytes_sent), int(moved.bytes_received)
        # the hook interleaves compression and communication: its whole time counts as communication
        st.encode_seconds, st.comm_seconds, st.decode_seconds = t1 - t0, t2 - t1, time.perf_counter() - t2
        self.stats += st
        return st

    def state_dict(self) -> dict[str, Any]:
        """Error feedback, warm-start memories, the iteration and the hook's RNG: a resumed run
        compresses exactly as an uninterrupted one."""
        return {**super().state_dict(), "hook": powersgd_state_dict(self.state)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        load_powersgd_state(self.state, sd["hook"])
        super().load_state_dict(sd)


def powersgd_state_dict(state: Any) -> dict[str, Any]:
    """A ``PowerSGDState``'s slots but its process group (what its ``__getstate__`` pickles,
    without its warning on every save): error feedback, warm-start memories, iteration, RNG."""
    return {k: getattr(state, k) for k in state.__slots__ if k != "process_group"}


def load_powersgd_state(state: Any, saved: dict[str, Any]) -> None:
    """Restore :func:`powersgd_state_dict`'s output into ``state``."""
    for k, v in saved.items():
        setattr(state, k, v)


class LocalAverager(Averager):
    """No communication: each worker keeps its own gradient (the compute-only bound)."""

    communicates = False

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        st = CommStats(calls=1)
        self.stats += st
        return st
