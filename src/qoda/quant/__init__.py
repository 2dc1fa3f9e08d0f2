"""Pure tensor maths of unbiased stochastic quantization (no collectives, no models).

``levels`` (level families), ``config`` (one quantizer's settings), ``quantizer`` (bucketed
unbiased rounding; docs/method.md section 2), ``policy`` (parameter -> type -> settings),
``adapt`` (statistics, ALQ/AMQ level fitting, bit allocation), ``variance`` (exact variance and
the ``eps_Q`` bound), ``rng`` (the counter hash), ``kernels`` (numba CPU and torch paths).
"""

from qoda.quant.adapt import AdaptConfig, LevelAdapter, MagnitudeStats, RefitSchedule, allocate_bits, fit_alq, fit_amq
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan, LayerPolicy
from qoda.quant.quantizer import NonFiniteError, QuantizedTensor, quantize
from qoda.quant.variance import eps_q, eps_q_config, exact_variance, normalized_variance

__all__ = [
    "AdaptConfig", "Coding", "LayerEntry", "LayerPlan", "LayerPolicy", "LevelAdapter", "LevelSet",
    "MagnitudeStats", "NonFiniteError", "Norm", "QuantizedTensor", "QuantizerConfig", "RefitSchedule",
    "allocate_bits", "eps_q", "eps_q_config", "exact_variance", "fit_alq", "fit_amq", "normalized_variance",
    "quantize",
]  # fmt: skip
