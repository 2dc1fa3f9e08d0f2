"""Static rANS entropy coder for level codes: 4 interleaved 64-bit states, 32-bit words.

Why rANS, and why hand-written: the code alphabet is small (``2 (s + 2)`` codes) and very
skewed on gradients (most mass on the first levels), where Huffman pays up to one bit per
symbol over the entropy (a 4-bit QSGD quantizer has entropy ~0.85 bit) and Elias codes assume a
fixed geometric shape.  rANS gets within ``log2(M / (M - P)) + log2(1 + 2^-17)`` bits per symbol
of the empirical entropy (see :func:`code_length_bound`).  ``constriction`` (the maintained
Python rANS library, Rust) was measured on the same codes and frequencies
(:mod:`qoda.bench.entropy`, 16M 4-bit codes): same size, but 2.5x slower to encode and 8x slower
to decode than this coder, with the codes in a separate array and no fused
dequantize-and-accumulate; this one also shares the kernels' error-status convention.

Parameters: precision ``M = 2^14``, states ``x`` in ``[L, 2^63)`` with ``L = 2^31``, renormalising
32 bits at a time (at most one word per symbol).  Frequencies are normalised so that every
present code has ``f_k >= 1 + floor(n_k (M - P) / n)`` (``P`` = number of present codes).

Layout (measured: docs/quantization.md, "Codec throughput"): symbol ``i`` is coded by state ``i mod 4``; all
states share one word stream, in the order the decoder reads it (symbol order).  A single rANS
state is a serial chain (table load -> multiply -> add -> compare -> word load, ~15 cycles per
symbol); four independent chains in registers let the core overlap them (~3x on decode, same
table).  More lanes (8, 16, 32, 64, held in registers or in an array) measured no faster: past
four the loop is bound by instruction throughput, not latency; and each lane costs 8 bytes of
final state.  AVX-512 lanes (a masked expand-load for the renormalisation words) would need
hand-written LLVM IR; the scalar coder already meets its target.  Other choices, each measured:

* encode divides by ``f`` with an exact reciprocal: ``q = floor(x / f) = mulhi64(x, r_f) >>
  (l_f - 1)`` with ``l_f = ceil(log2 f)``, ``r_f = ceil(2^(63 + l_f) / f) < 2^64``
  (Granlund-Montgomery: exact for all ``x < 2^63`` since ``r_f f - 2^(63 + l_f) < 2^l_f``), and
  ``C(x) = x + c_f + q (M - f)``; ``f = 1`` uses ``r = 2^64 - 1`` (``q = x - 1``) and folds the
  missing ``M - 1`` into the bias.  The 64-bit divide was the single-state coder's bottleneck
  (4.5x with one state, before interleaving).
* words are written without a branch (store, then move the pointer by the flag), so the encode
  speed does not depend on the entropy: 10% slower than a branch on 4-bit codes (a word every
  ~40 symbols per lane), 20% faster on 8-bit codes (one every ~8, mispredicted);
* decode looks up ``slot -> code`` in a byte table (16 KiB at ``M = 2^14``, L1-resident; the
  merged 8-byte slot table was 128 KiB and 25% slower), then ``freq | cum << 16`` per code;
* decode is fused with dequantization and accumulation (``out[i] += norm_b * level(code)``):
  no code array round trip through memory.

Stream: ``K = max(1, min(4, n))`` final states (u64; the empty stream carries one), then the
words.  Decoding ends with every state back at ``L`` and every word consumed, which detects
truncated and most corrupted streams; kernels never read outside their arrays.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

PREC = 14
M = 1 << PREC
L = 1 << 31
LANES = 4
OK = 0
ERR_TRUNCATED = 10  # the stream ends before the last symbol is decoded
ERR_STATE = 11  # a state does not end at L, a word is left over, or an initial state is out of range
_MASK = M - 1
_LO32 = 0xFFFFFFFF
_ROW = 8  # int64 fields per code in the encoder table (one cache line)


def num_states(n: int) -> int:
    """Final states carried by a stream of ``n`` symbols: one per lane used, at least one."""
    return max(1, min(LANES, n))


def normalize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to ``M`` with ``f_k >= 1 + floor(n_k (M - P) / n)`` for present codes."""
    counts = counts.astype(np.int64)
    n = int(counts.sum())
    freq = np.zeros(counts.size, dtype=np.int64)
    if n == 0:
        return freq
    present = counts > 0
    p = int(present.sum())
    if p > M:
        raise ValueError(f"rans: {p} distinct codes exceed the precision M = {M}")
    freq[present] = 1 + (counts[present] * (M - p)) // n
    freq[int(np.argmax(counts))] += M - int(freq.sum())
    return freq


