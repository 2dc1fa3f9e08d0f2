"""Encode and decode one segment (one tensor, or the layers of one type).

* :func:`encode` packs a :class:`~qoda.quant.quantizer.QuantizedTensor`;
* :func:`encode_tensor` fuses quantization and packing (the hot path; same bytes);
* :func:`decode` returns the exact codes and norms; :func:`decode_into` fuses decoding,
  dequantization and accumulation into a float32 buffer (the other hot path);
* :func:`encode_raw` / raw segments carry small tensors uncompressed (float32).

Every decoder validates the header against the receiver's own settings (coding, norm,
bits, bucket size, level-set id, layer sizes) and raises :class:`CodecError` naming the
field; a payload that fails its CRC or its structural checks never yields values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qoda.codec import rans
from qoda.codec.format import (
    HEADER_SIZE,
    CodecError,
    Header,
    WireCoding,
    as_bytes_array,
    parse_header,
    seal,
)
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.kernels import cpu
from qoda.quant.quantizer import (
    MAX_SEGMENT_NUMEL,
    QuantizedTensor,
    TensorOrTensors,
    bucket_starts,
    flatten_float32,
    level_tables,
    num_buckets,
    quantize,
    raise_for_status,
    scratch_for,
)
from qoda.quant.rng import seed_keys


@dataclass(frozen=True)
class Encoded:
    """An encoded segment: ``data`` (uint8) and the exact number of bits it carries.

    ``bits == 8 * len(data) - padding``, where padding is the unused tail of the last
    fixed-width byte.
    """

    data: np.ndarray
    bits: int

    def __len__(self) -> int:
        return int(self.data.size)

    def tobytes(self) -> bytes:
        return self.data.tobytes()


def _fixed_bytes(numel: int, width: int) -> int:
    return (numel * width + 7) // 8


def _header(
    config: QuantizerConfig, coding: WireCoding, dtype: torch.dtype, numels: Sequence[int], body_len: int
) -> Header:
    return Header(
        coding=coding,
        norm=1 if config.norm is Norm.LINF else 0,
        dtype=dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32,
        code_bits=config.bits,
        num_levels=config.levels.num_levels,
        bucket_size=config.bucket_size,
        level_set_id=config.levels.level_set_id,
        n_layers=len(numels),
        numel=int(sum(numels)),
        body_len=body_len,
    )


def _entropy_body(codes: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """(frequency table u16, final states u64 + words u32) for int32 codes (see :mod:`~qoda.codec.rans`)."""
    freq, states, words = rans.encode_codes(codes, alphabet)
    stream = np.empty(2 * states.size + words.size, dtype=np.uint32)
    stream[: 2 * states.size] = states.view(np.uint32)
    stream[2 * states.size :] = words
    return freq.astype(np.uint16), stream


def _encode_entropy(
    flat: torch.Tensor,
    numels: Sequence[int],
    dtype: torch.dtype,
    config: QuantizerConfig,
    seed: int,
    out: np.ndarray | None,
) -> Encoded:
    """The CPU entropy path of :func:`encode_tensor`: the numba quantizer writes int32 codes (no
    torch round trip), then count, rANS-encode and frame (into ``out`` if given)."""
    starts = bucket_starts(numels, config.bucket_size)
    tables = level_tables(config.levels)
    k1, k2 = seed_keys(seed)
    norms = np.empty(len(starts) - 1, dtype=np.float32)
    codes = np.empty(flat.numel(), dtype=np.int32)
    status, bucket = cpu.quantize_to_codes(
        flat.numpy(), starts, *tables.kernel_args,
        int(config.norm is Norm.LINF), k1, k2, norms, codes, scratch_for(config),
    )  # fmt: skip
    raise_for_status(status, bucket, starts, "encode")
    parts = [np.asarray(numels, dtype=np.uint64), norms, *_entropy_body(codes, 2 * config.levels.num_levels)]
    header = _header(config, WireCoding.ENTROPY, dtype, numels, sum(p.nbytes for p in parts))
    data = header.pack(parts, out)
    return Encoded(data, 8 * data.size)


def _pack(
    config: QuantizerConfig, dtype: torch.dtype, numels: Sequence[int], norms: np.ndarray, coded: list[np.ndarray]
) -> Encoded:
    layer = np.asarray(numels, dtype=np.uint64)
    parts = [layer, norms, *coded]
    body_len = sum(p.nbytes for p in parts)
    coding = WireCoding.FIXED if config.coding is Coding.FIXED else WireCoding.ENTROPY
    data = _header(config, coding, dtype, numels, body_len).pack(parts)
    padding = 0
    if coding is WireCoding.FIXED:
        n = int(sum(numels))
        padding = 8 * _fixed_bytes(n, config.bits) - n * config.bits
    return Encoded(data, 8 * data.size - padding)


def encode(q: QuantizedTensor) -> Encoded:
    """Encode a quantized segment with its config's coding."""
    config = q.config
    codes = q.codes.detach().cpu().to(torch.int32).numpy()
    norms = q.norms.detach().cpu().numpy().astype(np.float32, copy=False)
    if config.coding is Coding.FIXED:
        packed = np.zeros(_fixed_bytes(codes.size, config.bits), dtype=np.uint8)
        _pack_codes(codes, config.bits, packed)
        return _pack(config, q.dtype, q.layer_numels, norms, [packed])
    freq, stream = _entropy_body(codes, 2 * config.levels.num_levels)
    return _pack(config, q.dtype, q.layer_numels, norms, [freq, stream])


