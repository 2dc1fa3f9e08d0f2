"""Quantization level sequences ``0 = l_0 < l_1 < ... < l_s < l_{s+1} = 1``.

A level set is the only thing that distinguishes QSGD (uniform levels), NUQSGD
(exponential levels ``p^s, ..., p, 1``) and adaptive schemes (levels fitted to the
gradient distribution).  Levels are stored as float32 because that is the precision in
which coordinates are quantized and dequantized on every device.

The method: ``docs/method.md`` section 2.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: Largest number of levels (``s + 2``): a signed level index must fit in 16 bits.
MAX_LEVELS = 1 << 15
#: Smallest gap between adjacent levels: the smallest normal float32, 2^-126 (its inverse, 2^126,
#: is finite; below about 2^-128 the kernels' inverse widths overflow).
MIN_LEVEL_GAP = 2.0**-126


@dataclass(frozen=True)
class LevelSet:
    """A validated, immutable level sequence.

    Build one with :meth:`uniform`, :meth:`exponential`, :meth:`for_bits` or
    :meth:`custom`; the constructor validates whatever it is given.
    """

    values: tuple[float, ...]
    family: str = "custom"

    def __post_init__(self) -> None:
        vals = tuple(float(np.float32(v)) for v in self.values)
        object.__setattr__(self, "values", vals)
        if len(vals) < 2:
            raise ValueError(f"levels: need at least the endpoints 0 and 1, got {len(vals)} value(s)")
        if len(vals) > MAX_LEVELS:
            raise ValueError(f"levels: at most {MAX_LEVELS} levels are supported, got {len(vals)}")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError("levels: every level must be finite")
        if vals[0] != 0.0:
            raise ValueError(f"levels: the first level must be 0, got {vals[0]}")
        if vals[-1] != 1.0:
            raise ValueError(f"levels: the last level must be 1, got {vals[-1]}")
        for a, b in itertools.pairwise(vals):
            if not b > a:
                raise ValueError(f"levels: must be strictly increasing in [0, 1] (as float32), found {a} then {b}")
            # The kernels round with p = (u - l_j) * float32(1 / (l_{j+1} - l_j)): a gap below
            # MIN_LEVEL_GAP makes that inverse overflow float32 and the rounding biased.
            if float(np.float32(b) - np.float32(a)) < MIN_LEVEL_GAP:
                raise ValueError(
                    f"levels: the gap between {a} and {b} is below {MIN_LEVEL_GAP:.3g} (2^-126), "
                    "its inverse overflows float32"
                )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, s: int) -> LevelSet:
        """QSGD levels ``l_j = j / (s + 1)``, ``s`` interior levels."""
        _check_s(s)
        return cls(tuple(j / (s + 1) for j in range(s + 2)), family="uniform")

    @classmethod
    def exponential(cls, s: int, p: float = 0.5) -> LevelSet:
        """NUQSGD levels ``0, p^s, p^(s-1), ..., p, 1`` (``s`` interior levels, base ``p``)."""
        _check_s(s)
        if not 0.0 < p < 1.0:
            raise ValueError(f"levels.p: exponential base must be in (0, 1), got {p}")
        interior = [p ** (s + 1 - j) for j in range(1, s + 1)]
        return cls((0.0, *interior, 1.0), family=f"exponential(p={p})")

    @classmethod
    def custom(cls, values: Sequence[float]) -> LevelSet:
        """User-given levels; must start at 0, end at 1 and increase strictly."""
        return cls(tuple(float(v) for v in values), family="custom")

    @classmethod
    def for_bits(cls, bits: int, family: str = "uniform", p: float = 0.5) -> LevelSet:
        """The largest level set of ``family`` (:data:`LEVEL_FAMILIES`, shape parameter ``p``) whose
        fixed-width code (sign + index) fits ``bits`` bits.

        ``bits = 1 + ceil(log2(s + 2))`` so ``s + 2 = 2 ** (bits - 1)`` levels.
        """
        if not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits: must be an integer in [2, 16], got {bits!r}")
        build = LEVEL_FAMILIES.get(family)
        if build is None:
            raise ValueError(f"family: expected one of {', '.join(map(repr, LEVEL_FAMILIES))}, got {family!r}")
        return build(2 ** (bits - 1) - 2, p)

    # ------------------------------------------------------------------ properties
    @property
    def s(self) -> int:
        """Number of interior levels."""
        return len(self.values) - 2

    @property
    def num_levels(self) -> int:
        return len(self.values)

    @property
    def index_bits(self) -> int:
        """``ceil(log2(s + 2))``: bits of a level index in the fixed-width code."""
        return max(1, math.ceil(math.log2(self.num_levels)))

    @property
    def code_bits(self) -> int:
        """Bits per coordinate of the fixed-width code: one sign bit plus the index."""
        return 1 + self.index_bits

    @cached_property
    def array(self) -> np.ndarray:
        """Levels as a read-only float32 numpy array."""
        a = np.asarray(self.values, dtype=np.float32)
        a.setflags(write=False)
        return a

    @cached_property
    def level_set_id(self) -> int:
        """CRC-32 of the float32 levels: the id written into every payload header."""
        return zlib.crc32(self.array.tobytes()) & 0xFFFFFFFF

    def __repr__(self) -> str:
        return f"LevelSet({self.family}, s={self.s}, id={self.level_set_id:08x})"


#: The level families by name: ``(s, p) -> LevelSet`` with ``s`` interior levels and the family's
#: shape parameter ``p`` (unused by ``uniform``).  A new family is one entry here; it is then a
#: ``family`` of :meth:`LevelSet.for_bits` and a ``levels`` of the trainer's compression registry.
LEVEL_FAMILIES: dict[str, Callable[[int, float], LevelSet]] = {
    "uniform": lambda s, p: LevelSet.uniform(s),
    "exponential": LevelSet.exponential,
}


def _check_s(s: int) -> None:
    if not isinstance(s, int) or s < 0 or s + 2 > MAX_LEVELS:
        raise ValueError(f"levels.s: number of interior levels must be an int in [0, {MAX_LEVELS - 2}], got {s!r}")
