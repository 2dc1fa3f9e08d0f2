"""Quantizer settings: one frozen, validated object per layer type."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from qoda.quant.levels import LevelSet

#: Default coordinates per bucket: the value of the published Q-GenX/QODA WGAN runs.
DEFAULT_BUCKET_SIZE = 1024
#: Largest bucket: the kernels keep one bucket in a scratch buffer.
MAX_BUCKET_SIZE = 1 << 20
#: The entropy coder normalises frequencies to M = 2**14; its alphabet (2 * (s + 2) codes) is
#: kept <= M / 4 so the normalisation loss log2(M / (M - P)) stays below 0.42 bit: ``code_bits <= 12``.
MAX_ENTROPY_CODE_BITS = 12


class Norm(StrEnum):
    """Bucket normalisation ``||v||_q``."""

    L2 = "l2"
    LINF = "linf"


class Coding(StrEnum):
    """How level indices go on the wire (docs/method.md section 2.2)."""

    FIXED = "fixed"  #: sign + ceil(log2(s+2)) bits per coordinate, bit-packed
    ENTROPY = "entropy"  #: rANS code of the (sign, index) symbols with per-payload frequencies


@dataclass(frozen=True)
class QuantizerConfig:
    """Settings of one layer type's quantizer.

    Attributes:
        levels: the level sequence ``0 = l_0 < ... < l_{s+1} = 1``.
        bucket_size: coordinates per bucket ``B``; each bucket is normalised separately.
            Buckets never straddle two layers.
        norm: ``l2`` (QSGD/NUQSGD) or ``linf`` (QSGD-inf, CGX-style).
        coding: ``fixed`` or ``entropy``.
    """

    levels: LevelSet = field(default_factory=lambda: LevelSet.for_bits(4))
    bucket_size: int = DEFAULT_BUCKET_SIZE
    norm: Norm = Norm.L2
    coding: Coding = Coding.FIXED

    def __post_init__(self) -> None:
        if not isinstance(self.levels, LevelSet):
            raise TypeError(f"levels: expected a LevelSet, got {type(self.levels).__name__}")
        if not isinstance(self.bucket_size, int) or not 1 <= self.bucket_size <= MAX_BUCKET_SIZE:
            raise ValueError(f"bucket_size: must be an integer in [1, {MAX_BUCKET_SIZE}], got {self.bucket_size!r}")
        try:
            object.__setattr__(self, "norm", Norm(self.norm))
        except ValueError:
            raise ValueError(f"norm: expected 'l2' or 'linf', got {self.norm!r}") from None
        try:
            object.__setattr__(self, "coding", Coding(self.coding))
        except ValueError:
            raise ValueError(f"coding: expected 'fixed' or 'entropy', got {self.coding!r}") from None
        if self.coding is Coding.ENTROPY and self.levels.code_bits > MAX_ENTROPY_CODE_BITS:
            raise ValueError(
                f"coding: entropy coding supports at most {MAX_ENTROPY_CODE_BITS} bits per code, "
                f"these levels need {self.levels.code_bits}"
            )

    @property
    def bits(self) -> int:
        """Fixed-width bits per coordinate (sign + index)."""
        return self.levels.code_bits

    # ------------------------------------------------------------------ presets
    @classmethod
    def qsgd(cls, bits: int = 4, bucket_size: int = DEFAULT_BUCKET_SIZE, **kw: object) -> QuantizerConfig:
        """QSGD: uniform levels, L2 norm."""
        return cls(LevelSet.for_bits(bits, "uniform"), bucket_size, Norm.L2, **kw)  # type: ignore[arg-type]

    @classmethod
    def qsgd_inf(cls, bits: int = 4, bucket_size: int = DEFAULT_BUCKET_SIZE, **kw: object) -> QuantizerConfig:
        """QSGD-inf: uniform levels, L-inf norm."""
        return cls(LevelSet.for_bits(bits, "uniform"), bucket_size, Norm.LINF, **kw)  # type: ignore[arg-type]

    @classmethod
    def nuqsgd(
        cls, bits: int = 4, bucket_size: int = DEFAULT_BUCKET_SIZE, p: float = 0.5, **kw: object
    ) -> QuantizerConfig:
        """NUQSGD: exponential levels ``p^s..p, 1``, L2 norm."""
        return cls(LevelSet.for_bits(bits, "exponential", p), bucket_size, Norm.L2, **kw)  # type: ignore[arg-type]