def _pack_codes(codes: np.ndarray, width: int, out: np.ndarray) -> None:
    # Bit-pack LSB-first with numpy (not a hot path: encode_tensor fuses this).
    n = codes.size
    if n == 0:
        return
    bitpos = np.arange(n, dtype=np.int64) * width
    for k in range(width):
        bit = ((codes >> k) & 1).astype(np.uint8)
        pos = bitpos + k
        np.bitwise_or.at(out, pos >> 3, (bit << (pos & 7)).astype(np.uint8))


def fixed_segment_header(config: QuantizerConfig, dtype: torch.dtype, numels: Sequence[int]) -> Header:
    """The header of a fixed-width segment of layers ``numels`` (its ``size`` is exact)."""
    n_buckets = len(bucket_starts(numels, config.bucket_size)) - 1
    body_len = 8 * len(numels) + 4 * n_buckets + _fixed_bytes(int(sum(numels)), config.bits)
    return _header(config, WireCoding.FIXED, dtype, numels, body_len)


def encode_tensor(
    x: TensorOrTensors,
    config: QuantizerConfig,
    seed: int,
    layer_numels: Sequence[int] | None = None,
    out: np.ndarray | None = None,
) -> Encoded:
    """Quantize and encode in one pass (CPU: fused numba kernel).  Same bytes as
    ``encode(quantize(x, config, seed))``; ``layer_numels`` as in :func:`quantize`.

    Fixed width on the CPU writes header, norms and codes straight into one buffer: ``out``
    (a reused uint8 array of at least :func:`fixed_segment_header` ``.size`` bytes; the
    result is then a view of it) or a new one.  No intermediate copies.
    """
    flat, numels, dtype = flatten_float32(x, layer_numels)
    if flat.device.type == "cpu" and config.coding is Coding.ENTROPY:
        return _encode_entropy(flat, numels, dtype, config, seed, out)
    if flat.device.type != "cpu" or config.coding is Coding.ENTROPY:
        enc = encode(quantize(x, config, seed, layer_numels=layer_numels))
        if out is not None:
            out[: len(enc)] = enc.data
            enc = Encoded(out[: len(enc)], enc.bits)
        return enc
    starts = bucket_starts(numels, config.bucket_size)
    tables = level_tables(config.levels)
    k1, k2 = seed_keys(seed)
    header = fixed_segment_header(config, dtype, numels)
    buf = header.frame(out)
    pos = HEADER_SIZE + 8 * len(numels)
    buf[HEADER_SIZE:pos].view(np.uint64)[:] = numels
    norms = buf[pos : pos + 4 * (len(starts) - 1)].view(np.float32)  # 4-byte aligned: 44 + 8 L
    packed = buf[pos + norms.nbytes :]
    status, bucket = cpu.quantize_pack(
        flat.numpy(), starts, *tables.kernel_args,
        int(config.norm is Norm.LINF), k1, k2, config.bits, norms, packed, scratch_for(config),
    )  # fmt: skip
    raise_for_status(status, bucket, starts, "encode")
    seal(buf)
    n = int(sum(numels))
    return Encoded(buf, 8 * buf.size - (8 * _fixed_bytes(n, config.bits) - n * config.bits))


