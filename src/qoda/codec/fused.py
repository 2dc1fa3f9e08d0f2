"""One compiled kernel call per layer-wise message (the fast path of :mod:`qoda.codec.layerwise`).

:func:`build_layout` precomputes, once per plan and ``pieces``, everything a message's layout
fixes: every segment's offsets, header template (CRC zero) and the CRC-32 of its static part,
bucket starts, level tables, exact bit counts.  :func:`encode_into` and :func:`decode_into`
then make one call to :mod:`qoda.quant.kernels.message` plus one CRC-32 per segment
(:func:`qoda.codec.format.crc32`, zlib-ng's), and write exactly the bytes of the per-segment
path (``encode_tensor`` / ``decode_into`` of :mod:`qoda.codec.segment`, which stays the
reference and the fallback).

A layout exists only for fixed-width groups of at most 8 bits and raw groups; entropy-coded
(data-dependent size) and wider groups use the per-segment path.  Decoding returns ``False``
(nothing written) whenever a check fails before the kernel runs - a size, a segment length the
message header declares, CRC, header field, layer size or norm - so the caller reruns the
per-segment path, which raises the precise error: both paths accept exactly the same messages.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qoda.codec.format import HEADER_SIZE, Header, WireCoding, crc32
from qoda.codec.segment import _fail, fixed_segment_header
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.kernels import cpu
from qoda.quant.kernels import message as mk
from qoda.quant.quantizer import bucket_starts, level_tables, raise_for_status

_CRC_AT = HEADER_SIZE - 4  # the CRC field of a segment header
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class MessageLayout:
    """A message's fixed layout (offsets from the message start; see :mod:`qoda.quant.kernels.message`)."""

    size: int  # bytes of the whole message
    head_size: int  # bytes of the message header
    lengths: tuple[int, ...]  # bytes of each segment
    numels: tuple[int, ...]  # coordinates of each group buffer
    meta: np.ndarray  # int64 (S, N_META)
    starts: np.ndarray  # int64, every quantized segment's bucket starts, concatenated
    sels: np.ndarray  # int32 (S, 2, SELECT_MAX_LEVELS)
    lvs: np.ndarray  # float32 padded levels, concatenated
    iws: np.ndarray  # float32 inverse widths, concatenated
    tabs: np.ndarray  # int32 look-up tables, concatenated
    slvs: np.ndarray  # float32 signed level per code, concatenated
    bads: np.ndarray  # uint8 invalid-code flags, concatenated
    tmpl: np.ndarray  # uint8 header templates (CRC zero) and layer sizes, concatenated
    crcs: tuple[tuple[int, int, int, int], ...]  # per segment: CRC offset, CRC'd body start, end, static CRC
    raw: tuple[int, int] | None  # (group index, byte offset of its float32 values)
    max_bucket: int
    bits: int  # exact bits of the message (as EncodedMessage.bits)
    segment_bits: tuple[int, ...]
    framing_bits: int


def _template(header: Header, numels: Sequence[int]) -> np.ndarray:
    buf = header.frame()
    buf[HEADER_SIZE : HEADER_SIZE + 8 * len(numels)].view(np.uint64)[:] = np.asarray(numels, dtype=np.uint64)
    return buf[: HEADER_SIZE + 8 * len(numels)].copy()


