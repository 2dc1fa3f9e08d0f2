"""Layer-wise messages: every type of a :class:`~qoda.quant.policy.LayerPlan` as its own segment.

A message is the unit a worker sends per round:

    offset size field
    0      4    magic b"QODM"
    4      1    version (1)
    5      3    zero
    8      4    number of segments S
    12     4    CRC-32 of the plan fingerprint (receiver checks it: same layers, types, settings)
    16     8*S  byte length of each segment
    ..     4    CRC-32 of everything above
    ..          the segments: one per type in plan order (each with its own header and CRC),
                then one raw float32 segment for the uncompressed layers (if any)

Each type's coordinates form an independent stream with its own levels and, for entropy
coding, its own frequency table ("protocol 1" of the reference, section 2.2).  Seeds of the
segments are derived from the message seed, so one integer reproduces the whole message.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qoda.codec.format import CodecError, as_bytes_array
from qoda.codec.segment import Encoded, decode_into, encode_raw, encode_tensor
from qoda.quant.policy import LayerPlan

MAGIC = b"QODM"
VERSION = 1
_HEAD = struct.Struct("<4sB3xII")


def segment_seed(seed: int, index: int) -> int:
    """Seed of segment ``index`` of a message with seed ``seed``."""
    return (seed * 0x100000001B3 + index * 0x9E3779B1 + 1) & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class EncodedMessage:
    data: np.ndarray  # uint8
    bits: int  # exact payload bits (sum over segments, plus the message header)
    segment_bits: dict[str, int]  # per type ("" for the raw segment)

    def __len__(self) -> int:
        return int(self.data.size)


class LayerwiseCodec:
    """Encode/decode the gradients of a model following a :class:`LayerPlan`."""

    def __init__(self, plan: LayerPlan) -> None:
        self.plan = plan
        self.types = plan.types
        self.type_indices = [plan.indices(t) for t in self.types]
        self.raw_indices = plan.indices(None)
        self.plan_id = zlib.crc32(plan.fingerprint().encode())
        self.numels = [e.numel for e in plan.entries]

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.plan.entries):
            raise ValueError(
                f"tensors: expected {len(self.plan.entries)} tensors (one per plan entry), got {len(tensors)}"
            )
        for t, e in zip(tensors, self.plan.entries, strict=True):
            if t.numel() != e.numel:
                raise ValueError(f"tensors: {e.name} has {t.numel()} elements, the plan says {e.numel}")

    def encode(self, tensors: Sequence[torch.Tensor], seed: int) -> EncodedMessage:
        """One message for ``tensors`` (one per plan entry, in plan order)."""
        self._check(tensors)
        segs: list[Encoded] = []
        names: list[str] = []
        for k, (t, idx) in enumerate(zip(self.types, self.type_indices, strict=True)):
            segs.append(encode_tensor([tensors[i] for i in idx], self.plan.configs[t], segment_seed(seed, k)))
            names.append(t)
        if self.raw_indices:
            segs.append(encode_raw([tensors[i] for i in self.raw_indices]))
            names.append("")
        head = _HEAD.pack(MAGIC, VERSION, len(segs), self.plan_id) + struct.pack(
            f"<{len(segs)}Q", *(len(s) for s in segs)
        )
        head += struct.pack("<I", zlib.crc32(head))
        data = np.concatenate([np.frombuffer(head, dtype=np.uint8), *(s.data for s in segs)])
        bits = 8 * len(head) + sum(s.bits for s in segs)
        return EncodedMessage(data, bits, {n: s.bits for n, s in zip(names, segs, strict=True)})

    def split(self, payload: object) -> list[np.ndarray]:
        """Validate the message header; return its segments."""
        buf = as_bytes_array(payload)
        if buf.size < _HEAD.size + 4:
            raise CodecError(f"message truncated: {buf.size} bytes")
        magic, version, n_seg, plan_id = _HEAD.unpack_from(buf[: _HEAD.size].tobytes())
        if magic != MAGIC:
            raise CodecError(f"message: bad magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise CodecError(f"message: version {version}, this build reads version {VERSION}")
        expected = len(self.types) + (1 if self.raw_indices else 0)
        end = _HEAD.size + 8 * n_seg + 4
        if n_seg != expected or buf.size < end:
            raise CodecError(f"message: {n_seg} segments, this receiver's plan has {expected} (or truncated)")
        (crc,) = struct.unpack_from("<I", buf[end - 4 : end].tobytes())
        if zlib.crc32(buf[: end - 4]) != crc:
            raise CodecError("message corrupted: header CRC mismatch")
        if plan_id != self.plan_id:
            raise CodecError(
                "message was encoded with a different layer plan (layers, shapes, types or quantizer "
                f"settings differ: plan id {plan_id:08x}, this receiver {self.plan_id:08x})"
            )
        lengths = struct.unpack_from(f"<{n_seg}Q", buf[_HEAD.size : end - 4].tobytes())
        if end + sum(lengths) != buf.size:
            raise CodecError(f"message truncated or padded: segments need {end + sum(lengths)} bytes, got {buf.size}")
        out, pos = [], end
        for n in lengths:
            out.append(buf[pos : pos + n])
            pos += n
        return out

    def decode_into(self, payload: object, outs: Sequence[torch.Tensor], accumulate: bool = True) -> None:
        """Add (or write) the decoded layers into ``outs`` (float32, one per plan entry)."""
        self._check(outs)
        segs = self.split(payload)
        groups = [(self.plan.configs[t], idx) for t, idx in zip(self.types, self.type_indices, strict=True)]
        if self.raw_indices:
            groups.append((None, self.raw_indices))
        decoded = []  # decode every segment before touching outs: a bad one changes nothing
        for seg, (config, idx) in zip(segs, groups, strict=True):
            numels = [self.numels[i] for i in idx]
            flat = torch.empty(sum(numels), dtype=torch.float32)
            decode_into(seg, config, flat, accumulate=False, layer_numels=numels)
            decoded.append((idx, flat.split(numels)))
        for idx, parts in decoded:
            for i, part in zip(idx, parts, strict=True):
                target = outs[i].view(-1)
                if accumulate:
                    target.add_(part.to(target.device))
                else:
                    target.copy_(part.to(target.device))

    def decode(self, payload: object) -> list[torch.Tensor]:
        """The decoded layers (float32, in plan shapes)."""
        outs = [torch.zeros(e.shape, dtype=torch.float32) for e in self.plan.entries]
        self.decode_into(payload, outs, accumulate=False)
        return outs