def encode_raw(x: TensorOrTensors, layer_numels: Sequence[int] | None = None) -> Encoded:
    """An uncompressed float32 segment (for small or excluded layers)."""
    flat, numels, dtype = flatten_float32(x, layer_numels)
    values = flat.detach().cpu().numpy()
    layer = np.asarray(numels, dtype=np.uint64)
    keep = dtype in (torch.float16, torch.bfloat16, torch.float64)
    body_len = layer.nbytes + values.nbytes
    header = Header(WireCoding.RAW, 0, dtype if keep else torch.float32, 0, 0, 0, 0, len(numels), sum(numels), body_len)
    data = header.pack([layer, values])
    return Encoded(data, 8 * data.size)


# ---------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class _Parsed:
    header: Header
    numels: tuple[int, ...]
    norms: np.ndarray
    rest: np.ndarray  # coded body after the norms (raw: the float32 values)


def _parse(payload: object, config: QuantizerConfig | None, layer_numels: Sequence[int] | None) -> _Parsed:
    buf = as_bytes_array(payload)
    h = parse_header(buf)
    if config is None:
        if h.coding is not WireCoding.RAW:
            raise CodecError(f"payload: expected a raw segment, got coding {h.coding.name.lower()}")
        if h.norm or h.code_bits or h.num_levels or h.bucket_size or h.level_set_id:
            raise CodecError("payload corrupted: a raw segment carries quantizer fields")
    else:
        expect = {
            "coding": (WireCoding.FIXED if config.coding is Coding.FIXED else WireCoding.ENTROPY, h.coding),
            "norm": (1 if config.norm is Norm.LINF else 0, h.norm),
            "code_bits": (config.bits, h.code_bits),
            "num_levels": (config.levels.num_levels, h.num_levels),
            "bucket_size": (config.bucket_size, h.bucket_size),
            "level_set_id": (config.levels.level_set_id, h.level_set_id),
        }
        for name, (want, got) in expect.items():
            if int(want) != int(got):
                raise CodecError(
                    f"payload was encoded with {name}={int(got):#x}, this receiver expects {int(want):#x} "
                    "(mismatched quantizer settings across ranks?)"
                )
    # Sizes are checked against the verified body length (and the receiver's expectations)
    # by arithmetic before anything proportional to a declared size is allocated: a header with
    # a forged CRC cannot make the receiver allocate more than a bounded multiple of its bytes.
    body = buf[HEADER_SIZE:]
    if h.numel > MAX_SEGMENT_NUMEL:
        raise CodecError(f"payload corrupted: numel {h.numel} exceeds a segment's {MAX_SEGMENT_NUMEL} coordinates")
    if h.n_layers * 8 > body.size:
        raise CodecError(f"payload corrupted: {h.n_layers} layers do not fit in {body.size} body bytes")
    numels = tuple(int(v) for v in body[: 8 * h.n_layers].view(np.uint64))
    if sum(numels) != h.numel:
        raise CodecError("payload corrupted: layer sizes do not add up to numel")
    if layer_numels is not None and tuple(int(n) for n in layer_numels) != numels:
        raise CodecError(f"payload layer sizes {numels[:8]}... differ from the expected {tuple(layer_numels)[:8]}...")
    rest = body[8 * h.n_layers :]
    if h.coding is WireCoding.RAW:
        if rest.size != 4 * h.numel:
            raise CodecError("payload corrupted: raw body size does not match numel")
        return _Parsed(h, numels, np.empty(0, np.float32), rest)
    if h.bucket_size < 1:
        raise CodecError("payload corrupted: bucket size 0")
    n_buckets = num_buckets(numels, h.bucket_size)
    if rest.size < 4 * n_buckets:
        raise CodecError("payload corrupted: too short for its bucket norms")
    if h.coding is WireCoding.FIXED and rest.size != 4 * n_buckets + _fixed_bytes(h.numel, h.code_bits):
        raise CodecError("payload corrupted: fixed-width body size does not match numel")
    norms = rest[: 4 * n_buckets].view(np.float32)
    if not (np.isfinite(norms).all() and (norms >= 0).all()):
        raise CodecError("payload corrupted: a bucket norm is negative or not finite")
    return _Parsed(h, numels, norms, rest[4 * n_buckets :])


