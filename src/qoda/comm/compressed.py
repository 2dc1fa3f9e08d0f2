"""Averaging with any compressor (:class:`~qoda.codec.compressor.Compressor`) across a ProcessGroup.

Per call ``average_(tensors, step)`` on rank ``r`` of ``K``:

1. encode this rank's tensors once (seed ``derive_seed(seed, step, r)``);
2. all-gather one int64 per rank: its message's size, or ``-1`` if it could not encode (so a
   failure is collective: every rank raises :class:`AggregationError` naming the rank, none waits);
3. all-gather the messages, padded to the longest;
4. decode the ``K`` messages in rank order, accumulating, divide by ``K`` and write the tensors.

Every rank decodes the same bytes in the same order with the same arithmetic: the results (and a
damaged message's error) are identical on every rank.  Cost per rank: ``cost.allgather`` with
sizes, ``(K-1)(8 + m)`` bytes each way for messages of ``m`` bytes.  The layer-wise codec
travels through :class:`~qoda.comm.aggregate.Aggregator` instead: its messages carry failures in
their header (no size exchange with fixed-width coding) and its two-phase protocol needs chunks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from qoda.codec.compressor import Compressor
from qoda.comm import cost
from qoda.comm.aggregate import AggregationError, compare_across_ranks, derive_seed
from qoda.comm.averager import Averager, CommStats
from qoda.comm.protocol import charge


class CompressedAverager(Averager):
    """Average tensors across ``group`` with ``compressor`` (an :class:`Averager`; see the module docstring).

    ``check``: compare the compressor (its ``repr``) and the world size across ranks now (one small
    all-gather), raising on every rank if they differ.
    """

    def __init__(
        self, compressor: Compressor, group: dist.ProcessGroup | None = None, seed: int = 0, check: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor: expected a Compressor, got {type(compressor).__name__}")
        self.compressor, self.group, self.seed = compressor, group, int(seed)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"  # NCCL moves CUDA tensors only
        self.wire_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        if check:
            differ, _ = compare_across_ranks({"compressor": repr(compressor), "world": self.world}, group)
            if differ:
                raise AggregationError(
                    f"compressed averaging settings differ across ranks: {', '.join(differ)} (this rank: "
                    f"{compressor!r}, world {self.world})"
                )

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        st = CommStats(calls=1)
        t0 = time.perf_counter()
        try:  # 1.
            msg = self.compressor.encode(tensors, derive_seed(self.seed, step, self.rank))
            data = torch.as_tensor(msg.data).to(self.wire_device)
            error = None
        except Exception as e:  # told to every rank by the size exchange
            msg, data, error = None, torch.empty(0, dtype=torch.uint8, device=self.wire_device), e
        size = torch.tensor([data.numel() if error is None else -1], dtype=torch.int64, device=self.wire_device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        t1 = time.perf_counter()
        dist.all_gather(sizes, size, group=self.group)  # 2.
        n = [int(s) for s in sizes]
        failed = [r for r, s in enumerate(n) if s < 0]
        if failed:
            if error is not None:
                raise AggregationError(f"rank {self.rank} could not encode its tensors: {error}") from error
            raise AggregationError(f"rank(s) {failed} could not encode their tensors (nothing was applied)")
        send = torch.zeros(max(n), dtype=torch.uint8, device=self.wire_device)
        send[: data.numel()] = data
        outs = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(outs, send, group=self.group)  # 3.
        t2 = time.perf_counter()
        acc = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in tensors]
        for r, (out, m) in enumerate(zip(outs, n, strict=True)):  # 4.
            try:
                self.compressor.decode_into(out[:m], acc, accumulate=True)
            except Exception as e:
                raise AggregationError(f"received a damaged message from rank {r} (nothing was applied): {e}") from e
        for t, a in zip(tensors, acc, strict=True):
            t.copy_(a.mul_(1.0 / self.world))
        assert msg is not None
        st.payload_bits = msg.code_bits
        charge(st, cost.allgather(self.world, max(n), sized=True))
        st.encode_seconds, st.comm_seconds, st.decode_seconds = t1 - t0, t2 - t1, time.perf_counter() - t2
        self.stats += st
        return st

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state["compressor"])
        super().load_state_dict(state)


__all__ = ["CompressedAverager"]
