"""Fused CPU kernels (numba): quantize+pack and unpack+dequantize(+accumulate).

Hand-written because no library fuses stochastic rounding with bit packing: eager torch
needs ~10 full-size temporaries per call, these kernels visit each bucket while it sits in
L1: a norm pass, one vectorised code pass into a bucket-sized uint8 code buffer
(:func:`_codes_into`), one packing pass (:func:`_pack_codes8`: 8 codes per unaligned 64-bit
store, any width and alignment).  Decoding mirrors it (:func:`_unpack_tree_buckets` for
widths <= 5, :func:`_unpack_codes8` with tables otherwise).  The
per-bucket primitives are shared with the whole-message kernels of
:mod:`qoda.quant.kernels.message`.  Where the time goes: docs/quantization.md, "Codec throughput".

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
def _uniform(typingctx, a, t, k1, k2):  # pragma: no cover - compiled
    """``r_i`` of :mod:`qoda.quant.rng` (float32) for ``i = a + t``, computed in 32-bit lanes.

    Written as LLVM IR because numba widens every integer operation to 64 bits: the 64-bit
    vector multiplies made this hash half of the encoder's time.  In i32 lanes LLVM uses
    16-wide 32-bit multiplies; the bits are identical (the hash is defined modulo 2^32).
    ``a`` (the bucket start) and ``t`` (the loop counter) are truncated separately, so the
    vectorised loop keeps a 32-bit induction vector instead of adding and narrowing 64-bit ones.
    """
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

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

        ia, it, key1, key2 = (builder.trunc(v, i32) for v in args)
        h = mix(builder.xor(mix(builder.add(builder.add(it, ia), key1)), key2))
        r = builder.uitofp(builder.lshr(h, const(8)), ir.FloatType())
        return builder.fmul(r, ir.Constant(ir.FloatType(), UNIFORM_SCALE))

    return sig, codegen


@intrinsic
def _index_bits(typingctx, b3, b2, b1, b0):  # pragma: no cover - compiled
    """``8 b3 + 4 b2 + 2 b1 + b0`` of four booleans, as an int32 (see :func:`_code`)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        v = ir.Constant(i32, 0)
        for k, b in enumerate(reversed(args)):
            v = builder.or_(v, builder.shl(builder.zext(b, i32), ir.Constant(i32, k)))
        return v

    return types.int32(b3, b2, b1, b0), codegen


