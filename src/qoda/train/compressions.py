"""The trainer's ``--compression`` choices: a registry of frozen specs (timm-style).

Every place that needs to know something about a compression (config validation, the averager
builder in :mod:`qoda.train.compression`, the CLI help, the bits on the wire that the trainer
reports and the benchmarks record) reads it here; nobody keeps a list of names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Transport(StrEnum):
    """How the joint operator crosses the network."""

    FP32 = "fp32"  # all-reduce in float32
    FP16 = "fp16"  # all-reduce in float16 (scaled by 1/K before the cast)
    POWERSGD = "powersgd"  # PyTorch's PowerSGD hook (low rank, error feedback)
    QUANTIZED = "quantized"  # qoda's layer-wise codec (allgather or two-phase)


@dataclass(frozen=True)
class CompressionSpec:
    """One ``--compression`` choice.

    ``levels``: the quantizer's level family (``uniform`` = QSGD, ``exponential`` = NUQSGD,
    ``fitted`` = ALQ levels re-fitted on a schedule), ``None`` for the unquantized transports.
    ``layerwise``: one level set per layer type (``--layer-types``) instead of one for all.
    """

    name: str
    transport: Transport
    help: str
    levels: str | None = None
    layerwise: bool = False

    @property
    def quantized(self) -> bool:
        return self.transport is Transport.QUANTIZED

    @property
    def adaptive(self) -> bool:
        return self.levels == "fitted"

    def wire_bits(self, bits: float) -> float | None:
        """Bits per coordinate on the wire: ``bits`` when quantized, 32/16 for the all-reduces,
        ``None`` for PowerSGD (its size depends on the rank and the shapes, not on a width)."""
        return {Transport.FP32: 32, Transport.FP16: 16, Transport.POWERSGD: None}.get(self.transport, bits)


COMPRESSIONS: dict[str, CompressionSpec] = {
    s.name: s
    for s in (
        CompressionSpec("none", Transport.FP32, "fp32 all-reduce"),
        CompressionSpec("fp16", Transport.FP16, "fp16 all-reduce"),
        CompressionSpec("powersgd", Transport.POWERSGD, "PyTorch's PowerSGD hook (low rank, error feedback)"),
        CompressionSpec("qsgd", Transport.QUANTIZED, "one uniform level set (QSGD), L2 buckets", "uniform"),
        CompressionSpec("nuqsgd", Transport.QUANTIZED, "one exponential level set (NUQSGD), L2 buckets", "exponential"),
        CompressionSpec("global_adaptive", Transport.QUANTIZED, "one ALQ level set fitted to all tensors", "fitted"),
        CompressionSpec(
            "layerwise_adaptive", Transport.QUANTIZED, "one fitted level set per layer type", "fitted", True
        ),
    )
}
