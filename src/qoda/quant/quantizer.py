"""Unbiased stochastic quantization of tensors (docs/method.md section 2).

For each bucket ``v`` (``B`` consecutive coordinates of one layer) and coordinate ``i``:

    u_i = |v_i| / ||v||_q,   l_j <= u_i < l_{j+1},
    xi_i = l_{j+1} w.p. (u_i - l_j) / (l_{j+1} - l_j), else l_j,
    Q(v)_i = ||v||_q * sign(v_i) * xi_i          so E[Q(v)] = v.

Inputs of any shape, strides and float dtype are quantized in float32.  Randomness is a
pure function of ``seed`` and the coordinate index (:mod:`qoda.quant.rng`).  Several tensors
(the layers of one type) can be quantized as one *segment*: they are concatenated and each
layer is bucketed on its own, so a bucket never mixes two layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from qoda.quant.config import Norm, QuantizerConfig
from qoda.quant.kernels import cpu, torch_ref
from qoda.quant.levels import LevelSet
from qoda.quant.rng import seed_keys

#: The hash counter is 32-bit: one segment holds fewer than 2**32 coordinates.
MAX_SEGMENT_NUMEL = (1 << 32) - 1

TensorOrTensors = torch.Tensor | Sequence[torch.Tensor]


class NonFiniteError(ValueError):
    """The input of a quantizer contained NaN or Inf."""


@dataclass(frozen=True)
class LevelTables:
    """Per-level-set constants the kernels need, computed once per level set."""

    levels: np.ndarray  # float32 l_0..l_{s+1}
    padded: np.ndarray  # levels + a 2.0 sentinel
    inv_width: np.ndarray  # float32 1/(l_{j+1}-l_j), 0 for the top level
    table: np.ndarray  # int32 look-up by the top bits of float32 u
    shift: int  # bits dropped from float32 u to index ``table``
    one_step: bool  # every table cell holds at most one level boundary
    intervals: int  # s + 1 for uniform levels (QSGD arithmetic path), else 0
    signed: np.ndarray  # float32 +-l_j per fixed-width code
    invalid: np.ndarray  # uint8 1 for codes outside the level set

    @property
    def kernel_args(self) -> tuple:
        """The level arguments of :func:`cpu.quantize_to_codes` / :func:`cpu.quantize_pack`."""
        return (self.padded, self.inv_width, self.table, self.shift, self.one_step, self.intervals)


@lru_cache(maxsize=256)
def level_tables(levels: LevelSet) -> LevelTables:
    arr = levels.array
    table, shift, one_step = cpu.level_table(arr)
    signed, invalid = cpu.signed_level_table(arr, levels.code_bits)
    uniform = np.array_equal(arr, LevelSet.uniform(levels.s).array)
    return LevelTables(
        arr, cpu.padded_levels(arr), cpu.inverse_widths(arr), table, shift, one_step,
        levels.s + 1 if uniform else 0, signed, invalid,
    )  # fmt: skip


#: Bucket-start arrays of at most this many buckets are cached (64 entries, so at most 32 MiB):
#: a plan's layout repeats every step, but a layout read from a received header must not be able
#: to pin memory.  Larger layouts are recomputed (one ``arange`` per layer).
CACHED_MAX_BUCKETS = 1 << 16


def num_buckets(layer_numels: Sequence[int], bucket_size: int) -> int:
    """``sum_l ceil(n_l / B)``: the number of buckets, computed without allocating anything."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size: must be >= 1, got {bucket_size}")
    return sum(-(-int(n) // bucket_size) for n in layer_numels)


@lru_cache(maxsize=64)
def _bucket_starts_cached(layer_numels: tuple[int, ...], bucket_size: int) -> np.ndarray:
    return _bucket_starts(layer_numels, bucket_size)


def _bucket_starts(layer_numels: tuple[int, ...], bucket_size: int) -> np.ndarray:
    parts = []
    offset = 0
    for n in layer_numels:
        parts.append(np.arange(offset, offset + n, bucket_size, dtype=np.int64))
        offset += n
    parts.append(np.array([offset], dtype=np.int64))
    starts = np.concatenate(parts)
    starts.setflags(write=False)
    return starts


def bucket_starts(layer_numels: Sequence[int], bucket_size: int) -> np.ndarray:
    """Start offsets of every bucket plus the total length (``n_buckets + 1`` int64 values)."""
    key = tuple(int(n) for n in layer_numels)
    if num_buckets(key, int(bucket_size)) <= CACHED_MAX_BUCKETS:
        return _bucket_starts_cached(key, int(bucket_size))
    return _bucket_starts(key, int(bucket_size))


def flatten_float32(
    x: TensorOrTensors, layer_numels: Sequence[int] | None = None
) -> tuple[torch.Tensor, tuple[int, ...], torch.dtype]:
    """Concatenate one or several tensors into a contiguous flat float32 tensor.

    Returns ``(flat, layer_numels, dtype of the first input)``.  A contiguous float32
    single tensor is returned as a view (no copy).  ``layer_numels`` declares a single flat
    tensor to be the concatenation of layers of these sizes (buckets restart at each).
    """
    if layer_numels is not None:
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() != sum(layer_numels):
            raise ValueError("layer_numels: requires one flat tensor with sum(layer_numels) elements")
        flat, _, dtype = flatten_float32(x)
        return flat, tuple(int(n) for n in layer_numels), dtype
    tensors = [x] if isinstance(x, torch.Tensor) else list(x)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"quantize: expected tensors, got {type(t).__name__}")
        if not (t.is_floating_point()):
            raise TypeError(f"quantize: expected a floating-point tensor, got dtype {t.dtype}")
    dtype = tensors[0].dtype if tensors else torch.float32
    numels = tuple(t.numel() for t in tensors)
    if sum(numels) > MAX_SEGMENT_NUMEL:
        raise ValueError(f"quantize: a segment holds at most {MAX_SEGMENT_NUMEL} coordinates")
    if len(tensors) == 1:
        flat = tensors[0].detach().reshape(-1).to(torch.float32).contiguous()
    elif tensors:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    else:
        flat = torch.zeros(0, dtype=torch.float32)
    return flat, numels, dtype


def scratch_for(config: QuantizerConfig) -> np.ndarray:
    """The kernels' per-bucket working memory (five float32 rows of one bucket)."""
    return np.empty((5, config.bucket_size), dtype=np.float32)


def raise_for_status(status: int, bucket: int, starts: np.ndarray, what: str) -> None:
    """Turn a kernel status into the matching exception."""
    if status == cpu.OK:
        return
    a, e = (int(starts[bucket]), int(starts[bucket + 1])) if bucket >= 0 else (-1, -1)
    if status == cpu.ERR_NONFINITE:
        raise NonFiniteError(f"{what}: input contains NaN or Inf (bucket {bucket}, coordinates {a}..{e - 1})")
    if status == cpu.ERR_OVERFLOW:
        raise ValueError(f"{what}: the norm of bucket {bucket} overflows float32 (coordinates {a}..{e - 1})")
    raise RuntimeError(f"{what}: kernel status {status}")


@dataclass(frozen=True)
class QuantizedTensor:
    """The quantized form of one segment: what the codec puts on the wire.

    Attributes:
        codes: int32 per coordinate, ``(level index << 1) | sign``.
        norms: float32 per bucket.
        layer_numels: numel of each layer of the segment (buckets restart at each layer).
        shapes: original shape of each layer.
        dtype: dtype of the original input (dequantized values are float32).
        config: the quantizer settings.
    """

    codes: torch.Tensor
    norms: torch.Tensor
    layer_numels: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    config: QuantizerConfig

    @property
    def numel(self) -> int:
        return sum(self.layer_numels)

    @property
    def starts(self) -> np.ndarray:
        return bucket_starts(self.layer_numels, self.config.bucket_size)

    def dequantize(self, backend: str = "auto") -> torch.Tensor:
        """The flat float32 vector ``Q(x)`` (``backend`` as in :func:`quantize`)."""
        tables = level_tables(self.config.levels)
        if self.codes.device.type != "cpu" or backend == "torch":
            return torch_ref.dequantize_codes(
                self.codes,
                torch.tensor(self.starts, device=self.codes.device),
                self.norms,
                torch.tensor(tables.levels, device=self.codes.device),
            )
        out = np.empty(self.numel, dtype=np.float32)
        status, i = cpu.dequantize_codes(self.codes.numpy(), self.starts, self.norms.numpy(), tables.levels, out, False)
        if status != cpu.OK:
            raise ValueError(f"dequantize: invalid code at coordinate {i}")
        return torch.from_numpy(out)

    def dequantize_layers(self) -> list[torch.Tensor]:
        """``Q(x)`` split back into the original layer shapes (float32)."""
        flat = self.dequantize()
        return [p.view(s) for p, s in zip(flat.split(list(self.layer_numels)), self.shapes, strict=True)]


def quantize(
    x: TensorOrTensors,
    config: QuantizerConfig,
    seed: int,
    backend: str = "auto",
    layer_numels: Sequence[int] | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (a tensor, or the layers of one type) with ``config``.

    ``backend="auto"`` runs CPU tensors through the fused numba kernel and other devices
    (CUDA) through the torch path, which computes the same codes; ``"torch"`` forces the
    torch path.  Raises :class:`NonFiniteError` on NaN/Inf input.
    """
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: expected 'auto' or 'torch', got {backend!r}")
    flat, numels, dtype = flatten_float32(x, layer_numels)
    if layer_numels is not None:
        shapes = tuple(torch.Size([n]) for n in numels)
    else:
        shapes = tuple(t.shape for t in ([x] if isinstance(x, torch.Tensor) else x))
    starts = bucket_starts(numels, config.bucket_size)
    tables = level_tables(config.levels)
    linf = config.norm is Norm.LINF
    if flat.device.type != "cpu" or backend == "torch":
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError("quantize: input contains NaN or Inf")
        dev = flat.device
        codes, norms = torch_ref.quantize_codes(
            flat,
            torch.tensor(starts, device=dev),
            torch.tensor(tables.levels, device=dev),
            torch.tensor(tables.inv_width, device=dev),
            tables.intervals,
            linf,
            seed,
        )
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("quantize: a bucket norm overflows float32")
        return QuantizedTensor(codes.to(torch.int32), norms, numels, shapes, dtype, config)
    k1, k2 = seed_keys(seed)
    norms = np.empty(len(starts) - 1, dtype=np.float32)
    codes = np.empty(flat.numel(), dtype=np.int32)
    status, bucket = cpu.quantize_to_codes(
        flat.numpy(), starts, *tables.kernel_args,
        int(linf), k1, k2, norms, codes, scratch_for(config),
    )  # fmt: skip
    raise_for_status(status, bucket, starts, "quantize")
    return QuantizedTensor(torch.from_numpy(codes), torch.from_numpy(norms), numels, shapes, dtype, config)