@intrinsic
def _code(typingctx, j, up, neg):  # pragma: no cover - compiled
    """The code ``(j' << 1) | (neg & (j' > 0))`` of ``j' = j + up`` (``j``: int32, ``up`` and
    ``neg``: booleans), computed in 32-bit integer lanes: numba widens integer arithmetic to 64
    bits, which doubled the vector instructions of the code computation."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        jj = builder.add(args[0], builder.zext(args[1], i32))
        pos = builder.icmp_signed(">", jj, ir.Constant(i32, 0))
        sign = builder.zext(builder.and_(args[2], pos), i32)
        return builder.or_(builder.shl(jj, ir.Constant(i32, 1)), sign)

    return types.int32(types.int32, types.boolean, types.boolean), codegen


def _byte_pointer(context, builder, arr_type, arr, pos, ity):  # type: ignore[no-untyped-def]
    """``&arr[pos]`` of a uint8 array, as an ``ity`` pointer (no bounds check: callers check)."""
    ary = context.make_array(arr_type)(context, builder, arr)
    return builder.bitcast(builder.gep(ary.data, [pos]), ity.as_pointer())


def _unaligned_access(bits: int, kind: str):  # type: ignore[no-untyped-def]
    """An intrinsic loading (``kind="load"``) or storing an unaligned little-endian ``bits``-bit
    integer at byte ``pos`` of a uint8 array.  Written as LLVM IR because numba cannot view a
    byte array at an unaligned offset: the packers move 8 codes per 64-bit access this way."""
    nbt = types.uint64 if bits == 64 else types.uint32
    ity = ir.IntType(bits)

    if kind == "load":

        @intrinsic
        def load(typingctx, arr, pos):  # pragma: no cover - compiled
            def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
                ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1], ity)
                return builder.load(ptr, align=1)

            return nbt(arr, types.intp), codegen

        return load

    @intrinsic
    def store(typingctx, arr, pos, value):  # pragma: no cover - compiled
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1], ity)
            builder.store(context.cast(builder, args[2], signature.args[2], nbt), ptr, align=1)
            return context.get_dummy_value()

        return types.void(arr, types.intp, value), codegen

    return store


_load_u64 = _unaligned_access(64, "load")
_store_u64 = _unaligned_access(64, "store")
_load_u32 = _unaligned_access(32, "load")
_store_u32 = _unaligned_access(32, "store")


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
SELECT_MAX_LEVELS = 16


@nb.njit(inline="always")
def _magnitude(x, pre, inv, one):  # pragma: no cover - compiled
    """``u = min(|x| * pre * (1 / norm), 1)``, formed as the quantizer defines it: ``pre`` is 1,
    or 2^64 for a tiny norm (then ``inv = 1 / (norm * pre)``; see :data:`TINY_NORM`)."""
    u = (abs(x) * pre) * inv
    return u if u < one else one


@nb.njit(nogil=True, cache=True)
def select_rows(lv, inv_width):  # pragma: no cover - compiled
    """``(2, SELECT_MAX_LEVELS)`` int32: the float32 bits of the levels ``lv`` (padded with the
    2.0 sentinel, never <= u) and of their inverse widths (padded with 0), for :func:`_select_codes`."""
    out = np.zeros((2, SELECT_MAX_LEVELS), dtype=np.float32)
    m = min(lv.shape[0] - 1, SELECT_MAX_LEVELS)
    for k in range(SELECT_MAX_LEVELS):
        out[0, k] = lv[k] if k < m else np.float32(2.0)
        out[1, k] = inv_width[k] if k < m else np.float32(0.0)
    return out.view(np.int32)


@nb.njit(forceinline=True)
def _halve16(m, r):  # pragma: no cover - compiled
    """The upper half of the 16-tuple ``r`` where the all-ones mask ``m`` is set, else its lower half."""
    return (
        _pick(m, r[0], r[8]), _pick(m, r[1], r[9]), _pick(m, r[2], r[10]), _pick(m, r[3], r[11]),
        _pick(m, r[4], r[12]), _pick(m, r[5], r[13]), _pick(m, r[6], r[14]), _pick(m, r[7], r[15]),
    )  # fmt: skip


@nb.njit(forceinline=True)
def _halve8(m, r):  # pragma: no cover - compiled
    """:func:`_halve16` of an 8-tuple."""
    return _pick(m, r[0], r[4]), _pick(m, r[1], r[5]), _pick(m, r[2], r[6]), _pick(m, r[3], r[7])


@nb.njit(forceinline=True)
def _halve4(m, r):  # pragma: no cover - compiled
    """:func:`_halve16` of a 4-tuple."""
    return _pick(m, r[0], r[2]), _pick(m, r[1], r[3])


@nb.njit(forceinline=True)
def _select_codes(xb, xib, a, pre, inv, sel, k1, k2, cs, K):  # pragma: no cover - compiled
    """Codes for at most ``K`` (a constant power of two) levels by a branch-free binary search.

    Why: LLVM does not vectorise table look-ups on this CPU (gathers are slow on AMD Zen), so
    the look-up loop runs scalar at ~3 ns a coordinate; integer bit-selects vectorise.  The
    levels (padded with the 2.0 sentinel, never ``<= u``) and their inverse widths live in two
    register tuples; each step compares ``u`` against the middle level of the remaining half
    and keeps the upper or lower half of both tuples: ``log2 K`` compares and ``2 (K - 1)``
    selects (comparing against every level took ``K - 1`` compares and index adds more; 16
    levels: 1.45 -> 0.7 ns a coordinate with :func:`_code`).  Levels increase,
    so the search ends at the last level ``l_j <= u`` with the same ``j``, ``l_j`` and
    ``1 / (l_{j+1} - l_j)`` (picked, not computed) as a scan: exact.  Comparisons are on the
    float32 bits (integer order is float order for non-negative floats; ``u >= +0``).
    """
    one = np.float32(1.0)
    lb = sel[0]
    wb = sel[1]
    L = (
        lb[0], lb[1], lb[2], lb[3], lb[4], lb[5], lb[6], lb[7],
        lb[8], lb[9], lb[10], lb[11], lb[12], lb[13], lb[14], lb[15],
    )  # fmt: skip
    W = (
        wb[0], wb[1], wb[2], wb[3], wb[4], wb[5], wb[6], wb[7],
        wb[8], wb[9], wb[10], wb[11], wb[12], wb[13], wb[14], wb[15],
    )  # fmt: skip
    for t in range(xb.shape[0]):
        u = _magnitude(xb[t], pre, inv, one)
        ui = np.float32(u).view(np.int32)
        if K == 16:
            c3 = L[8] <= ui
            m = -np.int32(c3)
            L8 = _halve16(m, L)
            W8 = _halve16(m, W)
        else:
            c3 = False
            L8 = (L[0], L[1], L[2], L[3], L[4], L[5], L[6], L[7])
            W8 = (W[0], W[1], W[2], W[3], W[4], W[5], W[6], W[7])
        if K >= 8:
            c2 = L8[4] <= ui
            m = -np.int32(c2)
            L4 = _halve8(m, L8)
            W4 = _halve8(m, W8)
        else:
            c2 = False
            L4 = (L8[0], L8[1], L8[2], L8[3])
            W4 = (W8[0], W8[1], W8[2], W8[3])
        c1 = L4[2] <= ui
        m = -np.int32(c1)
        L2 = _halve4(m, L4)
        W2 = _halve4(m, W4)
        c0 = L2[1] <= ui
        m = -np.int32(c0)
        lo = _pick(m, L2[0], L2[1])
        w = _pick(m, W2[0], W2[1])
        p = (u - np.int32(lo).view(np.float32)) * np.int32(w).view(np.float32)
        cs[t] = _code(_index_bits(c3, c2, c1, c0), _uniform(a, t, k1, k2) < p, xib[t] < 0)


@nb.njit(forceinline=True)
def _codes_into(
    xb, xib, a, norm, lv, inv_width, table, shift, one_step, intervals, sel, k1, k2, cs, sc
):  # pragma: no cover
    """The codes of :func:`_bucket_codes` for the bucket ``xb`` into ``cs[:len(xb)]`` (uint8 or
    uint16), computed in ONE loop per level family: no scratch rows, so each coordinate is read
    once from L1 and its code written once (the old form made five passes through scratch).

    Level families: uniform levels use QSGD's arithmetic; at most :data:`SELECT_MAX_LEVELS`
    levels compare against every level (:func:`_select_codes`, ``sel`` from
    :func:`select_rows`); more use the look-up table.  Every form
    computes the same ``j``, ``l_j`` and ``1 / (l_{j+1} - l_j)``, so the same float32 ``p``.
    """
    n = xb.shape[0]
    if norm == 0:
        for t in range(n):
            cs[t] = 0
        return
    one = np.float32(1.0)
    pre = np.float32(TINY_SCALE) if norm < TINY_NORM else one
    inv = one / (norm * pre)
    if intervals > 0:
        big = np.float32(intervals)
        smax = np.int32(intervals - 1)
        for t in range(n):
            tt = _magnitude(xb[t], pre, inv, one) * big
            j = np.int32(tt)
            j = j if j < smax else smax
            cs[t] = _code(j, _uniform(a, t, k1, k2) < tt - np.float32(j), xib[t] < 0)
        return
    nl = lv.shape[0] - 1
    if nl <= 4:
        _select_codes(xb, xib, a, pre, inv, sel, k1, k2, cs, 4)
        return
    if nl <= 8:
        _select_codes(xb, xib, a, pre, inv, sel, k1, k2, cs, 8)
        return
    if nl <= SELECT_MAX_LEVELS:
        _select_codes(xb, xib, a, pre, inv, sel, k1, k2, cs, SELECT_MAX_LEVELS)
        return
    # the look-up table: loads LLVM keeps scalar, so the hash is vectorised in a pass of its own
    uf = sc[0, :n]
    rs = sc[1, :n]
    for t in range(n):
        uf[t] = _magnitude(xb[t], pre, inv, one)
        rs[t] = _uniform(a, t, k1, k2)
    ui = uf.view(np.int32)
    if one_step:  # its own loop: no data-dependent branch
        for t in range(n):
            u = uf[t]
            j = table[np.uint32(ui[t]) >> shift]
            j += lv[np.uint32(j + 1)] <= u
            p = (u - lv[np.uint32(j)]) * inv_width[np.uint32(j)]
            j += np.int32(rs[t] < p)
            cs[t] = (j << 1) | np.int32((xib[t] < 0) & (j > 0))
        return
    top = nl - 1
    for t in range(n):
        u = uf[t]
        j = table[np.uint32(ui[t]) >> shift]
        while j < top and lv[j + 1] <= u:
            j += 1
        p = (u - lv[np.uint32(j)]) * inv_width[np.uint32(j)]
        j += np.int32(rs[t] < p)
        cs[t] = (j << 1) | np.int32((xib[t] < 0) & (j > 0))


@nb.njit(nogil=True, cache=True)
def quantize_to_codes(
    x, starts, lv, inv_width, table, shift, one_step, intervals, norm_kind, k1, k2, norms, codes, scratch
):  # pragma: no cover
    """Quantize ``x`` bucket by bucket: ``norms[b]`` and ``codes[i]`` (int32).

    Returns ``(status, bucket)``: the first failing bucket on error.
    """
    xi = x.view(np.int32)
    sel = select_rows(lv, inv_width)
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        xb = x[a:e]
        xib = xi[a:e]
        st, nrm = _bucket_norm(xb, xib, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        _codes_into(xb, xib, a, nrm, lv, inv_width, table, shift, one_step, intervals, sel, k1, k2, codes[a:e], scratch)
    return OK, -1


@nb.njit(inline="always")
def _pack8(v, width):  # pragma: no cover - compiled
    """Eight codes, one per byte of the uint64 ``v``, packed LSB-first into ``8 * width`` bits."""
    w = np.uint64(width)
    m1 = np.uint64((1 << width) - 1) * np.uint64(0x0001000100010001)
    v = (v & m1) | ((v >> (np.uint64(8) - w)) & (m1 << w))
    m2 = np.uint64((1 << (2 * width)) - 1) * np.uint64(0x0000000100000001)
    v = (v & m2) | ((v >> (np.uint64(16) - 2 * w)) & (m2 << (2 * w)))
    m4 = np.uint64((1 << (4 * width)) - 1)
    return (v & m4) | ((v >> (np.uint64(32) - 4 * w)) & (m4 << (4 * w)))


@nb.njit(inline="always")
def _unpack8(v, width):  # pragma: no cover - compiled
    """The inverse of :func:`_pack8`: the low ``8 * width`` bits of ``v`` (``width <= 7``) as
    eight ``width``-bit codes, one per byte."""
    w = np.uint64(width)
    v &= (np.uint64(1) << (np.uint64(8) * w)) - np.uint64(1)
    m4 = np.uint64((1 << (4 * width)) - 1)
    v = (v & m4) | ((v << (np.uint64(32) - 4 * w)) & (m4 << np.uint64(32)))
    m2 = np.uint64((1 << (2 * width)) - 1) * np.uint64(0x0000000100000001)
    v = (v & m2) | ((v << (np.uint64(16) - 2 * w)) & (m2 << np.uint64(16)))
    m1 = np.uint64((1 << width) - 1) * np.uint64(0x0001000100010001)
    return (v & m1) | ((v << (np.uint64(8) - w)) & (m1 << np.uint64(8)))


@nb.njit(forceinline=True)
def _pack_codes8(cs, n, width, out, pos, end, carry, nacc):  # pragma: no cover - compiled
    """Append ``n`` codes of ``width <= 8`` bits (``cs``: uint8) to ``out`` at byte ``pos``,
    LSB-first, after ``nacc < 8`` pending bits held in ``carry``; never writes at or past ``end``.
    Returns ``(pos, carry, nacc)``.

    Byte-aligned 2/4/8-bit runs take vectorised loops; otherwise groups of 8 codes (``width``
    whole bytes) are packed into 64-bit words by a vectorised pass (in place: ``cs`` is
    overwritten) and written with one unaligned 8-byte store each (the bytes past the group
    are rewritten by the next group), so any width and any alignment run at one store per 8
    codes.
    """
    if nacc == 0 and (width == 8 or width == 4 or width == 2) and n % (8 // width) == 0:
        per = 8 // width
        ob = out[pos : pos + n // per]
        if width == 8:
            for t in range(ob.shape[0]):
                ob[t] = cs[t]
        elif width == 4:
            for t in range(ob.shape[0]):
                ob[t] = cs[2 * t] | (cs[2 * t + 1] << 4)
        else:
            for t in range(ob.shape[0]):
                ob[t] = cs[4 * t] | (cs[4 * t + 1] << 2) | (cs[4 * t + 2] << 4) | (cs[4 * t + 3] << 6)
        return pos + n // per, carry, nacc
    t = 0
    sh = np.uint64(nacc)
    top = np.uint64(8 * width - 1)  # carry = acc >> (8 width), as two shifts: 64 is not a valid count
    if end - pos >= 8:
        groups = min(n // 8, (end - pos - 8) // width + 1)  # groups whose 8-byte store fits
        for g in range(groups):  # vectorised: each group of 8 codes packed in place
            _store_u64(cs, 8 * g, _pack8(_load_u64(cs, 8 * g), width))
        for g in range(groups):  # carry: the bits past 8 width; those of ``carry`` (< 2^sh) never reach them
            v = _load_u64(cs, 8 * g) << sh
            _store_u64(out, pos + width * g, carry | v)
            carry = (v >> top) >> np.uint64(1)
        pos += width * groups
        t = 8 * groups
    for k in range(t, n):  # the tail, code by code
        carry |= np.uint64(cs[k]) << np.uint64(nacc)
        nacc += width
        while nacc >= 8:
            out[pos] = np.uint8(carry & np.uint64(0xFF))
            pos += 1
            carry >>= np.uint64(8)
            nacc -= 8
    return pos, carry, nacc


#: Codes of at most this many bits are dequantized by a branch-free tree of integer bit-selects
#: among the bucket's scaled levels (:func:`_tree_value`; vectorised, ~0.25 ns a code); wider
#: codes look their value up in ``slv`` (LLVM keeps those loads scalar: ~1.3 ns a code).
TREE_MAX_BITS = 5


@nb.njit(nogil=True, cache=True)
def tree_levels(slv, bad, width):  # pragma: no cover - compiled
    """``(mags, lim)`` for the tree decoder: ``mags`` (float32, 16) holds ``l_j = slv[2 j]`` for
    ``2 j < lim`` (then 0); a code ``c`` is invalid iff ``c == 1`` or ``c >= lim``, and
    ``slv[c]`` is ``mags[c >> 1]`` with its sign bit flipped iff ``c`` is odd.  ``lim = 0`` when
    the width is over :data:`TREE_MAX_BITS` or the tables do not have that form (then the
    decoders use the tables: any ``slv`` / ``bad`` decodes as before)."""
    mags = np.zeros(16, dtype=np.float32)
    nc = 1 << width
    if width > TREE_MAX_BITS or slv.shape[0] < nc or bad.shape[0] < nc:
        return mags, 0
    lim = nc
    while lim > 2 and bad[lim - 1] != 0 and bad[lim - 2] != 0:
        lim -= 2
    sb = slv.view(np.int32)
    for c in range(nc):
        invalid = c == 1 or c >= lim
        if (bad[c] != 0) != invalid:
            return mags, 0
        if not invalid and sb[c] != np.int32(sb[c & ~1] ^ ((c & 1) << 31)):
            return mags, 0
    for j in range(lim // 2):
        mags[j] = slv[2 * j]
    return mags, lim


@nb.njit(forceinline=True)
def _pick(m, a, b):  # pragma: no cover - compiled
    """``b`` where the all-ones mask ``m`` is set, else ``a`` (integer bit patterns)."""
    return a ^ ((a ^ b) & m)


@nb.njit(inline="always")
def _scaled(nrm, mags, k):  # pragma: no cover - compiled
    """The float32 bits of ``nrm * l_k``: the value of code ``2 k`` (``-`` that for ``2 k + 1``)."""
    return np.float32(nrm * mags[k]).view(np.int32)


@nb.njit(forceinline=True)
def _scaled_levels(nrm, mags):  # pragma: no cover - compiled
    """The 16 scaled levels of a bucket, as a tuple (registers in the decode loop)."""
    return (
        _scaled(nrm, mags, 0), _scaled(nrm, mags, 1), _scaled(nrm, mags, 2), _scaled(nrm, mags, 3),
        _scaled(nrm, mags, 4), _scaled(nrm, mags, 5), _scaled(nrm, mags, 6), _scaled(nrm, mags, 7),
        _scaled(nrm, mags, 8), _scaled(nrm, mags, 9), _scaled(nrm, mags, 10), _scaled(nrm, mags, 11),
        _scaled(nrm, mags, 12), _scaled(nrm, mags, 13), _scaled(nrm, mags, 14), _scaled(nrm, mags, 15),
    )  # fmt: skip


@nb.njit(forceinline=True)
def _tree_value(c, K, m):  # pragma: no cover - compiled
    """``float32(nrm * slv[c])`` for a valid code ``c`` of ``K = 2^(width - 1)`` magnitudes (a
    constant), from the scaled levels ``m`` (:func:`_scaled_levels`): the bits of ``nrm * l_j``
    picked by the bits of ``j = c >> 1`` (a binary tree of ``K - 1`` bit-selects), the sign bit
    flipped for odd ``c``.  Exact: ``nrm * (-l) == -(nrm * l)`` in IEEE arithmetic."""
    one = np.int32(1)
    s0 = -((c >> one) & one)
    if K == 2:
        v = _pick(s0, m[0], m[1])
    else:
        s1 = -((c >> np.int32(2)) & one)
        q0 = _pick(s1, _pick(s0, m[0], m[1]), _pick(s0, m[2], m[3]))
        if K == 4:
            v = q0
        else:
            s2 = -((c >> np.int32(3)) & one)
            q1 = _pick(s1, _pick(s0, m[4], m[5]), _pick(s0, m[6], m[7]))
            o0 = _pick(s2, q0, q1)
            if K == 8:
                v = o0
            else:
                q2 = _pick(s1, _pick(s0, m[8], m[9]), _pick(s0, m[10], m[11]))
                q3 = _pick(s1, _pick(s0, m[12], m[13]), _pick(s0, m[14], m[15]))
                v = _pick(-((c >> np.int32(4)) & one), o0, _pick(s2, q2, q3))
    return np.int32(v ^ ((c & one) << np.int32(31))).view(np.float32)


@nb.njit(inline="always")
def _invalid(c, lim):  # pragma: no cover - compiled
    """1 if the code ``c`` is invalid (see :func:`tree_levels`), else 0: no table look-up."""
    return np.int32(c == 1) | np.int32(c >= lim)


@nb.njit(inline="always")
def _read_code(data, pos, nacc, width):  # pragma: no cover - compiled
    """One ``width``-bit code LSB-first from byte ``pos`` after ``nacc`` consumed bits, bit by
    bit across byte boundaries (the tails of the unpackers); returns ``(code, pos, nacc)`` (the code an int32)."""
    c = np.int32(0)
    for b in range(width):
        bit = (np.int32(data[pos]) >> nacc) & 1
        c |= bit << b
        nacc += 1
        if nacc == 8:
            nacc = 0
            pos += 1
    return np.int32(c), pos, nacc


@nb.njit(inline="always")
def _unpack_tree(data, pos, nacc, n, width, K, lim, m, ob, cb, accumulate):  # pragma: no cover - compiled
    """Dequantize ``n`` codes of ``width <= TREE_MAX_BITS`` bits (``K = 2^(width - 1)``, a
    constant) from byte ``pos`` (after ``nacc`` consumed bits) into ``ob``: values by
    :func:`_tree_value`, validity by :func:`_invalid`, OR-reduced into one flag that the caller
    checks once per bucket.  Byte-aligned 2/4-bit runs take a vectorised loop over bytes;
    otherwise one unaligned 8-byte load yields 8 codes, spread to bytes in ``cb`` (>= ``n``
    bytes, rounded up to 8) and decoded by a vectorised loop.  Returns ``(pos, nacc, flag)``."""
    flag = np.int32(0)
    if nacc == 0 and (width == 4 or width == 2) and n % (8 // width) == 0:
        per = 8 // width
        mask = np.int32((1 << width) - 1)
        db = data[pos : pos + n // per]
        for t in range(db.shape[0]):
            byte = np.int32(db[t])
            for k in range(per):
                c = np.int32((byte >> np.int32(width * k)) & mask)
                flag |= _invalid(c, lim)
                _emit(ob, per * t + k, _tree_value(c, K, m), accumulate)
        return pos + n // per, nacc, flag
    t = 0
    sh = np.uint64(nacc)
    end = data.shape[0]
    if end - pos >= 8:
        groups = min(n // 8, (end - pos - 8) // width + 1)  # groups whose 8-byte load fits
        for g in range(groups):  # 8 codes per load, spread to one byte each
            _store_u64(cb, 8 * g, _unpack8(_load_u64(data, pos + width * g) >> sh, width))
        for i in range(8 * groups):  # vectorised
            c = np.int32(cb[i])
            flag |= _invalid(c, lim)
            _emit(ob, i, _tree_value(c, K, m), accumulate)
        pos += width * groups
        t = 8 * groups
    for k in range(t, n):  # the tail, code by code
        c, pos, nacc = _read_code(data, pos, nacc, width)
        flag |= _invalid(c, lim)
        _emit(ob, k, _tree_value(c, K, m), accumulate)
    return pos, nacc, flag


@nb.njit(forceinline=True)
def _unpack_codes8(data, pos, nacc, a, n, width, bad, nrm, slv, out, accumulate):  # pragma: no cover
    """Dequantize ``n`` codes of ``width <= 8`` bits from byte ``pos`` (after ``nacc`` consumed
    bits) into ``out[a : a + n]`` (``+=`` if ``accumulate``).  Returns ``(pos, nacc, bad)``:
    ``bad`` is non-zero when a code is invalid (the caller locates it; the bucket may be written).

    By the tables ``slv`` / ``bad`` (the tree decoder, :func:`_unpack_tree_buckets`, takes the
    level sets :func:`tree_levels` accepts).  Mirrors
    :func:`_pack_codes8`: byte-aligned 2/4/8-bit runs are vectorised loops; otherwise one
    unaligned 8-byte load yields 8 codes (never reading past ``data``).
    """
    ob = out[a : a + n]
    flag = 0
    if nacc == 0 and (width == 8 or width == 4 or width == 2) and n % (8 // width) == 0:
        per = 8 // width
        db = data[pos : pos + n // per]
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
        else:
            for t in range(db.shape[0]):
                for k in range(4):
                    c = (db[t] >> (2 * k)) & 3
                    flag |= bad[c]
                    _emit(ob, 4 * t + k, nrm * slv[c], accumulate)
        return pos + n // per, nacc, flag
    mask = np.uint64((1 << width) - 1)
    t = 0
    sh = np.uint64(nacc)
    end = data.shape[0]
    while t + 8 <= n and pos + 8 <= end:
        v = _load_u64(data, pos) >> sh
        for k in range(8):
            c = np.int64((v >> np.uint64(width * k)) & mask)
            flag |= bad[c]
            _emit(ob, t + k, nrm * slv[c], accumulate)
        pos += width
        t += 8
    for k in range(t, n):  # the tail, code by code
        c, pos, nacc = _read_code(data, pos, nacc, width)
        flag |= bad[c]
        _emit(ob, k, nrm * slv[c], accumulate)
    return pos, nacc, flag


@nb.njit(inline="always")
def _first_invalid(data, bitpos, a, n, width, bad):  # pragma: no cover - compiled
    """Index (from ``a``) of the first invalid code of ``n`` codes starting at bit ``bitpos``."""
    for k in range(n):
        c = np.int32(0)
        for b in range(width):
            q = bitpos + k * width + b
            c |= ((np.int32(data[q >> 3]) >> (q & 7)) & 1) << b
        if bad[c]:
            return a + k
    return -1


@nb.njit(nogil=True, cache=True)
def quantize_pack(
    x, starts, lv, inv_width, table, shift, one_step, intervals, norm_kind, k1, k2, width, norms, out, scratch
):  # pragma: no cover
    """Fused quantize + fixed-width packing (LSB-first) of ``width``-bit codes into ``out``.

    ``out`` must hold ``ceil(numel * width / 8)`` bytes.  Returns ``(status, bucket)``.
    Per bucket: the norm pass, one code pass into an L1-resident code buffer, one packing
    pass (:func:`_pack_codes8`; codes over 8 bits are packed code by code).
    """
    xi = x.view(np.int32)
    sel = select_rows(lv, inv_width)
    cs8 = np.empty(scratch.shape[1], dtype=np.uint8)
    cs16 = np.empty(scratch.shape[1] if width > 8 else 0, dtype=np.uint16)
    carry = np.uint64(0)
    nacc = np.int64(0)  # typed int64, not the literal 0: one compiled _pack_codes8
    pos = 0
    end = out.shape[0]
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        xb = x[a:e]
        xib = xi[a:e]
        st, nrm = _bucket_norm(xb, xib, norm_kind)
        if st != OK:
            return st, b
        norms[b] = nrm
        if width <= 8:
            _codes_into(xb, xib, a, nrm, lv, inv_width, table, shift, one_step, intervals, sel, k1, k2, cs8, scratch)
            pos, carry, nacc = _pack_codes8(cs8, e - a, width, out, pos, end, carry, nacc)
            continue
        _codes_into(xb, xib, a, nrm, lv, inv_width, table, shift, one_step, intervals, sel, k1, k2, cs16, scratch)
        for t in range(e - a):
            carry |= np.uint64(cs16[t]) << np.uint64(nacc)
            nacc += width
            while nacc >= 8:
                out[pos] = np.uint8(carry & np.uint64(0xFF))
                pos += 1
                carry >>= np.uint64(8)
                nacc -= 8
    if nacc > 0:
        out[pos] = np.uint8(carry & np.uint64(0xFF))
    return OK, -1


@nb.njit(inline="always")
def _emit(out, i, v, accumulate):  # pragma: no cover - compiled
    if accumulate:
        out[i] += v
    else:
        out[i] = v


@nb.njit(nogil=True)
def _unpack_tree_buckets(data, starts, norms, bad, mags, lim, width, K, out, accumulate):  # pragma: no cover
    """:func:`unpack_dequantize` by :func:`_unpack_tree` (constant ``width``, ``K``, mode); codes
    from byte 0 of ``data``.  Returns ``(status, index)`` as :func:`unpack_dequantize`."""
    longest = 0
    for b in range(starts.shape[0] - 1):
        longest = max(longest, starts[b + 1] - starts[b])
    cb = np.empty(longest + 8, dtype=np.uint8)  # codes spread to bytes (widths 3 and 5)
    pos = 0
    nacc = 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        bitpos = 8 * pos + nacc
        m = _scaled_levels(norms[b], mags)
        pos, nacc, flag = _unpack_tree(data, pos, nacc, e - a, width, K, lim, m, out[a:e], cb, accumulate)
        if flag:
            return ERR_BAD_CODE, _first_invalid(data, bitpos, a, e - a, width, bad)
    if nacc > 0 and (np.int32(data[pos]) >> nacc) != 0:
        return ERR_BAD_PADDING, -1
    return OK, -1


@nb.njit(forceinline=True)
def _unpack_tree_segment(data, starts, norms, bad, mags, lim, width, out, accumulate):  # pragma: no cover
    """:func:`_unpack_tree_buckets` for a runtime ``width`` in 2..5 (``lim > 0``, see
    :func:`tree_levels`): one instantiation per constant width.  ``accumulate`` is a compile-time
    constant of the calling kernel (see :func:`_per_mode`), so only its mode is compiled."""
    if width == 2:
        return _unpack_tree_buckets(data, starts, norms, bad, mags, lim, 2, 2, out, accumulate)
    if width == 3:
        return _unpack_tree_buckets(data, starts, norms, bad, mags, lim, 3, 4, out, accumulate)
    if width == 4:
        return _unpack_tree_buckets(data, starts, norms, bad, mags, lim, 4, 8, out, accumulate)
    return _unpack_tree_buckets(data, starts, norms, bad, mags, lim, 5, 16, out, accumulate)


def _per_mode(make):  # type: ignore[no-untyped-def]
    """``(make(False), make(True))``: a kernel compiled separately (and lazily) per decoding mode.

    Numba types every branch of a kernel, so a runtime ``accumulate`` compiled both modes of
    every decoder; a closure constant compiles one (both are cached on disk, keyed by it)."""
    return make(False), make(True)


def _unpack_dequantize_kernel(accumulate: bool):  # type: ignore[no-untyped-def]
    @nb.njit(nogil=True, cache=True)
    def unpack_dequantize_mode(data, starts, norms, slv, bad, width, out, codes, want_codes):  # pragma: no cover
        if want_codes or width > 8:
            return _unpack_code_by_code(data, starts, norms, slv, bad, width, out, accumulate, codes, want_codes)
        mags, lim = tree_levels(slv, bad, width)
        if lim > 0:  # widths 2-5: one loop over buckets, no per-bucket dispatch
            return _unpack_tree_segment(data, starts, norms, bad, mags, lim, width, out, accumulate)
        pos = 0
        nacc = np.int64(0)  # not the literal 0: one compiled _unpack_codes8
        for b in range(starts.shape[0] - 1):
            a = starts[b]
            e = starts[b + 1]
            bitpos = 8 * pos + nacc
            pos, nacc, flag = _unpack_codes8(data, pos, nacc, a, e - a, width, bad, norms[b], slv, out, accumulate)
            if flag:
                return ERR_BAD_CODE, _first_invalid(data, bitpos, a, e - a, width, bad)
        if nacc > 0 and (np.int32(data[pos]) >> nacc) != 0:
            return ERR_BAD_PADDING, -1
        return OK, -1

    return unpack_dequantize_mode


_UNPACK_DEQUANTIZE = _per_mode(_unpack_dequantize_kernel)


def unpack_dequantize(data, starts, norms, slv, bad, width, out, accumulate, codes, want_codes):  # type: ignore[no-untyped-def]
    """Fused unpacking + dequantization (+ accumulation into ``out``).

    ``slv``/``bad`` come from :func:`signed_level_table`.  ``data`` must hold exactly
    ``ceil(numel * width / 8)`` bytes (checked by the caller).  Returns ``(status, index)``:
    an invalid code (outside the level set, or a negative zero) or non-zero padding is
    reported; the bucket holding an invalid code may already have been written.
    With ``want_codes`` the codes are also written to ``codes`` (int32).
    """
    return _UNPACK_DEQUANTIZE[bool(accumulate)](data, starts, norms, slv, bad, width, out, codes, want_codes)


@nb.njit(nogil=True, cache=True)
def _unpack_code_by_code(data, starts, norms, slv, bad, width, out, accumulate, codes, want_codes):  # pragma: no cover
    """:func:`unpack_dequantize` one code at a time (codes wanted, or wider than 8 bits)."""
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
