"""Code-length accounting and bounds for both codings (docs/method.md section 2.2).

Fixed width is exact: ``header + 64 n_layers + 32 n_buckets + n * code_bits`` (plus at most
7 padding bits).  For the rANS coding, with ``p_bar`` the expected code distribution given
``x`` (each coordinate lands on ``l_j`` or ``l_{j+1}`` with known probabilities) and ``P`` the
number of codes that can occur, Jensen's inequality on the concave empirical entropy gives

    E[bits] <= header + 64 n_layers + 32 n_buckets + 16 * 2(s+2) + 64 S
               + n * (H(p_bar) + log2(M / (M - P)) + log2(1 + 2^-17)),

with ``S = rans.num_states(n)`` final 64-bit states of the interleaved coder (the words take
less than the coding steps' growth: :func:`qoda.codec.rans.code_length_bound`).
"""

from __future__ import annotations

import math

import torch

from qoda.codec import rans
from qoda.codec.format import HEADER_SIZE
from qoda.quant.config import QuantizerConfig
from qoda.quant.quantizer import TensorOrTensors, bucket_starts, flatten_float32
from qoda.quant.variance import level_intervals, normalized_magnitudes


def overhead_bits(n_layers: int, n_buckets: int) -> int:
    """Header, layer sizes and bucket norms."""
    return 8 * HEADER_SIZE + 64 * n_layers + 32 * n_buckets


def fixed_code_length(numels: list[int] | tuple[int, ...], config: QuantizerConfig) -> int:
    """Exact bits of a fixed-width segment (without the final byte's padding)."""
    n_buckets = len(bucket_starts(numels, config.bucket_size)) - 1
    return overhead_bits(len(numels), n_buckets) + sum(numels) * config.bits


def expected_code_distribution(x: TensorOrTensors, config: QuantizerConfig) -> torch.Tensor:
    """``p_bar[c]``: expected fraction of coordinates with code ``c`` given ``x`` (float64)."""
    v, _, u = (t.cpu() for t in normalized_magnitudes(x, config))
    levels, j = level_intervals(u, config.levels)
    p_up = (u - levels[j]) / (levels[j + 1] - levels[j])
    neg = (v < 0).long()
    alphabet = 2 * config.levels.num_levels
    dist = torch.zeros(alphabet, dtype=torch.float64)
    for jj, w in ((j, 1 - p_up), (j + 1, p_up)):
        code = (jj << 1) | (neg * (jj > 0).long())
        dist.index_add_(0, code, w)
    return dist / max(1, v.numel())


def entropy_code_length_bound(x: TensorOrTensors, config: QuantizerConfig) -> float:
    """Upper bound on the expected bits of an entropy-coded segment of ``x``."""
    flat, numels, _ = flatten_float32(x)
    n = flat.numel()
    n_buckets = len(bucket_starts(numels, config.bucket_size)) - 1
    dist = expected_code_distribution(x, config)
    nz = dist[dist > 0]
    h = float(-(nz * nz.log2()).sum())
    p = int((dist > 0).sum())
    table = 16 * 2 * config.levels.num_levels
    per_symbol = h + math.log2(rans.M / (rans.M - p)) + math.log2(1 + 2.0**-17)
    return overhead_bits(len(numels), n_buckets) + table + 64 * rans.num_states(n) + n * per_symbol
