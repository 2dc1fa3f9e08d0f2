"""Device-agnostic quantization in eager torch: the CUDA path and the test oracle.

Evaluates exactly the float32 operations of :mod:`qoda.quant.kernels.cpu` (same hash, same
``u``, ``p`` and comparison), so codes agree bit for bit with the numba kernel on the CPU.
It materialises several full-size temporaries, which is why the CPU uses the fused kernel.
"""

from __future__ import annotations

import torch

from qoda.quant.rng import uniforms_torch

#: See :data:`qoda.quant.kernels.cpu.TINY_NORM`.
TINY_NORM = 2.0**-126
TINY_SCALE = 2.0**64


def bucket_ids(starts: torch.Tensor) -> torch.Tensor:
    """Bucket index of every coordinate, from the bucket start offsets."""
    lengths = starts[1:] - starts[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths), device=starts.device), lengths)


def bucket_norms(x: torch.Tensor, bucket: torch.Tensor, n_buckets: int, linf: bool) -> torch.Tensor:
    """Per-bucket ``||v||_2`` (accumulated in float64) or ``||v||_inf``, as float32."""
    if linf:
        out = torch.zeros(n_buckets, dtype=torch.float32, device=x.device)
        return out.scatter_reduce_(0, bucket, x.abs(), reduce="amax", include_self=True)
    sq = torch.zeros(n_buckets, dtype=torch.float64, device=x.device)
    sq.index_add_(0, bucket, x.double().square())
    return sq.sqrt().float()


def quantize_codes(
    x: torch.Tensor,
    starts: torch.Tensor,
    levels: torch.Tensor,
    inv_width: torch.Tensor,
    intervals: int,
    linf: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, ``(j << 1) | sign``) and float32 norms of a flat float32 tensor.

    ``intervals = s + 1`` selects QSGD's arithmetic form for uniform levels (as the CPU kernel).
    """
    bucket = bucket_ids(starts)
    norms = bucket_norms(x, bucket, len(starts) - 1, linf)
    # Tiny (subnormal) norms: scale by 2^64 first, exactly as the CPU kernel (its TINY_NORM).
    scale = torch.where(norms < TINY_NORM, TINY_SCALE, 1.0).to(torch.float32)
    inv = torch.where(norms > 0, 1.0 / (norms * scale), torch.zeros_like(norms))
    u = ((x.abs() * scale[bucket]) * inv[bucket]).clamp_max(1.0)
    if intervals > 0:
        t = u * float(intervals)
        j = t.to(torch.int64).clamp_(max=intervals - 1)
        p = t - j.to(torch.float32)
    else:
        j = (torch.searchsorted(levels, u, right=True) - 1).clamp_(0, len(levels) - 1)
        p = (u - levels[j]) * inv_width[j]
    j = j + (uniforms_torch(x.numel(), seed, x.device) < p).to(torch.int64)
    codes = (j << 1) | ((x < 0) & (j > 0)).to(torch.int64)
    return codes, norms


def dequantize_codes(
    codes: torch.Tensor, starts: torch.Tensor, norms: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """``float32(norm * l_j)`` with the code's sign, per coordinate."""
    codes = codes.to(torch.int64)
    v = norms[bucket_ids(starts)] * levels[codes >> 1]
    return torch.where((codes & 1).bool(), -v, v)
