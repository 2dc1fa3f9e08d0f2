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
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from qoda.quant.rng import MIX_M1, MIX_M2, UNIFORM_SCALE

OK = 0
ERR_NONFINITE = 1  # non-finite input coordinate
ERR_OVERFLOW = 2  # bucket norm not representable in float32
ERR_BAD_CODE = 3  # decoded code outside the level set / non-canonical
ERR_BAD_PADDING = 4  # non-zero padding bits

#: The level lookup table is indexed by the top bits of the float32 ``u`` (sign is 0 and
#: ``u <= 1.0 = 0x3F800000``): ``2^(23 - shift)`` cells per octave.  The coarsest shift is
#: chosen for which no cell holds more than one level boundary; then one comparison after
#: the look-up finds the exact interval and the loop has no data-dependent branch.
MIN_TABLE_SHIFT = 10
MAX_TABLE_SHIFT = 16
ONE_F32_BITS = 0x3F800000


def level_table(levels: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """``(table, shift, one_step)``: ``table[c]`` = largest ``j`` with ``l_j <= start of cell c``.

    ``one_step`` is True when every cell contains at most one level boundary, so that
    ``j = table[c] + (l_{j+1} <= u)`` is exact; otherwise the kernels scan upwards.
    """
    for shift in range(MAX_TABLE_SHIFT, MIN_TABLE_SHIFT - 1, -1):
        cells = (ONE_F32_BITS >> shift) + 1
        starts = (np.arange(cells, dtype=np.int64) << shift).astype(np.int32).view(np.float32)
        j = np.clip(np.searchsorted(levels, starts, side="right") - 1, 0, len(levels) - 1).astype(np.int32)
        if cells < 2 or int(np.max(np.diff(j))) <= 1:
            return j, shift, True
    return j, MIN_TABLE_SHIFT, False


def padded_levels(levels: np.ndarray) -> np.ndarray:
    """Levels with a sentinel 2.0 appended, so ``levels[j + 1]`` exists for the top level."""
    return np.append(levels, np.float32(2.0)).astype(np.float32)


def inverse_widths(levels: np.ndarray) -> np.ndarray:
    """``1 / (l_{j+1} - l_j)`` in float32, with a trailing 0 for the top level."""
    w = np.zeros(len(levels), dtype=np.float32)
    w[:-1] = np.float32(1.0) / (levels[1:] - levels[:-1])
    return w


def signed_level_table(levels: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per code ``c`` (``width`` bits): ``(+-l_{c >> 1}, invalid)``; invalid codes map to 0."""
    codes = np.arange(1 << width)
    j = codes >> 1
    invalid = (j >= len(levels)) | (codes == 1)
    mag = np.where(invalid, np.float32(0), levels[np.minimum(j, len(levels) - 1)]).astype(np.float32)
    return np.where(codes & 1, -mag, mag).astype(np.float32), invalid.astype(np.uint8)


@intrinsic
def _uniform(typingctx, i, k1, k2):  # pragma: no cover - compiled
    """``r_i`` of :mod:`qoda.quant.rng` (float32), computed in 32-bit integer lanes.

    Written as LLVM IR because numba widens every integer operation to 64 bits: the 64-bit
    vector multiplies made this hash half of the encoder's time.  In i32 lanes LLVM uses
    16-wide 32-bit multiplies; the bits are identical (the hash is defined modulo 2^32).
    """
    sig = types.float32(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)

        def const(v: int) -> ir.Constant:
            return ir.Constant(i32, v)

        def mix(x):  # type: ignore[no-untyped-def]
            x = builder.xor(x, builder.lshr(x, const(16)))
            x = builder.mul(x, const(MIX_M1))
            x = builder.xor(x, builder.lshr(x, const(15)))
            x = builder.mul(x, const(MIX_M2))
            return builder.xor(x, builder.lshr(x, const(16)))

        i, key1, key2 = (builder.trunc(v, i32) for v in args)
        h = mix(builder.xor(mix(builder.add(i, key1)), key2))
        r = builder.uitofp(builder.lshr(h, const(8)), ir.FloatType())
        return builder.fmul(r, ir.Constant(ir.FloatType(), UNIFORM_SCALE))

    return sig, codegen


@nb.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _bucket_norm(xb, xib, norm_kind):  # pragma: no cover - compiled
    """(status, float32 norm) of the bucket ``xb`` (``xib``: its int32 view); 0 = L2, 1 = L-inf.

    One vectorised pass.  L-inf: the integer maximum of the magnitude bits is the bit pattern
    of ``max |x|`` (IEEE order = integer order for non-negative floats), and any value
    ``>= 0x7F800000`` (the bits of +Inf) flags a NaN/Inf.  L2: a float64 sum of squares cannot
    overflow from float32 inputs, so it is non-finite exactly when an input is; ``reassoc``
    lets it vectorise (the norm travels with the payload, so its last-bit dependence on the
    summation order is harmless).  Kernels index bucket slices with loop counters: numba then
    emits no negative-index wrap-around checks and LLVM vectorises the loops (5x here).
    """
    if norm_kind == 1:
        mb = 0
        for i in range(xib.shape[0]):
            b = xib[i] & 0x7FFFFFFF
            mb = b if b > mb else mb
        if mb >= 0x7F800000:
            return ERR_NONFINITE, np.float32(0.0)
        return OK, np.int32(mb).view(np.float32)
    acc = 0.0
    for i in range(xb.shape[0]):
        v = np.float64(xb[i])
        acc += v * v
    if not np.isfinite(acc):
        return ERR_NONFINITE, np.float32(0.0)
    n = np.float32(np.sqrt(acc))
    if not np.isfinite(n):
        return ERR_OVERFLOW, np.float32(0.0)
    return OK, n


#: Buckets whose norm is below the smallest normal float32 (2^-126) are scaled by 2^64 before
#: ``u = |x| * (1 / norm)`` is formed (``1 / norm`` overflows below ~2.9e-39; the torch path does
#: the same).  Scaling by a power of two is exact here, so such buckets stay unbiased.
TINY_NORM = np.float32(2.0**-126)
TINY_SCALE = 2.0**64

#: Level sets with at most this many levels find each coordinate's interval by comparing
#: against every level (branch-free, vectorised); larger ones use the look-up table.
SELECT_MAX_LEVELS = 4


@nb.njit(inline="always")
def _bucket_codes(
    xb, xib, a, norm, lv, inv_width, table, shift, one_step, intervals, k1, k2, sc, codes
):  # pragma: no cover
    """Codes of the bucket ``xb`` (global offset ``a``) into ``codes[:len(xb)]``.

    ``lv`` holds the levels plus a sentinel (see :func:`padded_levels`); ``sc`` is a
    ``(5, B)`` float32 scratch: u, its int32 view, uniforms, lower level, inverse width.
    Uniform levels (``intervals = s + 1 > 0``) use QSGD's arithmetic form, no look-ups:
    ``t = u (s+1)``, ``j = min(floor(t), s)``, ``p = t - j``.
    """
    n = xb.shape[0]
    if norm == 0:
        for t in range(n):
            codes[t] = 0
        return
    uf = sc[0, :n]
    ui = uf.view(np.int32)
    rs = sc[1, :n]
    lo = sc[2, :n]
    w = sc[3, :n]
    js = sc[4, :n].view(np.int32)
    one = np.float32(1.0)
    if norm < TINY_NORM:
        # 1/norm overflows float32 below ~2.9e-39: scale the bucket by an exact power of two
        # first (subnormals scale without rounding), so u is the same ratio as for a normal bucket.
        big_s = np.float32(TINY_SCALE)
        inv = one / (norm * big_s)
        for t in range(n):
            u = (abs(xb[t]) * big_s) * inv
            uf[t] = u if u < one else one
    else:
        inv = one / norm
        for t in range(n):
            u = abs(xb[t]) * inv
            uf[t] = u if u < one else one
    if intervals > 0:
        big = np.float32(intervals)
        smax = np.int32(intervals - 1)
        for t in range(n):
            tt = uf[t] * big
            j = np.int32(tt)
            j = j if j < smax else smax
            j += np.int32(_uniform(a + t, k1, k2) < tt - np.float32(j))
            codes[t] = (j << 1) | np.int32((xib[t] < 0) & (j > 0))
        return
    for t in range(n):
        rs[t] = _uniform(a + t, k1, k2)
    nl = lv.shape[0] - 1
    if nl <= SELECT_MAX_LEVELS:
        l0 = lv[0]
        w0 = inv_width[0]
        for t in range(n):
            lo[t] = l0
            w[t] = w0
            js[t] = 0
        for k in range(1, nl):
            lk = lv[k]
            wk = inv_width[k]
            for t in range(n):
                m = lk <= uf[t]
                lo[t] = lk if m else lo[t]
                w[t] = wk if m else w[t]
                js[t] += np.int32(m)
    else:
        top = nl - 1
        for t in range(n):
            u = uf[t]
            j = table[np.uint32(ui[t]) >> shift]
            if one_step:
                j += lv[np.uint32(j + 1)] <= u
            else:
                while j < top and lv[j + 1] <= u:
                    j += 1
            js[t] = j
            lo[t] = lv[np.uint32(j)]
            w[t] = inv_width[np.uint32(j)]
    for t in range(n):
        p = (uf[t] - lo[t]) * w[t]
        j = js[t] + np.int32(rs[t] < p)
        codes[t] = (j << 1) | np.int32((xib[t] < 0) & (j > 0))


@nb.njit(nogil=True, cache=True)
def quantize_to_codes(
    x, starts, lv, inv_width, table, shift, one_step, intervals, norm_kind, k1, k2, norms, codes, scratch
):  # pragma: no cover
    """Quantize ``x`` bucket by bucket: ``norms[b]`` and ``codes[i]`` (int32).

    Returns ``(status, bucket)``: the first failing bucket on error.
    """
    xi = x.view(np.int32)
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        xb = x[a:e]
        xib = xi[a:e]
        st, nrm = _bucket_norm(xb, xib, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        _bucket_codes(xb, xib, a, nrm, lv, inv_width, table, shift, one_step, intervals, k1, k2, scratch, codes[a:e])
    return OK, -1


@nb.njit(inline="always")
def _pack_aligned(cs, n, width, out, pos):  # pragma: no cover - compiled
    """Pack ``n`` codes starting on a byte boundary; returns the new byte position."""
    per = 8 // width
    ob = out[pos : pos + n // per]
    if width == 8:
        for t in range(ob.shape[0]):
            ob[t] = cs[t]
    elif width == 4:
        for t in range(ob.shape[0]):
            ob[t] = cs[2 * t] | (cs[2 * t + 1] << 4)
    else:  # width == 2
        for t in range(ob.shape[0]):
            ob[t] = cs[4 * t] | (cs[4 * t + 1] << 2) | (cs[4 * t + 2] << 4) | (cs[4 * t + 3] << 6)
    return pos + n // per


@nb.njit(nogil=True, cache=True)
def quantize_pack(
    x, starts, lv, inv_width, table, shift, one_step, intervals, norm_kind, k1, k2, width, norms, out, scratch
):  # pragma: no cover
    """Fused quantize + fixed-width packing (LSB-first) of ``width``-bit codes into ``out``.

    ``out`` must hold ``ceil(numel * width / 8)`` bytes.  Returns ``(status, bucket)``.
    Buckets that start on a byte boundary and fill whole bytes take a branch-free path.
    """
    xi = x.view(np.int32)
    cs = np.empty(scratch.shape[1], dtype=np.int32)
    acc = np.int64(0)
    nacc = 0
    pos = 0
    per_byte = 8 // width if 8 % width == 0 else 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        xb = x[a:e]
        xib = xi[a:e]
        st, nrm = _bucket_norm(xb, xib, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        _bucket_codes(xb, xib, a, nrm, lv, inv_width, table, shift, one_step, intervals, k1, k2, scratch, cs)
        n = e - a
        if nacc == 0 and per_byte > 0 and n % per_byte == 0:
            pos = _pack_aligned(cs, n, width, out, pos)
            continue
        for t in range(n):
            acc |= np.int64(cs[t]) << nacc
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
def _unpack_aligned(data, pos, a, n, width, nrm, slv, bad, out, accumulate):  # pragma: no cover
    """Dequantize ``n`` codes from byte ``pos``; returns (new pos, any invalid code)."""
    flag = 0
    per = 8 // width
    db = data[pos : pos + n // per]
    ob = out[a : a + n]
    if width == 8:
        if accumulate:
            for t in range(n):
                c = db[t]
                flag |= bad[c]
                ob[t] += nrm * slv[c]
        else:
            for t in range(n):
                c = db[t]
                flag |= bad[c]
                ob[t] = nrm * slv[c]
    elif width == 4:
        if accumulate:
            for t in range(db.shape[0]):
                c0 = db[t] & 15
                c1 = db[t] >> 4
                flag |= bad[c0] | bad[c1]
                ob[2 * t] += nrm * slv[c0]
                ob[2 * t + 1] += nrm * slv[c1]
        else:
            for t in range(db.shape[0]):
                c0 = db[t] & 15
                c1 = db[t] >> 4
                flag |= bad[c0] | bad[c1]
                ob[2 * t] = nrm * slv[c0]
                ob[2 * t + 1] = nrm * slv[c1]
    else:  # width == 2
        for t in range(db.shape[0]):
            for k in range(4):
                c = (db[t] >> (2 * k)) & 3
                flag |= bad[c]
                _emit(ob, 4 * t + k, nrm * slv[c], accumulate)
    return pos + n // per, flag


@nb.njit(nogil=True, cache=True)
def unpack_dequantize(data, starts, norms, slv, bad, width, out, accumulate, codes, want_codes):  # pragma: no cover
    """Fused unpacking + dequantization (+ accumulation into ``out``).

    ``slv``/``bad`` come from :func:`signed_level_table`.  ``data`` must hold exactly
    ``ceil(numel * width / 8)`` bytes (checked by the caller).  Returns ``(status, index)``:
    an invalid code (outside the level set, or a negative zero) or non-zero padding is
    reported; the bucket holding an invalid code may already have been written.
    """
    mask = (1 << width) - 1
    acc = np.int64(0)
    nacc = 0
    pos = 0
    per_byte = 8 // width if 8 % width == 0 else 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        n = e - a
        nrm = norms[b]
        if nacc == 0 and per_byte > 0 and n % per_byte == 0 and not want_codes:
            pos, flag = _unpack_aligned(data, pos, a, n, width, nrm, slv, bad, out, accumulate)
            if flag:
                for i in range(a, e):  # locate the first invalid code for the message
                    c = (data[(i * width) >> 3] >> ((i * width) & 7)) & mask
                    if bad[c]:
                        return ERR_BAD_CODE, i
            continue
        for i in range(a, e):
            while nacc < width:
                acc |= np.int64(data[pos]) << nacc
                pos += 1
                nacc += 8
            c = acc & mask
            acc >>= width
            nacc -= width
            if bad[c]:
                return ERR_BAD_CODE, i
            _emit(out, i, nrm * slv[c], accumulate)
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
            v = nrm * levels[c >> 1]
            _emit(out, i, -v if c & 1 else v, accumulate)
    return OK, -1