def build_layout(
    configs: Sequence[QuantizerConfig | None], pieces: Sequence[Sequence[int]], head_size: int
) -> MessageLayout | None:
    """The layout of a message whose group ``k`` has quantizer ``configs[k]`` (``None``: raw) and
    layer sizes ``pieces[k]``, behind a message header of ``head_size`` bytes; ``None`` if a group
    is entropy-coded or wider than 8 bits (those take the per-segment path)."""
    if any(c is not None and (c.coding is not Coding.FIXED or c.bits > 8) for c in configs):
        return None
    meta = np.zeros((len(configs), mk.N_META), dtype=np.int64)
    starts, sels, lvs, iws, tabs, slvs, bads, tmpls = [], [], [], [], [], [], [], []
    n_st = n_lv = n_tab = n_slv = n_tmpl = 0
    lengths, crcs, seg_bits = [], [], []
    raw = None
    pos = head_size
    max_bucket = 1
    for k, (cfg, numels) in enumerate(zip(configs, pieces, strict=True)):
        numels = tuple(int(n) for n in numels)
        n = sum(numels)
        row = meta[k]
        if cfg is None:  # 1. raw: header template only, the values are copied by numpy
            header = Header(WireCoding.RAW, 0, torch.float32, 0, 0, 0, 0, len(numels), n, 8 * len(numels) + 4 * n)
            row[mk.M_NUMEL] = -1
            raw = (k, pos + HEADER_SIZE + 8 * len(numels))
            seg_bits.append(8 * header.size)
        else:  # 2. fixed width: every table the kernels need
            header = fixed_segment_header(cfg, torch.float32, numels)
            st = bucket_starts(numels, cfg.bucket_size)
            t = level_tables(cfg.levels)
            row[mk.M_NUMEL] = n
            row[mk.M_ST_LO], row[mk.M_ST_HI] = n_st, n_st + len(st)
            row[mk.M_NORMS] = pos + HEADER_SIZE + 8 * len(numels)
            row[mk.M_CODES] = row[mk.M_NORMS] + 4 * (len(st) - 1)
            row[mk.M_END] = pos + header.size
            row[mk.M_WIDTH] = cfg.bits
            row[mk.M_NORM_KIND] = int(cfg.norm is Norm.LINF)
            row[mk.M_INTERVALS], row[mk.M_SHIFT], row[mk.M_ONE_STEP] = t.intervals, t.shift, int(t.one_step)
            row[mk.M_LV_LO], row[mk.M_LV_HI] = n_lv, n_lv + len(t.padded)
            row[mk.M_TAB_LO], row[mk.M_TAB_HI] = n_tab, n_tab + len(t.table)
            row[mk.M_SLV_LO], row[mk.M_SLV_HI] = n_slv, n_slv + len(t.signed)
            row[mk.M_INDEX] = k
            starts.append(st)
            lvs.append(t.padded)
            iws.append(np.append(t.inv_width, np.float32(0.0)))  # as long as the padded levels
            tabs.append(t.table.astype(np.int32))
            slvs.append(t.signed)
            bads.append(t.invalid)
            n_st, n_lv, n_tab, n_slv = n_st + len(st), n_lv + len(t.padded), n_tab + len(t.table), n_slv + len(t.signed)
            sels.append(cpu.select_rows(t.padded, t.inv_width))
            max_bucket = max(max_bucket, cfg.bucket_size)
            seg_bits.append(8 * header.size - (8 * ((n * cfg.bits + 7) // 8) - n * cfg.bits))
        if cfg is None:
            sels.append(np.zeros((2, cpu.SELECT_MAX_LEVELS), dtype=np.int32))
        tm = _template(header, numels)  # 3. header template and the CRC of its static part
        row[mk.M_HDR] = pos
        row[mk.M_TMPL_LO], row[mk.M_TMPL_HI] = n_tmpl, n_tmpl + tm.size
        tmpls.append(tm)
        n_tmpl += tm.size
        crcs.append((pos + _CRC_AT, pos + tm.size, pos + header.size, crc32(tm)))
        lengths.append(header.size)
        pos += header.size
    n_layers = sum(len(p) for p in pieces)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(0, dtype=dtype), dtype=dtype)

    return MessageLayout(
        size=pos, head_size=head_size, lengths=tuple(lengths), numels=tuple(sum(p) for p in pieces), meta=meta,
        starts=cat(starts, np.int64), lvs=cat(lvs, np.float32),
        sels=np.stack(sels) if sels else np.zeros((0, 2, cpu.SELECT_MAX_LEVELS), dtype=np.int32),
        iws=cat(iws, np.float32), tabs=cat(tabs, np.int32), slvs=cat(slvs, np.float32), bads=cat(bads, np.uint8),
        tmpl=cat(tmpls, np.uint8), crcs=tuple(crcs), raw=raw, max_bucket=max_bucket,
        bits=8 * head_size + sum(seg_bits), segment_bits=tuple(seg_bits),
        framing_bits=8 * head_size + len(configs) * 8 * HEADER_SIZE + 64 * n_layers,
    )  # fmt: skip


def _addresses(layout: MessageLayout, flats: Sequence[torch.Tensor]) -> np.ndarray | None:
    """Each group buffer's address, or ``None`` unless every one is a flat contiguous CPU
    float32 tensor of the expected size (anything else takes the per-segment path)."""
    if len(flats) != len(layout.numels):
        return None
    for f, n in zip(flats, layout.numels, strict=True):
        if not (
            isinstance(f, torch.Tensor) and f.dtype == torch.float32 and f.device.type == "cpu"
            and f.dim() == 1 and f.numel() == n and f.is_contiguous()
        ):  # fmt: skip
            return None
    return np.array([f.data_ptr() for f in flats], dtype=np.int64)


def encode_into(layout: MessageLayout, flats: Sequence[torch.Tensor], seed: int, buf: np.ndarray) -> bool:
    """Write every segment of the message into ``buf`` (``layout.size`` bytes; the message header
    is the caller's).  ``False`` (nothing written) if the buffers do not suit the kernel; raises
    as ``encode_tensor`` does on NaN/Inf input or a norm overflow."""
    addrs = _addresses(layout, flats)
    if addrs is None:
        return False
    scratch = np.empty((2, layout.max_bucket), dtype=np.float32)
    cs = np.empty(layout.max_bucket, dtype=np.uint8)
    status, s, bucket = mk.encode_message(
        addrs, layout.meta, layout.starts, layout.sels, layout.lvs, layout.iws, layout.tabs, layout.tmpl,
        np.uint64(seed & 0xFFFFFFFFFFFFFFFF), buf, scratch, cs,
    )  # fmt: skip
    if status != cpu.OK:
        row = layout.meta[s]
        raise_for_status(status, bucket, layout.starts[row[mk.M_ST_LO] : row[mk.M_ST_HI]], "encode")
    if layout.raw is not None:
        k, at = layout.raw
        buf[at : at + 4 * layout.numels[k]].view(np.float32)[:] = flats[k].numpy()
    for at, lo, hi, static in layout.crcs:
        _U32.pack_into(buf, at, crc32(buf[lo:hi], static))
    return True


def decode_into(
    layout: MessageLayout, buf: np.ndarray, flats: Sequence[torch.Tensor], accumulate: bool, lengths: Sequence[int]
) -> bool:
    """Decode the message ``buf`` (its header already checked) into ``flats``; ``lengths`` are the
    segment lengths its header declares.  ``False``, with nothing written, if a check fails before
    decoding (see the module docstring); raises :class:`~qoda.codec.format.CodecError` for an
    invalid code or padding, as the per-segment path.

    Every segment length must be the layout's, not only their sum (the size): the per-segment
    path splits the message by these lengths, so shifted lengths fail there (O(segments) here)."""
    if buf.size != layout.size or tuple(lengths) != layout.lengths:
        return False
    addrs = _addresses(layout, flats)
    if addrs is None:
        return False
    for at, lo, hi, static in layout.crcs:
        if crc32(buf[lo:hi], static) != _U32.unpack_from(buf, at)[0]:
            return False
    status, _, index = mk.decode_message(
        addrs, layout.meta, layout.starts, layout.slvs, layout.bads, layout.tmpl, buf, 0, accumulate
    )
    if status in (mk.ERR_HEADER, mk.ERR_NORM):
        return False
    if status != cpu.OK:
        _fail(status, index)
    if layout.raw is not None:
        k, at = layout.raw
        vals = buf[at : at + 4 * layout.numels[k]].view(np.float32)
        t = flats[k].numpy()
        if accumulate:
            t += vals
        else:
            t[:] = vals
    return True
