"""The segment wire format: a fixed little-endian header, then the body.

offset size field
0      4    magic b"QODA"
4      1    version (2; version 1, whose entropy body had one rANS state, is rejected)
5      1    coding: 0 raw float32, 1 fixed width, 2 entropy (rANS)
6      1    norm: 0 L2, 1 L-inf
7      1    dtype of the original input (0 f32, 1 f16, 2 bf16, 3 f64)
8      1    code bits (fixed width; 0 for raw)
9      1    flags (0)
10     2    number of levels s + 2 (0 for raw)
12     4    bucket size
16     4    level-set id (CRC-32 of the float32 levels; 0 for raw)
20     4    number of layers
24     8    numel
32     8    body length in bytes
40     4    CRC-32 of header (this field zero) and body
44          body: layer numels (u64 each), then per coding:
              raw:     float32 values
              fixed:   float32 norm per bucket, codes bit-packed LSB-first
              entropy: float32 norm per bucket, u16 frequency per code (2 (s+2) codes, summing
                       to M = 2^14; all zero for an empty segment), K = max(1, min(4, numel))
                       u64 final rANS states (coordinate i is coded by state i mod 4), then the
                       u32 words the states share, in the order the decoder reads them
                       (see qoda.codec.rans)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

try:  # zlib-ng's CRC-32: the same polynomial, PCLMUL folding, ~9x zlib 1.2.13 on 8 MiB (~65 GB/s)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - the zlib-ng wheel is a dependency; zlib gives the same values
    from zlib import crc32

MAGIC = b"QODA"
VERSION = 2
#: The header, field by field: ``(name, struct code)`` in wire order (little-endian).  The one
#: description of the layout: :data:`HEADER`, :data:`FIELDS` and every reader derive from it.
HEADER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "4s"), ("version", "B"), ("coding", "B"), ("norm", "B"), ("dtype", "B"), ("code_bits", "B"),
    ("flags", "B"), ("num_levels", "H"), ("bucket_size", "I"), ("level_set_id", "I"), ("n_layers", "I"),
    ("numel", "Q"), ("body_len", "Q"), ("crc", "I"),
)  # fmt: skip
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_LAYOUT))
HEADER_SIZE = HEADER.size


def _field_offsets() -> dict[str, tuple[int, str]]:
    out, pos = {}, 0
    for name, code in HEADER_LAYOUT:
        out[name] = (pos, code)
        pos += struct.calcsize("<" + code)
    return out


#: ``field -> (byte offset, struct code)`` of the segment header.
FIELDS: dict[str, tuple[int, str]] = _field_offsets()
_CRC_OFFSET = FIELDS["crc"][0]
assert _CRC_OFFSET == HEADER_SIZE - 4


class CodecError(ValueError):
    """A payload is truncated, corrupted, of another version, or encoded with other settings."""


class WireCoding(IntEnum):
    RAW = 0
    FIXED = 1
    ENTROPY = 2


DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Header:
    coding: WireCoding
    norm: int
    dtype: torch.dtype
    code_bits: int
    num_levels: int
    bucket_size: int
    level_set_id: int
    n_layers: int
    numel: int
    body_len: int

    @property
    def size(self) -> int:
        """Bytes of the whole segment (header and body)."""
        return HEADER_SIZE + self.body_len

    def frame(self, out: np.ndarray | None = None) -> np.ndarray:
        """The segment's buffer with this header written (CRC still zero): ``out[:size]`` if
        given (a reused buffer, so large messages pay no fresh-page faults), else a new array.
        Fill the body in place, then :func:`seal` it."""
        if out is None:
            buf = np.empty(self.size, dtype=np.uint8)
        else:
            if out.dtype != np.uint8 or out.ndim != 1 or out.size < self.size:
                raise ValueError(f"out: need a 1-D uint8 array of at least {self.size} bytes")
            buf = out[: self.size]
        HEADER.pack_into(
            buf, 0, MAGIC, VERSION, int(self.coding), self.norm, DTYPE_CODES[self.dtype], self.code_bits, 0,
            self.num_levels, self.bucket_size, self.level_set_id, self.n_layers, self.numel,
            self.body_len, 0,
        )  # fmt: skip
        return buf

    def pack(self, body_parts: list[bytes | np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """Header + body as one uint8 array, with the CRC filled in."""
        buf = self.frame(out)
        pos = HEADER_SIZE
        for part in body_parts:
            b = np.frombuffer(part, dtype=np.uint8) if isinstance(part, bytes) else part.view(np.uint8).reshape(-1)
            buf[pos : pos + b.size] = b
            pos += b.size
        assert pos == buf.size, "body parts do not add up to body_len"
        return seal(buf)


def seal(buf: np.ndarray) -> np.ndarray:
    """Write the CRC of a framed segment (see :meth:`Header.frame`); returns ``buf``."""
    struct.pack_into("<I", buf, _CRC_OFFSET, 0)
    struct.pack_into("<I", buf, _CRC_OFFSET, payload_crc(buf))
    return buf


def payload_crc(buf: np.ndarray) -> int:
    """CRC-32 of header (with its CRC field taken as zero) and body."""
    crc = crc32(buf[:_CRC_OFFSET])
    crc = crc32(b"\0\0\0\0", crc)
    return crc32(buf[HEADER_SIZE:], crc)


def as_bytes_array(payload: object) -> np.ndarray:
    """View bytes / bytearray / memoryview / numpy / CPU uint8 tensor as a uint8 array."""
    if isinstance(payload, np.ndarray):
        arr = payload
    elif isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8:
            raise CodecError(f"payload: expected a uint8 tensor, got {payload.dtype}")
        arr = payload.detach().cpu().contiguous().numpy()
    elif isinstance(payload, bytes | bytearray | memoryview):
        arr = np.frombuffer(payload, dtype=np.uint8)
    else:
        raise CodecError(f"payload: expected bytes or a uint8 array, got {type(payload).__name__}")
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CodecError("payload: expected a 1-D uint8 array")
    return arr


def parse_header(buf: np.ndarray) -> Header:
    """Validate magic, version, sizes and checksum; return the header."""
    if buf.size < HEADER_SIZE:
        raise CodecError(f"payload truncated: {buf.size} bytes, the header alone is {HEADER_SIZE}")
    (magic, version, coding, norm, dtype, code_bits, flags, num_levels, bucket_size, level_set_id,
     n_layers, numel, body_len, crc) = HEADER.unpack_from(buf[:HEADER_SIZE].tobytes())  # fmt: skip
    if magic != MAGIC:
        raise CodecError(f"payload: bad magic {magic!r}, expected {MAGIC!r} (not a qoda segment)")
    if version != VERSION:
        raise CodecError(f"payload: codec version {version}, this build reads version {VERSION}")
    if buf.size - HEADER_SIZE != body_len:
        what = "truncated" if buf.size - HEADER_SIZE < body_len else "has trailing bytes"
        raise CodecError(f"payload {what}: header announces {body_len} body bytes, got {buf.size - HEADER_SIZE}")
    actual = payload_crc(buf)
    if actual != crc:
        raise CodecError(f"payload corrupted: CRC-32 {actual:08x} does not match header {crc:08x}")
    if coding not in WireCoding._value2member_map_:
        raise CodecError(f"payload: unknown coding {coding}")
    if dtype not in CODE_DTYPES or norm not in (0, 1) or flags != 0:
        raise CodecError("payload: invalid dtype, norm or flags field")
    return Header(WireCoding(coding), norm, CODE_DTYPES[dtype], code_bits, num_levels, bucket_size,
                  level_set_id, n_layers, numel, body_len)  # fmt: skip
