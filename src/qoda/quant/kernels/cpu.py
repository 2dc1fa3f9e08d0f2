"""Fused CPU kernels (numba): quantize+pack and unpack+dequantize(+accumulate).

Hand-written because no library fuses stochastic rounding with bit packing: eager torch
needs ~10 full-size temporaries per call, these kernels make one pass over each bucket
while it sits in L1 (norm, then codes into a bucket-sized scratch, then packing).

Conventions shared with :mod:`qoda.quant.kernels.torch_ref` (which must stay bit-identical):

* a *code* is ``(j << 1) | sign`` with ``j`` the level index and ``sign = 1`` for a negative
  coordinate rounded to a non-zero level (a zero level always has sign 0);
* ``u = min(|x| * (1 / ||v||_q), 1)`` in float32, ``p = (u - l_j) * inv_width[j]`` in float32,
  round up iff ``r_i < p`` with ``r_i`` from :mod:`qoda.quant.rng`;
* the dequantized value is ``float32(norm * l_j)``, negated if the sign bit is set.

Every kernel returns a status instead of raising (numba ``nogil`` code cannot raise usefully);
the Python wrappers in :mod:`qoda.quant.quantizer` and :mod:`qoda.codec` turn it into errors.
Kernels never index outside their arrays for any input: decoders check every code.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from qoda.quant.rng import MASK32, MIX_M1, MIX_M2, UNIFORM_SCALE

OK = 0
ERR_NONFINITE = 1  # non-finite input coordinate
ERR_OVERFLOW = 2  # bucket norm not representable in float32
ERR_BAD_CODE = 3  # decoded code outside the level set / non-canonical
ERR_BAD_PADDING = 4  # non-zero padding bits

#: Cells of the level lookup table: the top 16 bits of the float32 ``u`` (sign is 0,
#: ``u <= 1.0 = 0x3F800000``), i.e. 128 cells per octave, exact for any level set.
TABLE_SHIFT = 16
TABLE_CELLS = (0x3F800000 >> TABLE_SHIFT) + 1


def level_table(levels: np.ndarray) -> np.ndarray:
    """``table[c]`` = largest ``j`` with ``l_j <= start of cell c`` (see TABLE_SHIFT)."""
    starts = (np.arange(TABLE_CELLS, dtype=np.int64) << TABLE_SHIFT).astype(np.int32).view(np.float32)
    j = np.searchsorted(levels, starts, side="right") - 1
    return np.clip(j, 0, len(levels) - 1).astype(np.int32)


def inverse_widths(levels: np.ndarray) -> np.ndarray:
    """``1 / (l_{j+1} - l_j)`` in float32, with a trailing 0 for the top level."""
    w = np.zeros(len(levels), dtype=np.float32)
    w[:-1] = np.float32(1.0) / (levels[1:] - levels[:-1])
    return w


@nb.njit(inline="always")
def _mix32(x):  # pragma: no cover - compiled
    x ^= x >> 16
    x = (x * MIX_M1) & MASK32
    x ^= x >> 15
    x = (x * MIX_M2) & MASK32
    x ^= x >> 16
    return x


@nb.njit(inline="always")
def _uniform(i, k1, k2):  # pragma: no cover - compiled
    h = _mix32(_mix32((i + k1) & MASK32) ^ k2)
    return np.float32(h >> 8) * np.float32(UNIFORM_SCALE)


@nb.njit(inline="always")
def _bucket_norm(x, a, e, norm_kind):  # pragma: no cover - compiled
    """(status, float32 norm) of ``x[a:e]``; norm_kind 0 = L2, 1 = L-inf."""
    if norm_kind == 0:
        acc = 0.0
        for i in range(a, e):
            v = np.float64(x[i])
            acc += v * v  # float32^2 never overflows float64: acc is finite iff x is
        if not np.isfinite(acc):
            return ERR_NONFINITE, np.float32(0.0)
        n = np.float32(np.sqrt(acc))
        if not np.isfinite(n):
            return ERR_OVERFLOW, np.float32(0.0)
        return OK, n
    chk = 0.0
    m = np.float32(0.0)
    for i in range(a, e):
        av = abs(x[i])
        chk += av
        if av > m:
            m = av
    if not np.isfinite(chk):
        return ERR_NONFINITE, np.float32(0.0)
    return OK, m


@nb.njit(inline="always")
def _bucket_codes(x, a, e, norm, levels, inv_width, table, k1, k2, uf, ui, codes):  # pragma: no cover
    """Codes of ``x[a:e]`` into ``codes[0:e-a]``; ``uf``/``ui`` are one scratch viewed twice."""
    n = e - a
    if norm == 0:
        for t in range(n):
            codes[t] = 0
        return
    inv = np.float32(1.0) / norm
    one = np.float32(1.0)
    for t in range(n):
        u = abs(x[a + t]) * inv
        uf[t] = u if u < one else one
    top = levels.shape[0] - 1
    for t in range(n):
        u = uf[t]
        j = table[ui[t] >> TABLE_SHIFT]
        while j < top and levels[j + 1] <= u:
            j += 1
        p = (u - levels[j]) * inv_width[j]
        if _uniform(a + t, k1, k2) < p:
            j += 1
        c = j << 1
        if j > 0 and x[a + t] < 0:
            c |= 1
        codes[t] = c


@nb.njit(nogil=True, cache=True)
def quantize_to_codes(
    x, starts, levels, inv_width, table, norm_kind, k1, k2, norms, codes, scratch
):  # pragma: no cover
    """Quantize ``x`` bucket by bucket: ``norms[b]`` and ``codes[i]`` (uint16).

    Returns ``(status, bucket)``: the first failing bucket on error.
    """
    uf = scratch
    ui = scratch.view(np.int32)
    cs = np.empty(scratch.shape[0], dtype=np.int32)
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        st, nrm = _bucket_norm(x, a, e, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        _bucket_codes(x, a, e, nrm, levels, inv_width, table, k1, k2, uf, ui, cs)
        for t in range(e - a):
            codes[a + t] = cs[t]
    return OK, -1


@nb.njit(nogil=True, cache=True)
def quantize_pack(
    x, starts, levels, inv_width, table, norm_kind, k1, k2, width, norms, out, scratch
):  # pragma: no cover
    """Fused quantize + fixed-width packing (LSB-first) of ``width``-bit codes into ``out``.

    ``out`` must hold ``ceil(numel * width / 8)`` bytes.  Returns ``(status, bucket)``.
    """
    uf = scratch
    ui = scratch.view(np.int32)
    cs = np.empty(scratch.shape[0], dtype=np.int64)
    acc = np.int64(0)
    nacc = 0
    pos = 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        st, nrm = _bucket_norm(x, a, e, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        _bucket_codes(x, a, e, nrm, levels, inv_width, table, k1, k2, uf, ui, cs)
        if width == 4:
            t = 0
            n = e - a
            if nacc == 4 and n > 0:  # finish the half byte left by an odd-length bucket
                out[pos] = acc | (cs[0] << 4)
                pos += 1
                acc = 0
                nacc = 0
                t = 1
            while t + 1 < n:
                out[pos] = cs[t] | (cs[t + 1] << 4)
                pos += 1
                t += 2
            if t < n:
                acc = cs[t]
                nacc = 4
        elif width == 8:
            for t in range(e - a):
                out[pos + t] = cs[t]
            pos += e - a
        else:
            for t in range(e - a):
                acc |= cs[t] << nacc
                nacc += width
                while nacc >= 8:
                    out[pos] = acc & 0xFF
                    pos += 1
                    acc >>= 8
                    nacc -= 8
    if nacc > 0:
        out[pos] = acc & 0xFF
    return OK, -1


@nb.njit(inline="always")
def _emit(out, i, v, accumulate):  # pragma: no cover - compiled
    if accumulate:
        out[i] += v
    else:
        out[i] = v


@nb.njit(inline="always")
def _dequant(code, nrm, levels):  # pragma: no cover - compiled
    v = nrm * levels[code >> 1]
    return -v if code & 1 else v


@nb.njit(nogil=True, cache=True)
def unpack_dequantize(data, starts, norms, levels, width, out, accumulate, codes, want_codes):  # pragma: no cover
    """Fused unpacking + dequantization (+ accumulation into ``out``).

    ``data`` must hold exactly ``ceil(numel * width / 8)`` bytes (checked by the caller).
    Returns ``(status, index)``: a code outside the level set, a negative zero or
    non-zero padding is reported, never written.
    """
    top = levels.shape[0] - 1
    mask = (1 << width) - 1
    acc = np.int64(0)
    nacc = 0
    pos = 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        nrm = norms[b]
        for i in range(a, e):
            while nacc < width:
                acc |= np.int64(data[pos]) << nacc
                pos += 1
                nacc += 8
            c = acc & mask
            acc >>= width
            nacc -= width
            if (c >> 1) > top or c == 1:
                return ERR_BAD_CODE, i
            _emit(out, i, _dequant(c, nrm, levels), accumulate)
            if want_codes:
                codes[i] = c
    if acc != 0:
        return ERR_BAD_PADDING, -1
    return OK, -1


@nb.njit(nogil=True, cache=True)
def dequantize_codes(codes, starts, norms, levels, out, accumulate):  # pragma: no cover
    """Dequantize (+ accumulate) codes; returns ``(status, index)`` like the unpacker."""
    top = levels.shape[0] - 1
    for b in range(starts.shape[0] - 1):
        nrm = norms[b]
        for i in range(starts[b], starts[b + 1]):
            c = np.int64(codes[i])
            if (c >> 1) > top or c == 1:
                return ERR_BAD_CODE, i
            _emit(out, i, _dequant(c, nrm, levels), accumulate)
    return OK, -1
