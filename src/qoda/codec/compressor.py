"""The compressor contract: what any way of turning a worker's tensors into one message provides.

In the spirit of GRACE (Xu et al., "GRACE: a compressed communication framework for distributed
machine learning", ICDCS 2021), compression is kept apart from communication: a compressor only
maps tensors to bytes and back; an averager moves the bytes (:class:`~qoda.comm.aggregate.Aggregator`
for the layer-wise codec and its two protocols, :class:`~qoda.comm.compressed.CompressedAverager`
for any compressor).  The four parts of the contract:

* **encode into a buffer** - ``encode(tensors, seed, out=None)``: one message for ``tensors``
  (a worker's per-layer tensors, in the compressor's order) as an :class:`EncodedMessage`,
  written into ``out`` when given (a reused send buffer) else into a fresh one.  ``seed``
  drives any randomness: the same tensors and seed give the same bytes.
* **decode and accumulate** - ``decode_into(payload, outs, accumulate=True)``: add (or, with
  ``accumulate=False``, write) the tensors a message carries into ``outs``; a damaged message
  raises :class:`~qoda.codec.format.CodecError`.  Deterministic, so every rank summing the same
  messages in the same order holds the same bits.
* **message size** - ``message_size()``: the exact bytes of every message, known before any
  data (``None``: data-dependent, e.g. entropy coding; the averager then exchanges sizes); a
  message's own ``bits`` are the exact bits it occupies on the wire.
* **state** - ``state_dict()`` / ``load_state_dict()``: what a resumed run needs to compress
  exactly like an uninterrupted one (error-feedback memories, ...); ``{}`` when stateless.

A compressor's ``repr`` names its settings (no addresses): averagers compare it across ranks.

A new compressor is one class implementing this contract, one entry in the trainer's registry
(:data:`qoda.train.compressions.COMPRESSIONS`) and its test (docs/architecture.md).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class EncodedMessage:
    """One encoded message."""

    data: np.ndarray  # uint8 (or a uint8 torch.Tensor, on the device of the tensors it encodes)
    bits: int  # exact payload bits (for the layer-wise codec: its segments plus the message header)
    segment_bits: dict[str, int] = field(default_factory=dict)  # layer-wise codec: per type ("" raw)
    framing_bits: int = 0  # headers and layer sizes (no coordinate information)

    @property
    def code_bits(self) -> int:
        """Bits that carry the vector: norms, codes (or raw floats), indices, frequency tables."""
        return self.bits - self.framing_bits

    def __len__(self) -> int:
        return int(self.data.numel() if isinstance(self.data, torch.Tensor) else self.data.size)


class Compressor(abc.ABC):
    """Encode a worker's tensors into one message and decode messages back (see the module docstring)."""

    @abc.abstractmethod
    def encode(self, tensors: Sequence[torch.Tensor], seed: int, out: Any = None) -> EncodedMessage:
        """One message for ``tensors`` (written into ``out`` when given)."""

    @abc.abstractmethod
    def decode_into(self, payload: object, outs: Sequence[torch.Tensor], accumulate: bool = True) -> None:
        """Add (``accumulate``) or write the tensors of ``payload`` into ``outs``."""

    @abc.abstractmethod
    def message_size(self) -> int | None:
        """Exact bytes of every message, or ``None`` if they depend on the data."""

    def message_bits(self) -> int | None:
        """Exact bits of every message on the wire (``8 * message_size()``), or ``None``."""
        size = self.message_size()
        return None if size is None else 8 * size

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (stateless compressors: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, got state {sorted(state)}")


__all__ = ["Compressor", "EncodedMessage"]