def _fail(status: int, index: int) -> None:
    if status == cpu.ERR_BAD_CODE:
        raise CodecError(f"payload corrupted: invalid level code at coordinate {index}")
    if status == cpu.ERR_BAD_PADDING:
        raise CodecError("payload corrupted: non-zero padding bits")
    if status == rans.ERR_TRUNCATED:
        raise CodecError("payload corrupted: entropy-coded stream ends early")
    if status == rans.ERR_STATE:
        raise CodecError("payload corrupted: entropy-coded stream does not end in its initial state")
    raise CodecError(f"payload corrupted (status {status})")


def _entropy_stream(p: _Parsed, config: QuantizerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Validated ``(freq, states, words, number of words)`` of an entropy-coded body.

    ``words`` holds at least one entry (a dummy for an empty stream), as the kernels require."""
    alphabet = 2 * config.levels.num_levels
    n = p.header.numel
    k = rans.num_states(n)
    rest = p.rest
    head = 2 * alphabet + 8 * k
    if rest.size < head or (rest.size - head) % 4:
        raise CodecError("payload corrupted: bad entropy-coded body size")
    freq = rest[: 2 * alphabet].view(np.uint16).astype(np.int64)
    if int(freq.sum()) != (rans.M if n else 0):
        raise CodecError("payload corrupted: entropy frequency table does not sum to its precision")
    if freq[1]:  # code 1 is a negative zero, which the quantizer never emits
        raise CodecError("payload corrupted: entropy frequency table gives mass to the invalid level code 1")
    states = rest[2 * alphabet : head].view(np.uint64).astype(np.int64)  # >= 2^63 turns negative
    if (states < rans.L).any():
        raise CodecError("payload corrupted: entropy coder state out of range")
    words = rest[head:].view(np.uint32)
    nwords = words.size
    if n == 0 and (states[0] != rans.L or nwords):
        raise CodecError("payload corrupted: non-empty stream for an empty segment")
    return freq, states, words if nwords else np.zeros(1, dtype=np.uint32), nwords


def _entropy_codes(p: _Parsed, config: QuantizerConfig) -> np.ndarray:
    freq, states, words, nwords = _entropy_stream(p, config)
    codes = np.empty(p.header.numel, dtype=np.int32)
    if p.header.numel:
        status = rans.decode(words, nwords, states, *rans.decoder_tables(freq), codes)
        if status != rans.OK:
            _fail(status, -1)
    return codes


def _entropy_decode_into(
    p: _Parsed, config: QuantizerConfig, levels: np.ndarray, starts: np.ndarray, out: np.ndarray, accumulate: bool
) -> tuple[int, int]:
    """Fused rANS decode + dequantize (+ accumulate) into ``out``; ``(status, -1)`` like the kernels."""
    freq, states, words, nwords = _entropy_stream(p, config)
    if not p.header.numel:
        return cpu.OK, -1
    slv = rans.signed_levels(levels, freq.size)
    status = rans.decode_dequantize(
        words, nwords, states, *rans.decoder_tables(freq), slv, starts, p.norms, out, accumulate
    )
    return (cpu.OK if status == rans.OK else status), -1


#: Without expected layer shapes, :func:`decode` accepts at most this many coordinates (64M:
#: 512 MiB of codes and scratch).  An entropy-coded segment whose codes are all equal costs no
#: bits per coordinate, so its body cannot bound its size: a valid 600-byte payload may claim
#: 2^27 coordinates.  Receivers that know the sizes (every aggregator) pass them instead.
DECODE_MAX_NUMEL = 1 << 26


def decode(
    payload: object,
    config: QuantizerConfig,
    layer_shapes: Sequence[torch.Size] | None = None,
    max_numel: int = DECODE_MAX_NUMEL,
) -> QuantizedTensor:
    """Decode a segment into its exact quantized form (codes and norms, bit for bit).

    With ``layer_shapes`` the payload must hold exactly those layers; without, it may hold at
    most ``max_numel`` coordinates (see :data:`DECODE_MAX_NUMEL`), checked before allocating.
    """
    expected = None if layer_shapes is None else [int(np.prod(s)) for s in layer_shapes]
    p = _parse(payload, config, expected)
    if expected is None and p.header.numel > max_numel:
        raise CodecError(
            f"payload claims {p.header.numel} coordinates, more than max_numel={max_numel} "
            "(pass layer_shapes, or a larger max_numel if that is expected)"
        )
    tabs = level_tables(config.levels)
    levels = tabs.levels
    starts = bucket_starts(p.numels, config.bucket_size)
    codes = np.empty(p.header.numel, dtype=np.int32)
    scratch = np.empty(p.header.numel, dtype=np.float32)
    if config.coding is Coding.FIXED:  # body size checked in _parse
        status, i = cpu.unpack_dequantize(
            p.rest, starts, p.norms, tabs.signed, tabs.invalid, config.bits, scratch, False, codes, True
        )
    else:
        codes = _entropy_codes(p, config)
        status, i = cpu.dequantize_codes(codes, starts, p.norms, levels, scratch, False)
    if status != cpu.OK:
        _fail(status, i)
    shapes = tuple(layer_shapes) if layer_shapes is not None else tuple(torch.Size([n]) for n in p.numels)
    return QuantizedTensor(
        torch.from_numpy(codes), torch.from_numpy(p.norms.copy()), p.numels, shapes, p.header.dtype, config
    )


def decode_into(
    payload: object,
    config: QuantizerConfig | None,
    out: torch.Tensor,
    accumulate: bool = True,
    layer_numels: Sequence[int] | None = None,
) -> None:
    """Dequantize a segment into the flat float32 ``out`` (``out += Q`` or ``out = Q``).

    ``config=None`` expects a raw (uncompressed) segment.  On error ``out`` may hold a
    partial result only if the payload passed its CRC yet is structurally invalid.
    """
    p = _parse(payload, config, layer_numels)
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != p.header.numel:
        raise ValueError(
            f"out: expected a flat float32 tensor of {p.header.numel} elements, got {out.dtype} {tuple(out.shape)}"
        )
    target = (
        out if (out.device.type == "cpu" and out.is_contiguous()) else torch.empty(out.numel(), dtype=torch.float32)
    )
    acc_here = accumulate and target is out
    t = target.numpy()
    if p.header.coding is WireCoding.RAW:
        vals = p.rest.view(np.float32)
        if acc_here:
            t += vals
        else:
            t[:] = vals
    else:
        assert config is not None
        tabs = level_tables(config.levels)
        levels = tabs.levels
        starts = bucket_starts(p.numels, config.bucket_size)
        if config.coding is Coding.FIXED:  # body size checked in _parse
            dummy = np.empty(0, dtype=np.int32)
            status, i = cpu.unpack_dequantize(
                p.rest, starts, p.norms, tabs.signed, tabs.invalid, config.bits, t, acc_here, dummy, False
            )
        else:
            status, i = _entropy_decode_into(p, config, levels, starts, t, acc_here)
        if status != cpu.OK:
            _fail(status, i)
    if target is not out:
        if accumulate:
            out.add_(target.to(out.device))
        else:
            out.copy_(target)


def decode_raw(payload: object) -> torch.Tensor:
    """The float32 values of a raw segment."""
    p = _parse(payload, None, None)
    return torch.from_numpy(p.rest.view(np.float32).copy())
