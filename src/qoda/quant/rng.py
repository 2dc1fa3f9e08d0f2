"""Counter-based randomness for stochastic rounding.

Each coordinate ``i`` of a segment draws its uniform from a hash of ``(i, seed)`` rather
than from a stateful generator.  That makes quantization reproducible from an explicit
seed, independent of how the work is split into buckets or threads, and identical between
the numba CPU kernel and the torch (GPU) path, which both evaluate the same integer hash:

    h(i) = mix32(mix32((i + k1) mod 2^32) xor k2),   r_i = (h >> 8) * 2^-24  in [0, 1)

``mix32`` is the "lowbias32" integer finaliser (C. Wellons, hash-prospector).  Using 24 bits
makes ``P(r < p) = ceil(p * 2^24) / 2^24``, so each rounding probability is exact to within
``2^-24``: the quantizer's bias is at most ``2^-24 * (l_{j+1} - l_j) * ||v||`` per coordinate.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B
UNIFORM_SCALE = 1.0 / (1 << 24)


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from any integer seed (splitmix64 finaliser)."""
    if not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & MASK32, z >> 32


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic on values < 2^32: products wrap mod 2^64, the low 32 bits are exact.
    x = x ^ (x >> 16)
    x = (x * MIX_M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_M2) & MASK32
    return x ^ (x >> 16)


def uniforms_torch(n: int, seed: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """The uniforms ``r_offset .. r_{offset+n-1}`` as float32, on ``device``."""
    k1, k2 = seed_keys(seed)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    h = _mix32_torch(_mix32_torch((i + k1) & MASK32) ^ k2)
    return (h >> 8).to(torch.float32) * UNIFORM_SCALE