def _symbol_bits(counts: np.ndarray, freq: np.ndarray) -> float:
    """``sum_k n_k (log2(M / f_k) + log2(1 + 2^-17))``: the bound on the coding steps' growth."""
    n = int(counts.sum())
    body = math.fsum(int(counts[k]) * math.log2(M / int(freq[k])) for k in np.flatnonzero(counts))
    return body + n * math.log2(1.0 + 2.0**-17)


def code_length_bound(counts: np.ndarray) -> float:
    """Upper bound on the bits of states + words for codes with these counts (exact, not expected).

    ``sum_k n_k log2(M / f_k) + n log2(1 + 2^-17) + 64 K`` with ``K`` = :func:`num_states`.
    Per lane, ``B = 32 (words) + log2(x)`` never grows on renormalisation (``x -> floor(x / 2^32)``
    emits 32 bits) and grows by less than ``log2(M / f) + log2(1 + f / x)`` per coding step,
    where ``C(x) <= M (floor(x / f) + 1) - 1 < (M / f)(x + f)`` and ``x >= 2^(31 - PREC) f`` after
    renormalisation, so ``f / x <= 2^-17``.  A lane starts at ``B = log2 L = 31`` and ends with
    ``x >= L``, so its words take less than its steps' growth, and its state is stored in 64 bits.
    """
    counts = np.asarray(counts)
    return _symbol_bits(counts, normalize_frequencies(counts)) + 64.0 * num_states(int(counts.sum()))


