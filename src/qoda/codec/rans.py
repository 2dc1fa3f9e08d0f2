"""Static rANS entropy coder for level codes (64-bit state, 32-bit words).

Why rANS, and why hand-written: the code alphabet is small (``2 (s + 2)`` codes) and very
skewed on gradients (most mass on the first levels), where Huffman pays up to one bit per
symbol over the entropy (a 2-bit quantizer has entropy well below 1 bit) and Elias codes
assume a fixed geometric shape.  rANS gets within ``log2(M / (M - A)) + log2(1 + 2^-17)``
bits per symbol of the empirical entropy (see :func:`code_length_bound`) and decodes with one
table look-up per symbol.  The one maintained Python rANS library (``constriction``) codes
through per-call model objects and offers no fused decode-and-accumulate; this coder is
~60 lines of numba and shares the kernels' error-status convention.

Parameters: precision ``M = 2^14``, state ``x`` in ``[L, 2^63)`` with ``L = 2^31``, renormalising
32 bits at a time (at most one word per symbol).  Frequencies are normalised so that every
present code has ``f_k >= 1 + floor(n_k (M - P) / n)`` (``P`` = number of present codes).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

PREC = 14
M = 1 << PREC
L = 1 << 31
OK = 0
ERR_TRUNCATED = 10
ERR_STATE = 11


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


def code_length_bound(counts: np.ndarray) -> float:
    """Upper bound on the coded words+state bits for codes with these counts (exact, not expected).

    ``sum_k n_k log2(M / f_k) + n log2(1 + 2^-17) + 64 (state) + 32 (last word)``; each step
    multiplies the state by at most ``(M / f)(1 + f / x)`` with ``x >= 2^17 f``.
    """
    freq = normalize_frequencies(counts)
    n = int(counts.sum())
    body = sum(int(c) * math.log2(M / int(f)) for c, f in zip(counts, freq, strict=True) if c > 0)
    return body + n * math.log2(1.0 + 2.0**-17) + 96.0


@nb.njit(nogil=True, cache=True)
def encode(codes, freq, cum, out):  # pragma: no cover - compiled
    """Encode ``codes`` (in reverse); words are written backwards into ``out``.

    Returns ``(first word index, final state)``: the stream is ``out[first:]``.
    ``out`` needs ``len(codes) + 1`` words.
    """
    x = np.int64(L)
    w = out.shape[0]
    for i in range(codes.shape[0] - 1, -1, -1):
        s = codes[i]
        f = freq[s]
        # Renormalise when x >= ((L >> PREC) << 32) f, compared in units of 2^32: the product
        # itself is 2^63 when one code holds the whole mass (f = M) and overflows int64.
        if (x >> 32) >= (L >> PREC) * f:
            w -= 1
            out[w] = x & 0xFFFFFFFF
            x >>= 32
        x = ((x // f) << PREC) + (x % f) + cum[s]
    return w, x


@nb.njit(nogil=True, cache=True)
def decode(words, state, freq, cum, slot_code, codes):  # pragma: no cover - compiled
    """Decode ``codes.shape[0]`` codes; returns a status (stream fully consumed, state back at L)."""
    x = np.int64(state)
    pos = 0
    nw = words.shape[0]
    for i in range(codes.shape[0]):
        slot = x & (M - 1)
        s = slot_code[slot]
        x = freq[s] * (x >> PREC) + slot - cum[s]
        if x < L:
            if pos >= nw:
                return ERR_TRUNCATED
            x = (x << 32) | np.int64(words[pos])
            pos += 1
        codes[i] = s
    if x != L or pos != nw:
        return ERR_STATE
    return OK


def tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative frequencies and the slot -> code table of a normalised frequency vector."""
    cum = np.zeros(freq.size, dtype=np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    slot_code = np.repeat(np.arange(freq.size, dtype=np.int32), freq)
    return cum, slot_code
