"""Fused CPU kernels (numba) for a whole layer-wise message: one call encodes, one decodes.

Hand-written because a message of a real model holds ~6 segments of small tensors: calling
the per-segment kernels from Python (header packing, bucket starts, level tables, seeds,
dispatch) cost three quarters of the codec's time.  These kernels take every segment's
layout as arrays precomputed once per plan (:class:`qoda.codec.layerwise.MessageLayout`) and
run the per-bucket primitives of :mod:`qoda.quant.kernels.cpu` over all segments, writing
the same bytes as the per-segment path (segment headers are copied from templates; CRCs are
filled by the caller with zlib-ng's CRC-32, ~1% of an encode).

Group buffers are passed by address (``tensor.data_ptr()``) so one compiled signature serves
every plan; the caller keeps them alive and checks dtype, device, contiguity and size.

Per quantized segment ``s``, ``meta[s]`` holds (see the ``M_*`` column indices): numel, its
bucket starts ``starts[lo:hi]`` (relative to the segment), byte offsets of the norms and of
the codes in the message and the end of the codes, width, norm kind, level-table slices into
the concatenated ``lvs`` / ``iws`` / ``tabs`` / ``slvs`` / ``bads`` arrays, the table's
shift, one-step flag and uniform-interval count, and the segment's index in the message (its
seed is :func:`qoda.codec.layerwise.segment_seed` of the message seed and that index).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from qoda.quant.kernels.cpu import (
    ERR_BAD_CODE,
    ERR_BAD_PADDING,
    OK,
    _bucket_norm,
    _codes_into,
    _first_invalid,
    _load_u32,
    _pack_codes8,
    _per_mode,
    _store_u32,
    _unpack_codes8,
    _unpack_tree_segment,
    tree_levels,
)

(M_NUMEL, M_ST_LO, M_ST_HI, M_NORMS, M_CODES, M_END, M_WIDTH, M_NORM_KIND, M_INTERVALS, M_SHIFT,
 M_ONE_STEP, M_LV_LO, M_LV_HI, M_TAB_LO, M_TAB_HI, M_INDEX, M_SLV_LO, M_SLV_HI, M_HDR, M_TMPL_LO,
 M_TMPL_HI) = range(21)  # fmt: skip
N_META = 21

ERR_HEADER = 16  # a segment header or its layer sizes differ from the receiver's template
ERR_NORM = 17  # a bucket norm is negative or not finite

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@intrinsic
def _f32_at(typingctx, addr):  # pragma: no cover - compiled
    """A float32 pointer from an integer address (``tensor.data_ptr()``)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

    return types.CPointer(types.float32)(types.int64), codegen


@nb.njit(inline="always")
def _segment_keys(seed, index):  # pragma: no cover - compiled
    """``seed_keys(segment_seed(seed, index))`` of :mod:`qoda.quant.rng` / :mod:`qoda.codec.layerwise`
    in uint64 arithmetic (wrapping, as the Python versions mask)."""
    s = seed * np.uint64(0x100000001B3) + np.uint64(index) * np.uint64(0x9E3779B1) + np.uint64(1)
    z = s + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return np.int64(z & np.uint64(0xFFFFFFFF)), np.int64(z >> np.uint64(32))


@nb.njit(nogil=True, cache=True)
def segment_keys(seed, index):  # pragma: no cover - compiled
    """:func:`_segment_keys` callable from Python (for tests)."""
    return _segment_keys(seed, index)


@nb.njit(nogil=True, cache=True)
def encode_message(
    addrs, meta, starts, sels, lvs, iws, tabs, tmpl, seed, out, scratch, cs
):  # pragma: no cover - compiled
    """Quantize and pack every quantized segment of a message into ``out`` (the message buffer)
    and copy every segment's header template (``tmpl``; CRC field zero) into place.

    ``meta`` rows with ``M_NUMEL < 0`` are header-only (the raw segment, filled by the caller).
    Returns ``(status, segment, bucket)``: the first failing bucket (non-finite input or norm
    overflow, as :func:`qoda.quant.kernels.cpu.quantize_pack`).
    """
    for s in range(meta.shape[0]):
        row = meta[s]
        h = row[M_HDR]
        for t in range(row[M_TMPL_HI] - row[M_TMPL_LO]):
            out[h + t] = tmpl[row[M_TMPL_LO] + t]
        n = row[M_NUMEL]
        if n < 0:
            continue
        x = nb.carray(_f32_at(addrs[s]), (n,))
        xi = x.view(np.int32)
        k1, k2 = _segment_keys(seed, row[M_INDEX])
        st = starts[row[M_ST_LO] : row[M_ST_HI]]
        lv = lvs[row[M_LV_LO] : row[M_LV_HI]]
        iw = iws[row[M_LV_LO] : row[M_LV_HI]]
        table = tabs[row[M_TAB_LO] : row[M_TAB_HI]]
        width = row[M_WIDTH]
        npos = row[M_NORMS]
        pos = row[M_CODES]
        end = row[M_END]
        carry = np.uint64(0)
        nacc = np.int64(0)  # not the literal 0: one compiled _pack_codes8
        for b in range(st.shape[0] - 1):
            a = st[b]
            e = st[b + 1]
            xb = x[a:e]
            xib = xi[a:e]
            status, nrm = _bucket_norm(xb, xib, row[M_NORM_KIND])
            if status != OK:
                return status, s, b
            _store_u32(out, npos + 4 * b, np.float32(nrm).view(np.uint32))
            _codes_into(
                xb, xib, a, nrm, lv, iw, table, row[M_SHIFT], row[M_ONE_STEP] != 0, row[M_INTERVALS], sels[s],
                k1, k2, cs, scratch,
            )  # fmt: skip
            pos, carry, nacc = _pack_codes8(cs, e - a, width, out, pos, end, carry, nacc)
        if nacc > 0:
            out[pos] = np.uint8(carry & np.uint64(0xFF))
    return OK, -1, -1


