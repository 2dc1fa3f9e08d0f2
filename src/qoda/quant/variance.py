"""Exact quantization variance and the variance bound ``eps_Q`` (docs/method.md section 2).

Given ``x``, every coordinate of every bucket ``v`` contributes independently

    E[(Q(v)_i - v_i)^2] = ||v||_q^2 (u_i - l_j)(l_{j+1} - u_i),      l_j <= u_i <= l_{j+1},

so ``E||Q(x) - x||^2`` needs no sampling.  The bound ``E||Q(v) - v||^2 <= eps_Q ||v||_2^2``
holds for every ``v`` of dimension ``d`` (a bucket) and both norms; its proof:

* on an interval ``[a, b]`` with ``a > 0``: ``(u-a)(b-u) <= kappa u^2`` with
  ``kappa = max_j (b/a + a/b - 2) / 4`` (maximum at ``u = 2ab/(a+b)``);
* on ``[0, l_1]``: ``u (l_1 - u) <= min(l_1 u, l_1^2 / 4)``, and ``sum u_i <= sqrt(d) ||u||_2``;
* on any interval: ``(u-a)(b-u) <= w_max^2 / 4``,

giving ``eps_Q(d) = min(kappa + min(d l_1^2 / 4, l_1 sqrt(d)), d w_max^2 / 4)`` (relative to
``||u||_2^2 = ||v||_2^2 / ||v||_q^2 >= 1``).  Over buckets (and over layer types) the total is
``<= max eps_Q ||x||^2``.  For uniform levels this is the QSGD bound ``min(d/s^2, sqrt(d)/s)``
up to the additive ``kappa = 1/8``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from qoda.quant.config import Norm, QuantizerConfig
from qoda.quant.kernels.torch_ref import bucket_ids
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPlan
from qoda.quant.quantizer import TensorOrTensors, bucket_starts, flatten_float32


def normalized_magnitudes(
    x: TensorOrTensors, config: QuantizerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, ||bucket(i)||_q, u)`` per coordinate in float64, bucketed as ``config`` buckets ``x``.

    ``u_i = |v_i| / ||v||_q`` (0 in a zero bucket), the quantity every diagnostic is a function of.
    """
    flat, numels, _ = flatten_float32(x)
    v = flat.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("input contains NaN or Inf")
    starts = torch.tensor(bucket_starts(numels, config.bucket_size), device=v.device)
    bucket = bucket_ids(starts)
    norms = torch.zeros(len(starts) - 1, dtype=torch.float64, device=v.device)
    if config.norm is Norm.LINF:
        norms.scatter_reduce_(0, bucket, v.abs(), reduce="amax", include_self=True)
    else:
        norms = norms.index_add_(0, bucket, v.square()).sqrt()
    nb = norms[bucket]
    u = torch.where(nb > 0, v.abs() / torch.where(nb > 0, nb, 1.0), 0.0).clamp_max(1.0)
    return v, nb, u


def level_intervals(u: torch.Tensor, levels: LevelSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels as float64, j)`` with ``l_j <= u <= l_{j+1}`` per coordinate."""
    lv = torch.tensor(levels.values, dtype=torch.float64, device=u.device)
    return lv, (torch.searchsorted(lv, u, right=True) - 1).clamp_(0, len(lv) - 2)


def coordinate_variances(x: TensorOrTensors, config: QuantizerConfig) -> torch.Tensor:
    """Per-coordinate ``E[(Q(x)_i - x_i)^2 | x]`` in float64 (flat, segment order)."""
    _, nb, u = normalized_magnitudes(x, config)
    lv, j = level_intervals(u, config.levels)
    return nb.square() * (u - lv[j]) * (lv[j + 1] - u)


def exact_variance(x: TensorOrTensors, config: QuantizerConfig) -> float:
    """``E||Q(x) - x||^2`` given ``x``, in closed form."""
    return float(coordinate_variances(x, config).sum())


def normalized_variance(x: TensorOrTensors, config: QuantizerConfig) -> float:
    """``E||Q(x) - x||^2 / ||x||^2`` (0 for a zero input)."""
    flat, _, _ = flatten_float32(x)
    sq = float(flat.double().square().sum())
    return exact_variance(x, config) / sq if sq > 0 else 0.0


def eps_q(levels: LevelSet, d: int) -> float:
    """The variance bound ``eps_Q`` of a level set for buckets of dimension ``d``."""
    if d < 1:
        raise ValueError(f"d: bucket dimension must be >= 1, got {d}")
    lv = [float(v) for v in levels.array.astype("float64")]
    l1 = lv[1]
    kappa = max(((b / a + a / b - 2.0) / 4.0 for a, b in itertools.pairwise(lv[1:])), default=0.0)
    w_max = max(b - a for a, b in itertools.pairwise(lv))
    return min(kappa + min(d * l1 * l1 / 4.0, l1 * math.sqrt(d)), d * w_max * w_max / 4.0)


def eps_q_config(config: QuantizerConfig, numel: int | None = None) -> float:
    """``eps_Q`` of a quantizer: its bucket dimension, capped by the tensor size."""
    d = config.bucket_size if numel is None else max(1, min(config.bucket_size, numel))
    return eps_q(config.levels, d)


def plan_variance(grads: Sequence[torch.Tensor], plan: LayerPlan, normalized: bool = True) -> float:
    """Exact ``E||Q(g) - g||^2`` of the gradients ``grads`` (plan order) under ``plan``, summed over
    its types (uncompressed layers add nothing); divided by ``||g||^2`` when ``normalized``
    (0 for an all-zero gradient)."""
    var = sum(exact_variance([grads[i] for i in plan.indices(t)], plan.configs[t]) for t in plan.types)
    if not normalized:
        return var
    total = sum(float(g.detach().double().square().sum()) for g in grads)
    return var / total if total > 0 else 0.0