def word_capacity(counts: np.ndarray, freq: np.ndarray) -> int:
    """Length of the encoder's word buffer for these counts: the words it may emit (fewer than
    ``bound / 32`` by :func:`code_length_bound`), one more against rounding of the bound, and the
    4 words a round may touch (:func:`encode` stores before it moves its pointer)."""
    return int(_symbol_bits(counts, freq) // 32) + 1 + LANES


def encoder_table(freq: np.ndarray) -> np.ndarray:
    """Per code ``k`` one 64-byte row of int64: renormalisation limit ``2^(63 - PREC) f - 1``,
    reciprocal ``r_f`` (bits of a uint64), bias ``c_f``, ``M - f``, shift ``l_f - 1``, 3 zeros.

    Unpacked fields in cache-line rows: 15% faster to encode than bias, M - f and shift packed in one word."""
    freq = np.asarray(freq, dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.int64)
    t = np.zeros((freq.size, _ROW), dtype=np.uint64)
    for k in np.flatnonzero(freq):
        f = int(freq[k])
        if f == 1:
            rcp, shift, bias = (1 << 64) - 1, 0, int(cum[k]) + M - 1
        else:
            lg = (f - 1).bit_length()
            rcp, shift, bias = -(-(1 << (63 + lg)) // f), lg - 1, int(cum[k])
        t[k, :5] = ((L >> PREC) << 32) * f - 1, rcp, bias, M - f, shift
    return t.view(np.int64).reshape(-1)


def decoder_tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(slot -> code, freq | cum << 16 per code)`` of a frequency vector summing to ``M``."""
    freq = np.asarray(freq, dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.int64)
    slot_code = np.repeat(np.arange(freq.size), freq).astype(np.uint8 if freq.size <= 256 else np.uint16)
    return slot_code, freq | (cum << 16)


def signed_levels(levels: np.ndarray, alphabet: int) -> np.ndarray:
    """Float32 ``+-l_{k >> 1}`` per code ``k`` (sign bit ``k & 1``); ``norm * value`` is bit-identical
    to the quantizer's dequantization (IEEE multiplication is sign-symmetric)."""
    k = np.arange(alphabet)
    mag = levels[np.minimum(k >> 1, levels.size - 1)].astype(np.float32)
    return np.where(k & 1, -mag, mag).astype(np.float32)


def encode_codes(codes: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(freq, states, words)`` of int codes in ``[0, alphabet)``: the whole encoder."""
    counts = histogram(codes, alphabet)
    if counts[alphabet]:
        raise ValueError(f"rans: a code lies outside [0, {alphabet})")
    counts = counts[:alphabet]
    freq = normalize_frequencies(counts)
    words = np.empty(word_capacity(counts, freq), dtype=np.uint32)
    states = np.empty(num_states(codes.size), dtype=np.int64)
    first = encode(codes, encoder_table(freq), words, states)
    if first < 0:  # pragma: no cover - the capacity is a proven bound
        raise RuntimeError("rans: word capacity exceeded")
    return freq, states, words[first:]


# ---------------------------------------------------------------------------------- kernels
@intrinsic
def _mulhi(typingctx, a, b):  # pragma: no cover - compiled
    """High 64 bits of the unsigned 128-bit product of two int64 bit patterns (one ``mul``)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i128 = ir.IntType(128)
        x, y = (builder.zext(v, i128) for v in args)
        hi = builder.lshr(builder.mul(x, y), ir.Constant(i128, 64))
        return builder.trunc(hi, ir.IntType(64))

    return sig, codegen


@nb.njit(nogil=True, cache=True)
def histogram(codes, alphabet):  # pragma: no cover - compiled
    """Counts of each code, ``alphabet + 1`` entries: the last counts codes outside the alphabet.

    Eight sub-histograms break the load-add-store chain on runs of one code (skewed 4-bit codes:
    2.8x over four, 9x over ``np.bincount``)."""
    h = np.zeros((8, alphabet + 1), dtype=np.int64)
    top = np.uint32(alphabet)
    n8 = codes.shape[0] & ~7
    for i in range(0, n8, 8):
        for k in range(8):
            h[k, min(np.uint32(codes[i + k]), top)] += 1
    for i in range(n8, codes.shape[0]):
        h[0, min(np.uint32(codes[i]), top)] += 1
    return h.sum(axis=0)


@nb.njit(inline="always")
def _enc(x, s, tab):  # pragma: no cover - compiled
    """One encoding step of state ``x`` with code ``s``: ``(new x, emit flag, low word)``."""
    b = np.uint32(s) << np.uint32(3)  # row of _ROW = 8 fields
    f = x > tab[b]
    lo = x & _LO32
    x = x >> 32 if f else x
    q = _mulhi(x, tab[b + np.uint32(1)]) >> tab[b + np.uint32(4)]
    return x + tab[b + np.uint32(2)] + q * tab[b + np.uint32(3)], f, lo


@nb.njit(nogil=True, cache=True)
def encode(codes, tab, out, states):  # pragma: no cover - compiled
    """Encode ``codes`` (symbol ``i`` with state ``i mod 4``, last symbol first).

    ``tab`` from :func:`encoder_table`; words are written backwards into ``out``, whose length
    must be at least :func:`word_capacity` (checked per round: returns -1 rather than write
    outside ``out``); ``states`` receives the :func:`num_states` final states.  Returns the index
    of the first word: the stream is ``out[first:]``.
    """
    x0 = x1 = x2 = x3 = np.int64(L)
    w = out.shape[0]
    n = codes.shape[0]
    base = n & ~3
    r = n - base
    if w < r:
        return -1
    # the partial last round, then full rounds; each round writes at most 4 words at w-1..w-4
    if r > 2:
        x2, f, lo = _enc(x2, codes[base + 2], tab)
        out[w - 1] = lo
        w -= f
    if r > 1:
        x1, f, lo = _enc(x1, codes[base + 1], tab)
        out[w - 1] = lo
        w -= f
    if r > 0:
        x0, f, lo = _enc(x0, codes[base], tab)
        out[w - 1] = lo
        w -= f
    for j in range(base - 4, -1, -4):
        if w < 4:
            return -1
        x3, f, lo = _enc(x3, codes[j + 3], tab)
        out[w - 1] = lo
        w -= f
        x2, f, lo = _enc(x2, codes[j + 2], tab)
        out[w - 1] = lo
        w -= f
        x1, f, lo = _enc(x1, codes[j + 1], tab)
        out[w - 1] = lo
        w -= f
        x0, f, lo = _enc(x0, codes[j], tab)
        out[w - 1] = lo
        w -= f
    k = states.shape[0]
    states[0] = x0
    if k > 1:
        states[1] = x1
    if k > 2:
        states[2] = x2
    if k > 3:
        states[3] = x3
    return w


@nb.njit(inline="always")
def _dec(x, pos, words, last, slot_code, symtab):  # pragma: no cover - compiled
    """One decoding step of state ``x``: ``(new x, new pos, code)``.

    Branch-free renormalisation: the word at ``min(pos, last)`` is always loaded and used only
    if ``x < L``; a read past the end moves ``pos`` beyond the stream, reported at the end."""
    slot = x & _MASK
    s = slot_code[slot]
    e = symtab[s]
    x = (e & 0xFFFF) * (x >> PREC) + slot - (e >> 16)
    f = x < L
    wv = np.int64(words[pos if pos < last else last])
    x = (x << 32) | wv if f else x
    return x, pos + f, s


@nb.njit(inline="always")
def _dec_lane(k, x0, x1, x2, x3, pos, words, last, slot_code, symtab):  # pragma: no cover - compiled
    """One step of lane ``k`` (bucket edges that cut a round)."""
    if k == 0:
        x0, pos, s = _dec(x0, pos, words, last, slot_code, symtab)
    elif k == 1:
        x1, pos, s = _dec(x1, pos, words, last, slot_code, symtab)
    elif k == 2:
        x2, pos, s = _dec(x2, pos, words, last, slot_code, symtab)
    else:
        x3, pos, s = _dec(x3, pos, words, last, slot_code, symtab)
    return x0, x1, x2, x3, pos, s


@nb.njit(inline="always")
def _start(states, n, nwords, words):  # pragma: no cover - compiled
    """Initial lane states (``L`` for unused lanes) and a status for the stream's framing."""
    x = np.full(LANES, L, dtype=np.int64)
    ok = states.shape[0] == max(1, min(LANES, n)) and words.shape[0] >= 1 and nwords <= words.shape[0]
    for k in range(min(states.shape[0], LANES)):
        ok &= states[k] >= L
        x[k] = states[k]
    return x[0], x[1], x[2], x[3], ok


@nb.njit(inline="always")
def _finish(x0, x1, x2, x3, pos, nwords):  # pragma: no cover - compiled
    if pos > nwords:
        return ERR_TRUNCATED
    if pos != nwords or x0 != L or x1 != L or x2 != L or x3 != L:
        return ERR_STATE
    return OK


@nb.njit(nogil=True, cache=True)
def decode(words, nwords, states, slot_code, symtab, codes):  # pragma: no cover - compiled
    """Decode ``codes.shape[0]`` codes from ``words[:nwords]`` (``words`` holds at least one entry,
    a dummy for an empty stream); returns a status: stream fully consumed, every state back at L."""
    n = codes.shape[0]
    x0, x1, x2, x3, ok = _start(states, n, nwords, words)
    if not ok:
        return ERR_STATE
    last = words.shape[0] - 1
    pos = 0
    n4 = n & ~3
    for i in range(0, n4, 4):
        x0, pos, s0 = _dec(x0, pos, words, last, slot_code, symtab)
        x1, pos, s1 = _dec(x1, pos, words, last, slot_code, symtab)
        x2, pos, s2 = _dec(x2, pos, words, last, slot_code, symtab)
        x3, pos, s3 = _dec(x3, pos, words, last, slot_code, symtab)
        codes[i] = s0
        codes[i + 1] = s1
        codes[i + 2] = s2
        codes[i + 3] = s3
    for i in range(n4, n):
        x0, x1, x2, x3, pos, s = _dec_lane(i & 3, x0, x1, x2, x3, pos, words, last, slot_code, symtab)
        codes[i] = s
    return _finish(x0, x1, x2, x3, pos, nwords)


@nb.njit(nogil=True, cache=True)
def decode_dequantize(
    words, nwords, states, slot_code, symtab, slv, starts, norms, out, accumulate
):  # pragma: no cover - compiled
    """Fused decode + dequantize (+ accumulate): ``out[i] (+)= norms[b] * slv[code_i]`` for
    ``i`` in bucket ``b`` (``starts`` as for the quantizer).  Returns a status like :func:`decode`;
    ``out`` is written before the stream's end is checked."""
    n = starts[starts.shape[0] - 1]
    x0, x1, x2, x3, ok = _start(states, n, nwords, words)
    if not ok:
        return ERR_STATE
    last = words.shape[0] - 1
    pos = 0
    for b in range(starts.shape[0] - 1):
        a = starts[b]
        e = starts[b + 1]
        nrm = norms[b]
        i = a
        while i < e and (i & 3) != 0:  # finish the round the previous bucket cut
            x0, x1, x2, x3, pos, s = _dec_lane(i & 3, x0, x1, x2, x3, pos, words, last, slot_code, symtab)
            v = nrm * slv[s]
            out[i] = out[i] + v if accumulate else v
            i += 1
        ob = out[i:e]
        m4 = (e - i) & ~3
        for t in range(0, m4, 4):
            x0, pos, s0 = _dec(x0, pos, words, last, slot_code, symtab)
            x1, pos, s1 = _dec(x1, pos, words, last, slot_code, symtab)
            x2, pos, s2 = _dec(x2, pos, words, last, slot_code, symtab)
            x3, pos, s3 = _dec(x3, pos, words, last, slot_code, symtab)
            if accumulate:
                ob[t] += nrm * slv[s0]
                ob[t + 1] += nrm * slv[s1]
                ob[t + 2] += nrm * slv[s2]
                ob[t + 3] += nrm * slv[s3]
            else:
                ob[t] = nrm * slv[s0]
                ob[t + 1] = nrm * slv[s1]
                ob[t + 2] = nrm * slv[s2]
                ob[t + 3] = nrm * slv[s3]
        for j in range(i + m4, e):
            x0, x1, x2, x3, pos, s = _dec_lane(j & 3, x0, x1, x2, x3, pos, words, last, slot_code, symtab)
            v = nrm * slv[s]
            out[j] = out[j] + v if accumulate else v
    return _finish(x0, x1, x2, x3, pos, nwords)
