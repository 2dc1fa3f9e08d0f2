"""Top-k sparsification: a worker sends the ``k`` coordinates of largest magnitude of its tensors.

The tensors are taken as one vector ``g`` of ``n`` coordinates (concatenated in order); the message
is the ``k = max(1, round(fraction * n))`` indices of the largest ``|g_i|`` in increasing order
(int32), then their values (float32), native (little-endian) byte order: exactly ``64 k`` bits
whatever the data, so :meth:`TopK.message_size` is known from the shapes.  Decoding adds
``g_i`` at the sent indices and nothing elsewhere; the average of ``K`` messages is
``(1/K) sum_k topk(g_k)``.  Deterministic (the seed is unused) and biased.  With
``error_feedback`` (Stich et al. 2018) the coordinates not sent are remembered and added to the
next call's vector, ``e_{t+1} = (g_t + e_t) - topk(g_t + e_t)``: the memory ``e`` is the
compressor's state (``state_dict``), so a resumed run sends what an uninterrupted one sends.

The worked example of the compressor contract (:mod:`qoda.codec.compressor`, docs/architecture.md):
this class, its registry entry (``topk`` in :data:`qoda.train.compressions.COMPRESSIONS`) and
tests/test_topk.py are all it takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qoda.codec.compressor import Compressor, EncodedMessage
from qoda.codec.format import CodecError, as_bytes_array

#: Largest vector a message can index (int32 indices).
MAX_NUMEL = 2**31 - 1


class TopK(Compressor):
    """Keep the ``k`` largest-magnitude coordinates of tensors of ``shapes`` (see the module docstring)."""

    def __init__(self, shapes: Sequence[Sequence[int]], fraction: float = 0.01, error_feedback: bool = False) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.numel = sum(s.numel() for s in self.shapes)
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction: must be in (0, 1], got {fraction!r}")
        if not 0 < self.numel <= MAX_NUMEL:
            raise ValueError(f"shapes: top-k needs 1 to {MAX_NUMEL} coordinates (int32 indices), got {self.numel}")
        self.fraction = float(fraction)
        self.k = max(1, round(self.fraction * self.numel))
        self.error_feedback = bool(error_feedback)
        self.memory: torch.Tensor | None = None  # error feedback: the coordinates not sent so far

    def __repr__(self) -> str:
        return f"TopK(k={self.k} of {self.numel}{', error feedback' if self.error_feedback else ''})"

    def message_size(self) -> int:
        """``8 k`` bytes: an int32 index and a float32 value per kept coordinate."""
        return 8 * self.k

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        got = [tuple(t.shape) for t in tensors]
        if got != [tuple(s) for s in self.shapes]:
            raise ValueError(f"tensors: shapes {got}, this compressor was built for {[tuple(s) for s in self.shapes]}")

    def encode(self, tensors: Sequence[torch.Tensor], seed: int, out: Any = None) -> EncodedMessage:
        self._check(tensors)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("tensors: a NaN or Inf coordinate has no magnitude to rank (top-k)")
        if self.memory is not None:
            flat = flat + self.memory.to(flat.device)
        index = flat.abs().topk(self.k, sorted=False).indices.sort().values
        if self.error_feedback:
            self.memory = flat.clone().index_fill_(0, index, 0.0)
        data = torch.cat([index.to(torch.int32).view(torch.uint8), flat[index].view(torch.uint8)])
        if out is not None:
            dest = (out if isinstance(out, torch.Tensor) else torch.from_numpy(out))[: data.numel()]
            dest.copy_(data)
            data = dest
        return EncodedMessage(data, 8 * data.numel())  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """The error-feedback memory (``None`` before the first message); nothing without it."""
        return {"memory": self.memory} if self.error_feedback else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.error_feedback:
            super().load_state_dict(state)
            return
        memory = state["memory"]
        if memory is not None and tuple(memory.shape) != (self.numel,):
            raise ValueError(f"state: an error-feedback memory of {tuple(memory.shape)}, expected ({self.numel},)")
        self.memory = memory

    def decode_into(self, payload: object, outs: Sequence[torch.Tensor], accumulate: bool = True) -> None:
        self._check(outs)
        data = payload if isinstance(payload, torch.Tensor) else torch.from_numpy(np.array(as_bytes_array(payload)))
        if data.dtype != torch.uint8 or data.ndim != 1:
            raise CodecError("top-k message: expected a 1-D uint8 payload")
        if data.numel() != self.message_size():
            raise CodecError(f"top-k message: {data.numel()} bytes, expected {self.message_size()} (k = {self.k})")
        data = data.contiguous()
        index = data[: 4 * self.k].view(torch.int32).long()
        values = data[4 * self.k :].view(torch.float32)
        if int(index[0]) < 0 or int(index[-1]) >= self.numel or not bool((index[1:] > index[:-1]).all()):
            raise CodecError(f"top-k message: indices must increase strictly within [0, {self.numel})")
        dense = torch.zeros(self.numel, dtype=torch.float32, device=data.device)
        dense[index] = values
        offset = 0
        for t in outs:
            part = dense[offset : offset + t.numel()].view(t.shape).to(t.device, t.dtype)
            if accumulate:
                t.add_(part)
            else:
                t.copy_(part)
            offset += t.numel()


__all__ = ["MAX_NUMEL", "TopK"]