def _decode_message_kernel(accumulate: bool):  # type: ignore[no-untyped-def]
    @nb.njit(nogil=True, cache=True)
    def decode_message_mode(addrs, meta, starts, slvs, bads, tmpl, data, base):  # pragma: no cover - compiled
        """:func:`decode_message` with ``accumulate`` a compile-time constant."""
        # 1. headers (CRC field excluded) and layer sizes equal the templates; norms valid
        for s in range(meta.shape[0]):
            row = meta[s]
            h = row[M_HDR]
            lo = row[M_TMPL_LO]
            for t in range(row[M_TMPL_HI] - lo):
                if (t < 40 or t >= 44) and data[base + h + t] != tmpl[lo + t]:
                    return ERR_HEADER, s, -1
            if row[M_NUMEL] < 0:
                continue
            npos = base + row[M_NORMS]
            for b in range(row[M_ST_HI] - row[M_ST_LO] - 1):
                bits = _load_u32(data, npos + 4 * b)
                # negative (sign bit set), Inf or NaN; -0.0 passes, as in the per-segment check
                if bits >= np.uint32(0x7F800000) and bits != np.uint32(0x80000000):
                    return ERR_NORM, s, b
        # 2. decode
        norms = np.empty(0, dtype=np.float32)  # the bucket norms of a tree-decoded segment
        for s in range(meta.shape[0]):
            row = meta[s]
            n = row[M_NUMEL]
            if n < 0:
                continue
            out = nb.carray(_f32_at(addrs[s]), (n,))
            st = starts[row[M_ST_LO] : row[M_ST_HI]]
            slv = slvs[row[M_SLV_LO] : row[M_SLV_HI]]
            bad = bads[row[M_SLV_LO] : row[M_SLV_HI]]
            width = row[M_WIDTH]
            mags, lim = tree_levels(slv, bad, width)
            npos = base + row[M_NORMS]
            pos = base + row[M_CODES]
            if lim > 0:  # widths 2-5: one bucket loop per segment (as the per-segment decoder)
                nb_ = st.shape[0] - 1
                if norms.shape[0] < nb_:
                    norms = np.empty(nb_, dtype=np.float32)
                for b in range(nb_):
                    norms[b] = np.uint32(_load_u32(data, npos + 4 * b)).view(np.float32)
                status, i = _unpack_tree_segment(data[pos:], st, norms[:nb_], bad, mags, lim, width, out, accumulate)
                if status != OK:
                    return status, s, i
                continue
            nacc = np.int64(0)  # not the literal 0: one compiled _unpack_codes8
            for b in range(st.shape[0] - 1):
                a = st[b]
                e = st[b + 1]
                nrm = np.uint32(_load_u32(data, npos + 4 * b)).view(np.float32)
                bitpos = 8 * pos + nacc
                pos, nacc, flag = _unpack_codes8(data, pos, nacc, a, e - a, width, bad, nrm, slv, out, accumulate)
                if flag:
                    return ERR_BAD_CODE, s, _first_invalid(data, bitpos, a, e - a, width, bad)
            if nacc > 0 and (np.int32(data[pos]) >> nacc) != 0:
                return ERR_BAD_PADDING, s, -1
        return OK, -1, -1

    return decode_message_mode


_DECODE_MESSAGE = _per_mode(_decode_message_kernel)


def decode_message(addrs, meta, starts, slvs, bads, tmpl, data, base, accumulate):  # type: ignore[no-untyped-def]
    """Check every segment of the message ``data`` (segments from byte ``base``) against the
    receiver's templates and its norms, then unpack, dequantize and add (or write) every
    quantized segment into its group buffer.  CRCs are checked by the caller beforehand.

    Returns ``(status, segment, index)``: ``ERR_HEADER`` / ``ERR_NORM`` before anything is
    written; ``ERR_BAD_CODE`` (index: the coordinate in the segment; that bucket and earlier
    segments may be written) or ``ERR_BAD_PADDING``.
    """
    return _DECODE_MESSAGE[bool(accumulate)](addrs, meta, starts, slvs, bads, tmpl, data, base)
