"""Generated cases for the quantizer and the codec: Hypothesis strategies and the properties they must hold.

One library for two users: ``tests/test_properties.py`` runs a few hundred derandomized examples per
property (reproducible CI, with Hypothesis shrinking any failure), and ``qoda bench faults`` runs
:func:`run_generated` (default 100,000 cases) in *counting mode*: every case is checked against every
applicable property, failures are tallied by property and the first few failing inputs are kept, and
the run goes on.

What is drawn (:func:`any_cases`):

* tensors: shapes with 0 to 3 dimensions (empty, length 1, 0-d), float32/fp16/bf16/fp64, values that
  are normal at any scale, all zero (signed zeros), constant, sparse, float32-subnormal, huge (near the
  dtype's maximum), mixed-sign over the whole exponent range, repeated values, or drawn one by one by
  Hypothesis (its edge values); contiguous, transposed, strided (NaN in the skipped elements), expanded
  (stride 0) or offset views;
* level sets: every :class:`~qoda.quant.levels.LevelSet` family (uniform, exponential, ``for_bits``),
  custom sets with arbitrary (gaps down to ``MIN_LEVEL_GAP``) and with clustered (a few ulps apart) levels,
  and levels fitted by
  :func:`~qoda.quant.adapt.fit_alq` / :func:`~qoda.quant.adapt.fit_amq`;
* bucket sizes 1 to ``MAX_BUCKET_SIZE``, L2 and L-inf norms, fixed and entropy coding;
* single tensors, lists of layers, flat segments with ``layer_numels``, layer-wise messages
  (:class:`~qoda.codec.layerwise.LayerwiseCodec` plans mixing types and raw layers), and invalid inputs
  (NaN, +-Inf, a bucket whose L2 norm overflows float32).

Properties (``PROPERTIES``; each check raises :class:`PropertyFailure`):

* ``roundtrip``: ``decode(encode(q))`` has ``q``'s codes and norms bit for bit; ``encode_tensor`` (fused,
  also into a dirty reused buffer) gives the same bytes; ``decode_into`` (overwrite, accumulate, strided
  output) gives exactly ``q.dequantize()``.
* ``bits``: ``Encoded.bits == 8 len - padding`` (the unused tail of the last fixed-width byte);
  fixed width equals :func:`~qoda.codec.length.fixed_code_length`; the rANS stream lies between the
  empirical entropy of the codes and :func:`~qoda.codec.rans.code_length_bound`.
* ``backends``: the numba kernel and ``backend="torch"`` give the same codes, norms and dequantized values.
* ``error_bound``: norms are the bucket norms (L-inf exactly, L2 to float32 rounding); each code's level
  is ``l_j`` or ``l_{j+1}`` of the interval holding ``u_i = |x_i| / norm`` (a zero stays zero, the sign
  bit is canonical), so ``|Q(x)_i - x_i| <= norm (l_{j+1} - l_j)``, plus float32 rounding.
* ``unbiased``: on segments of at most 32 coordinates, the mean of ``MC_SAMPLES`` quantizations is
  within a Hoeffding bound of ``x`` (see :func:`check_unbiased`).
* ``invalid_input``: NaN/Inf raise ``NonFiniteError``, an L2 norm overflowing float32 raises
  ``ValueError``, on the CPU kernel, the torch path and the fused encoder; nothing is returned.
* ``message``: a layer-wise message decodes to each type's ``quantize(...).dequantize()`` (raw layers
  exactly), its bits add up, and encoding into a reused buffer gives the same bytes.

"Float32 rounding" allowances are derived from the kernels' arithmetic (each documented where used).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from qoda.codec import rans
from qoda.codec.format import HEADER_SIZE
from qoda.codec.layerwise import LayerwiseCodec, segment_seed
from qoda.codec.length import fixed_code_length, overhead_bits
from qoda.codec.segment import decode, decode_into, encode, encode_tensor, fixed_segment_header
from qoda.quant.adapt import MagnitudeStats, fit_alq, fit_amq
from qoda.quant.config import MAX_BUCKET_SIZE, MAX_ENTROPY_CODE_BITS, Coding, Norm, QuantizerConfig
from qoda.quant.levels import MIN_LEVEL_GAP, LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.quant.quantizer import NonFiniteError, QuantizedTensor, quantize

PROPERTIES = ("roundtrip", "bits", "backends", "error_bound", "unbiased", "invalid_input", "message")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PATTERNS = ("normal", "zeros", "constant", "sparse", "subnormal", "huge", "mixed", "repeated", "drawn")
VIEWS = ("contiguous", "transposed", "stepped", "expanded", "offset")

FLT_MAX = float(np.finfo(np.float32).max)
#: Smallest float64 value that rounds to +inf in float32 (FLT_MAX plus half an ulp).
F32_OVERFLOW = 2.0**128 - 2.0**103
U = 2.0**-24  # float32 unit roundoff
TINY = 2.0**-149  # smallest float32 subnormal
#: Relative error of the kernels' ``u = |x| * fl(1 / norm)``: two roundings (2u) when ``1/norm`` is normal,
#: and ``2^-150 * norm <= 2^-22`` for ``1/norm`` subnormal (``norm > 2^126``); 2^-21 covers both with margin.
U_REL = 2.0**-21

#: Monte-Carlo unbiasedness: coordinates per case, samples (seeds x copies), and the per-coordinate
#: false-alarm probability.  A 100,000-case run tests at most 100,000 * 32 = 3.2e6 coordinates, so with
#: HOEFFDING_DELTA = 1e-12 the union bound puts the chance of any false alarm in a run below 3.2e-6.
MC_MAX_NUMEL = 32
MC_SEEDS = 16
MC_COPIES = 24
MC_SAMPLES = MC_SEEDS * MC_COPIES
HOEFFDING_DELTA = 1e-12


class PropertyFailure(AssertionError):
    """A property does not hold for a drawn case."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"{prop}: {message}")
        self.prop = prop


def _fail(prop: str, ok: bool, message: str) -> None:
    if not ok:
        raise PropertyFailure(prop, message)


# ====================================================================================== cases
@dataclass(frozen=True)
class SegmentCase:
    """One segment: ``layers`` quantized with ``config`` and ``seed``.

    ``mode``: ``tensor`` (the single layer passed as a tensor), ``list`` (the layers as a list) or
    ``flat`` (one flat float32 tensor with ``layer_numels``).  ``poison`` names the invalid input
    planted on purpose ("" for none; the checks derive the expected outcome from the values anyway).
    """

    layers: tuple[torch.Tensor, ...]
    config: QuantizerConfig
    seed: int
    mode: str = "list"
    poison: str = ""

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(t.numel() for t in self.layers)

    def inputs(self) -> tuple[torch.Tensor | list[torch.Tensor], tuple[int, ...] | None]:
        """``(x, layer_numels)`` as passed to :func:`quantize` / :func:`encode_tensor`."""
        if self.mode == "tensor":
            return self.layers[0], None
        if self.mode == "flat":
            return x32(self.layers), self.numels
        return list(self.layers), None


@dataclass(frozen=True)
class MessageCase:
    """A layer-wise message: one tensor per plan entry (plan order)."""

    plan: LayerPlan
    tensors: tuple[torch.Tensor, ...]
    seed: int


def x32(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float32 coordinates the quantizer sees: layers flattened in logical (row-major) order."""
    if not layers:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in layers])


def describe(case: SegmentCase | MessageCase, max_values: int = 64) -> dict[str, Any]:
    """A JSON-able description precise enough to rebuild the case (values as exact float reprs)."""

    def tensor(t: torch.Tensor) -> dict[str, Any]:
        d: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                             "stride": list(t.stride()), "contiguous": t.is_contiguous()}  # fmt: skip
        vals = t.detach().reshape(-1).double()
        if t.numel() <= max_values:  # exact reprs; NaN/Inf as strings (the bench writes strict JSON)
            d["values"] = [float(v) if math.isfinite(v) else str(float(v)) for v in vals]
        else:
            fin = vals[torch.isfinite(vals)].abs()
            d["summary"] = {"numel": t.numel(), "nonfinite": int((~torch.isfinite(vals)).sum()),
                            "max_abs": float(fin.max()) if fin.numel() else 0.0,
                            "min_abs_nonzero": float(fin[fin > 0].min()) if (fin > 0).any() else 0.0}  # fmt: skip
        return d

    def config(c: QuantizerConfig) -> dict[str, Any]:
        lv = c.levels
        levels: Any = list(lv.values) if lv.num_levels <= 40 else f"{lv.family}, s={lv.s}"
        return {"levels": levels, "family": lv.family, "level_set_id": f"{lv.level_set_id:08x}",
                "bucket_size": c.bucket_size, "norm": c.norm.value, "coding": c.coding.value}  # fmt: skip

    if isinstance(case, MessageCase):
        return {"kind": "message", "seed": case.seed,
                "entries": [{"name": e.name, "shape": list(e.shape), "type": e.type_name} for e in case.plan.entries],
                "configs": {t: config(c) for t, c in case.plan.configs.items()},
                "tensors": [tensor(t) for t in case.tensors]}  # fmt: skip
    return {"kind": "segment", "mode": case.mode, "poison": case.poison, "seed": case.seed,
            "config": config(case.config), "layers": [tensor(t) for t in case.layers]}  # fmt: skip


# ====================================================================================== strategies
def _valid_levels(make: Any) -> LevelSet | None:
    try:
        return make()
    except ValueError:
        return None


@st.composite
def _exponential_levels(draw: st.DrawFn) -> LevelSet:
    p = draw(st.floats(0.01, 0.99))
    # l_1 = p^s must stay >= MIN_LEVEL_GAP = 2^-126 (LevelSet refuses smaller gaps); s_max reaches that edge
    s_max = max(1, int(126 * math.log(2) / -math.log(p)))
    s = draw(st.one_of(st.integers(1, min(14, s_max)), st.integers(1, s_max)))
    lv = _valid_levels(lambda: LevelSet.exponential(s, p))
    return lv if lv is not None else LevelSet.exponential(1, p)


@st.composite
def _for_bits_levels(draw: st.DrawFn) -> LevelSet:
    bits = draw(st.integers(2, 16))
    family = draw(st.sampled_from(["uniform", "exponential"]))
    p = draw(st.sampled_from([0.5, 0.7, 0.9, 0.95]))
    lv = _valid_levels(lambda: LevelSet.for_bits(bits, family, p))
    return lv if lv is not None else LevelSet.for_bits(bits)


def _custom(values: Sequence[float]) -> LevelSet:
    """A valid custom level set from arbitrary interior values: float32, sorted, and thinned so that adjacent
    levels are at least ``MIN_LEVEL_GAP`` apart (gaps of exactly that size are kept: the edge case)."""
    kept = [0.0]
    for v in sorted({float(np.float32(v)) for v in values}):
        if 0.0 < v < 1.0 and float(np.float32(v) - np.float32(kept[-1])) >= MIN_LEVEL_GAP:
            kept.append(v)
    while len(kept) > 1 and float(np.float32(1.0) - np.float32(kept[-1])) < MIN_LEVEL_GAP:
        kept.pop()
    return LevelSet.custom([*kept, 1.0])


@st.composite
def _custom_levels(draw: st.DrawFn) -> LevelSet:
    kind = draw(st.sampled_from(["arbitrary", "gaps", "clustered"]))
    if kind == "arbitrary":  # Hypothesis' own floats: subnormal levels, levels next to 0 or 1
        vals = draw(st.lists(st.floats(0.0, 1.0, width=32, exclude_min=True, exclude_max=True), max_size=20))
        return _custom(vals)
    if kind == "gaps":  # irregular gaps spanning many orders of magnitude
        gaps = draw(st.lists(st.floats(-12.0, 0.0), min_size=1, max_size=30))
        cum = np.cumsum(10.0 ** np.asarray(gaps))
        return _custom(list(cum[:-1] / cum[-1]))
    # clustered: runs of adjacent float32 values (cells of the kernel's look-up table with many boundaries)
    vals: list[float] = []
    for _ in range(draw(st.integers(1, 3))):
        v = np.float32(draw(st.floats(0.0, 1.0, width=32, exclude_min=True, exclude_max=True)))
        for _ in range(draw(st.integers(1, 6))):
            vals.append(float(v))
            v = np.nextafter(v, np.float32(1.0))
    return _custom(vals)


@lru_cache(maxsize=128)
def fitted_levels(method: str, s: int, data_seed: int, norm: str) -> LevelSet:
    """Levels fitted by ALQ or AMQ to a heavy-tailed sample (cached: fitting takes milliseconds)."""
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(4096, generator=g) * torch.rand(4096, generator=g) ** (1 + data_seed)
    stats = MagnitudeStats(bins=256)
    stats.update(x, QuantizerConfig(LevelSet.uniform(s), 256, norm))
    return fit_alq(stats, s) if method == "alq" else fit_amq(stats, s)


def level_sets() -> st.SearchStrategy[LevelSet]:
    """Every family of :class:`LevelSet`, custom sets with irregular or clustered gaps, and fitted levels."""
    return st.one_of(
        st.builds(LevelSet.uniform, st.one_of(st.integers(0, 14), st.integers(0, 300))),
        _exponential_levels(),
        _for_bits_levels(),
        _custom_levels(),
        st.builds(fitted_levels, st.sampled_from(["alq", "amq"]), st.sampled_from([0, 1, 2, 6, 14, 30]),
                  st.integers(0, 3), st.sampled_from(["l2", "linf"])),
    )  # fmt: skip


@st.composite
def configs(draw: st.DrawFn, levels: st.SearchStrategy[LevelSet] | None = None) -> QuantizerConfig:
    """A quantizer config: level set, bucket size (1 to ``MAX_BUCKET_SIZE``), norm, coding."""
    lv = draw(levels if levels is not None else level_sets())
    bucket = draw(st.one_of(st.integers(1, 8), st.integers(1, 300), st.sampled_from([1024, 4096, MAX_BUCKET_SIZE])))
    norm = draw(st.sampled_from([Norm.L2, Norm.LINF]))
    codings = [Coding.FIXED] + ([Coding.ENTROPY] if lv.code_bits <= MAX_ENTROPY_CODE_BITS else [])
    return QuantizerConfig(lv, bucket, norm, draw(st.sampled_from(codings)))


def _dtype_max(dtype: torch.dtype) -> float:
    return min(float(torch.finfo(dtype).max), FLT_MAX)


def _pattern_values(pattern: str, n: int, rng: np.random.Generator, dtype: torch.dtype) -> np.ndarray:
    """``n`` float64 values of a pattern, inside the finite range of ``dtype`` and of float32."""
    top = _dtype_max(dtype)
    lo10 = math.log10(float(torch.finfo(dtype).tiny)) if dtype != torch.float64 else -45.0
    hi10 = math.log10(top)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    if n == 0:
        return np.zeros(0)
    if pattern == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(lo10 + 2, hi10 - 3)
    elif pattern == "zeros":
        v = sign * 0.0
    elif pattern == "constant":
        v = np.full(n, sign[0] * 10.0 ** rng.uniform(lo10, hi10))
    elif pattern == "sparse":
        v = np.zeros(n)
        k = int(rng.integers(1, 4))
        v[rng.integers(0, n, k)] = rng.standard_normal(k) * 10.0 ** rng.uniform(lo10 + 2, hi10 - 3)
    elif pattern == "subnormal":  # float32 subnormals (fp16: its own subnormals, normal in float32)
        sub = 2.0**-126 if dtype != torch.float16 else 2.0**-14
        v = rng.uniform(-1.0, 1.0, n) * sub * 2.0 ** -rng.uniform(0, 23)
    elif pattern == "huge":
        v = rng.uniform(-1.0, 1.0, n) * top * rng.uniform(0.01, 1.0)
    elif pattern == "mixed":
        v = sign * 10.0 ** rng.uniform(lo10, hi10, n)
    else:  # repeated: a few distinct values, many ties
        v = rng.choice(rng.standard_normal(3) * 10.0 ** rng.uniform(lo10 + 2, hi10 - 3), n)
    return np.clip(v, -top, top)


def _shape_numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) if shape else 1


@st.composite
def shapes(draw: st.DrawFn, max_numel: int = 300) -> tuple[int, ...]:
    """0-d to 3-d shapes, empty and length-1 included, with at most ``max_numel`` elements."""
    if draw(st.booleans()):
        return (draw(st.one_of(st.integers(0, 2), st.integers(0, max_numel))),)
    dims = draw(st.lists(st.integers(0, 12), max_size=3))
    while _shape_numel(dims) > max_numel:
        dims[int(np.argmax(dims))] //= 2
    return tuple(dims)


def _view(values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, view: str) -> torch.Tensor:
    """A tensor of ``shape`` whose logical (row-major) values come from ``values``, laid out as ``view``."""
    base = torch.from_numpy(values).to(dtype)
    n = base.numel()
    if view == "transposed" and len(shape) >= 2:
        return base.reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if view == "stepped" and len(shape) >= 1:
        buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"), dtype=dtype)  # skipped elements: NaN
        buf[..., ::2] = base.reshape(shape)
        return buf[..., ::2]
    if view == "expanded" and len(shape) >= 1 and shape[0] > 1:
        row = base[: _shape_numel(shape[1:])].reshape(1, *shape[1:])
        return row.expand(shape)
    if view == "offset":
        buf = torch.full((n + 3,), float("nan"), dtype=dtype)
        buf[3:] = base
        return buf[3:].view(shape)
    return base.reshape(shape)


@st.composite
def tensors(
    draw: st.DrawFn,
    max_numel: int = 300,
    shape: tuple[int, ...] | None = None,
    dtypes: Sequence[torch.dtype] = DTYPES,
) -> torch.Tensor:
    """A finite tensor: any of ``DTYPES``, ``PATTERNS`` and ``VIEWS``."""
    dtype = draw(st.sampled_from(list(dtypes)))
    shape = draw(shapes(max_numel)) if shape is None else tuple(shape)
    n = _shape_numel(shape)
    pattern = draw(st.sampled_from(PATTERNS))
    if pattern == "drawn" and n <= 48:  # Hypothesis' own floats: its edge values, shrinkable
        width = 16 if dtype == torch.float16 else 32
        vals = draw(st.lists(st.floats(width=width, allow_nan=False, allow_infinity=False), min_size=n, max_size=n))
        top = _dtype_max(dtype)
        values = np.clip(np.asarray(vals, dtype=np.float64).reshape(-1), -top, top)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        values = _pattern_values("normal" if pattern == "drawn" else pattern, n, rng, dtype)
    return _view(values, shape, dtype, draw(st.sampled_from(VIEWS)))


@st.composite
def segment_cases(draw: st.DrawFn, max_numel: int = 400, poison: bool = False) -> SegmentCase:
    """A segment (single tensor, list of layers or flat + ``layer_numels``); ``poison`` plants NaN/Inf or
    an overflowing L2 bucket norm."""
    config = draw(configs())
    mode = draw(st.sampled_from(["tensor", "list", "flat"]))
    n_layers = 1 if mode == "tensor" else draw(st.integers(0 if mode == "list" else 1, 4))
    layers = [draw(tensors(max(1, max_numel // max(1, n_layers)))) for _ in range(n_layers)]
    seed = draw(st.one_of(st.integers(0, 2**16), st.integers(-(2**63), 2**64)))
    kind = ""
    if poison:
        kind = draw(st.sampled_from(["nan", "inf", "-inf", "overflow"]))
        need = 2 if kind == "overflow" else 1
        if kind == "overflow":
            config = replace(config, norm=Norm.L2, bucket_size=max(2, config.bucket_size))
        cands = [i for i, t in enumerate(layers) if t.numel() >= need]
        if not cands:
            layers.append(torch.zeros(draw(st.integers(need, 40))))
            mode = "list" if mode == "tensor" else mode
            cands = [len(layers) - 1]
        k = draw(st.sampled_from(cands))
        t = layers[k].detach().reshape(-1).to(torch.float32 if kind == "overflow" else layers[k].dtype).clone()
        if kind == "overflow":  # two coordinates of one bucket: sqrt(2) * 0.9 * FLT_MAX overflows float32
            b = config.bucket_size
            i = b * draw(st.integers(0, (t.numel() - 2) // b))  # a bucket with at least 2 coordinates
            t[i], t[i + 1] = 0.9 * FLT_MAX, -0.9 * FLT_MAX
        else:
            t[draw(st.integers(0, t.numel() - 1))] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
        layers[k] = t
    return SegmentCase(tuple(layers), config, seed, mode, kind)


def mc_cases() -> st.SearchStrategy[SegmentCase]:
    """Small segments (at most ``MC_MAX_NUMEL`` coordinates) for the Monte-Carlo unbiasedness check."""
    return segment_cases(max_numel=MC_MAX_NUMEL)


@st.composite
def message_cases(draw: st.DrawFn, max_numel: int = 600) -> MessageCase:
    """A layer-wise message: up to 6 layers, each of one of up to 3 types or uncompressed; one case in four
    has a NaN or Inf in one layer (raw layers carry it, quantized ones must refuse it)."""
    types = [f"t{k}" for k in range(draw(st.integers(0, 3)))]
    cfgs = {t: draw(configs()) for t in types}
    n_entries = draw(st.integers(0, 6))
    entries, xs = [], []
    for i in range(n_entries):
        shape = draw(shapes(max(1, max_numel // max(1, n_entries))))
        entries.append(LayerEntry(f"layer{i}", torch.Size(shape), draw(st.sampled_from([None, *types]))))
        xs.append(draw(tensors(shape=shape)))
    nonempty = [i for i, t in enumerate(xs) if t.numel()]
    if nonempty and draw(st.integers(0, 3)) == 0:  # a NaN/Inf in one layer: quantized groups must refuse it
        k = draw(st.sampled_from(nonempty))
        t = xs[k].detach().clone().reshape(-1)
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        xs[k] = t.view(xs[k].shape)
    seed = draw(st.one_of(st.integers(0, 2**16), st.integers(0, 2**64 - 1)))
    return MessageCase(LayerPlan(tuple(entries), cfgs), tuple(xs), seed)


CASE_KINDS = ("segment", "segment", "mc", "invalid", "message")


@st.composite
def any_cases(draw: st.DrawFn) -> SegmentCase | MessageCase:
    """The counting run's mixture: 2/5 segments, 1/5 Monte-Carlo-sized, 1/5 invalid inputs, 1/5 messages."""
    kind = draw(st.sampled_from(CASE_KINDS))
    if kind == "mc":
        return draw(mc_cases())
    if kind == "invalid":
        return draw(segment_cases(poison=True))
    if kind == "message":
        return draw(message_cases())
    return draw(segment_cases())


# ====================================================================================== oracle helpers
def oracle_starts(numels: Sequence[int], bucket_size: int) -> np.ndarray:
    """Bucket start offsets plus the total (computed here, not with the quantizer's helper)."""
    starts, off = [], 0
    for n in numels:
        starts.extend(range(off, off + n, bucket_size))
        off += n
    return np.asarray([*starts, off], dtype=np.int64)


def _bucket_of(starts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(starts) - 1), np.diff(starts))


def _l2_norms64(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    if len(starts) < 2:
        return np.zeros(0)
    return np.sqrt(np.add.reduceat(x64 * x64, starts[:-1])) if x64.size else np.zeros(len(starts) - 1)


def expected_error(x: np.ndarray, numels: Sequence[int], config: QuantizerConfig) -> str | None:
    """What quantizing the float32 ``x`` must do: ``None`` (succeed), ``nonfinite`` (NaN/Inf:
    ``NonFiniteError``), ``overflow`` (an L2 bucket norm rounds to inf in float32: ``ValueError``),
    ``both`` (either error type), ``borderline`` (a norm within 1e-9 of the overflow threshold, where the
    summation order decides: not checked)."""
    nonfinite = not bool(np.isfinite(x).all())
    overflow = False
    if config.norm is Norm.L2 and x.size:
        norms = _l2_norms64(np.where(np.isfinite(x), x, 0.0), oracle_starts(numels, config.bucket_size))
        if (np.abs(norms / F32_OVERFLOW - 1.0) < 1e-9).any():
            return "borderline"
        overflow = bool((norms >= F32_OVERFLOW).any())
    if nonfinite and overflow:
        return "both"
    return "nonfinite" if nonfinite else "overflow" if overflow else None


def _intervals(u: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(j_lo, j_hi)``: the intervals ``[l_j, l_{j+1}]`` that the kernels' float32 ``u`` can fall in.

    ``u`` (float64, exact) is widened by the kernels' rounding (relative ``U_REL``, absolute one subnormal
    ulp for a subnormal ``u``); the level index of a code must then lie in ``[j_lo, j_hi + 1]``.
    """
    s = len(levels) - 2
    lo = np.clip(np.searchsorted(levels, u * (1 - U_REL) - 2 * TINY, side="right") - 1, 0, s)
    hi = np.clip(np.searchsorted(levels, np.minimum(u * (1 + U_REL) + 2 * TINY, 1.0), side="right") - 1, 0, s)
    return lo, hi


# ====================================================================================== segment properties
@dataclass
class _Seg:
    """A valid segment case quantized once on the CPU (shared by the checks)."""

    case: SegmentCase
    x: np.ndarray  # float32 coordinates
    starts: np.ndarray
    q: QuantizedTensor

    @property
    def config(self) -> QuantizerConfig:
        return self.case.config


def _bits_equal(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """Where two tensors first differ bitwise (for failure messages)."""
    a, b = a.reshape(-1).numpy(), b.reshape(-1).numpy()
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    as_int = f"u{a.dtype.itemsize}"
    bad = np.flatnonzero(a.view(as_int) != b.view(as_int))
    return f"first difference at {bad[0]}: {a[bad[0]]!r} vs {b[bad[0]]!r}" if bad.size else "equal"


def check_roundtrip(s: _Seg) -> None:
    """(a) decode(encode(q)) == q bit for bit; the fused encoder's bytes; decode_into == q.dequantize()."""
    cfg, q = s.config, s.q
    x, numels = s.case.inputs()
    enc = encode(q)
    fused = encode_tensor(x, cfg, s.case.seed, layer_numels=numels)
    _fail("roundtrip", _bits_equal(enc.data, fused.data), "encode_tensor bytes differ from encode(quantize(x))")
    _fail("roundtrip", enc.bits == fused.bits, f"bits {enc.bits} (encode) vs {fused.bits} (encode_tensor)")
    dirty = np.full(len(enc) + 13, 0xA5, dtype=np.uint8)
    reused = encode_tensor(x, cfg, s.case.seed, layer_numels=numels, out=dirty)
    _fail("roundtrip", _bits_equal(reused.data, enc.data) and (dirty[len(enc) :] == 0xA5).all(),
          "encode_tensor(out=reused buffer) differs or writes past the segment")  # fmt: skip
    d = decode(enc.data.tobytes(), cfg, q.shapes)
    _fail("roundtrip", torch.equal(d.codes, q.codes), f"decoded codes: {_first_diff(d.codes, q.codes)}")
    _fail("roundtrip", _bits_equal(d.norms, q.norms), f"decoded norms: {_first_diff(d.norms, q.norms)}")
    _fail("roundtrip", d.layer_numels == q.layer_numels and d.shapes == q.shapes, "layer sizes or shapes differ")
    want_dtype = q.dtype if q.dtype in DTYPES else torch.float32
    _fail("roundtrip", d.dtype == want_dtype, f"source dtype {d.dtype}, encoded {want_dtype}")
    deq = q.dequantize()
    _fail("roundtrip", _bits_equal(d.dequantize(), deq), "decoded dequantize() differs")
    out = torch.full((q.numel,), float("nan"))
    decode_into(enc.data, cfg, out, accumulate=False)
    _fail("roundtrip", _bits_equal(out, deq), f"decode_into(accumulate=False): {_first_diff(out, deq)}")
    base = torch.linspace(-3.0, 5.0, q.numel)
    acc = base.clone()
    decode_into(enc.data, cfg, acc, accumulate=True)
    _fail("roundtrip", _bits_equal(acc, base + deq), f"decode_into(accumulate=True): {_first_diff(acc, base + deq)}")
    strided = torch.full((2 * q.numel,), 7.0)[::2]
    decode_into(enc.data, cfg, strided, accumulate=False)
    _fail("roundtrip", _bits_equal(strided.contiguous(), deq), "decode_into into a strided output differs")


def check_bits(s: _Seg) -> None:
    """(b) Encoded.bits is the payload's exact size and matches the code-length functions."""
    cfg, q = s.config, s.q
    enc = encode(q)
    n, numels = q.numel, list(q.layer_numels)
    n_buckets = len(s.starts) - 1
    if cfg.coding is Coding.FIXED:
        padding = (-n * cfg.bits) % 8
        _fail("bits", enc.bits == 8 * len(enc) - padding, f"bits {enc.bits} != 8 * {len(enc)} - {padding}")
        _fail("bits", enc.bits == fixed_code_length(numels, cfg), f"bits {enc.bits} != fixed_code_length")
        size = fixed_segment_header(cfg, q.dtype, numels).size
        _fail("bits", size == len(enc), f"fixed_segment_header size {size} != {len(enc)} bytes")
        return
    _fail("bits", enc.bits == 8 * len(enc), f"entropy-coded bits {enc.bits} != 8 * {len(enc)}")
    stream = enc.bits - overhead_bits(len(numels), n_buckets) - 16 * 2 * cfg.levels.num_levels
    if n == 0:
        _fail("bits", stream == 64, f"empty segment: {stream} stream bits, expected the 64-bit state")
        return
    counts = np.bincount(q.codes.numpy(), minlength=2 * cfg.levels.num_levels)
    bound = rans.code_length_bound(counts)
    p = counts[counts > 0] / n
    entropy = n * float(-(p * np.log2(p)).sum())
    _fail("bits", stream <= bound, f"rANS stream {stream} bits > code_length_bound {bound:.1f}")
    _fail("bits", stream >= entropy - 1e-6 * n, f"rANS stream {stream} bits < empirical entropy {entropy:.1f}")


def check_backends(s: _Seg) -> None:
    """(c) The numba kernel and the torch path quantize identically (codes, norms, dequantized values)."""
    x, numels = s.case.inputs()
    qt = quantize(x, s.config, s.case.seed, backend="torch", layer_numels=numels)
    _fail("backends", torch.equal(qt.codes, s.q.codes), f"codes: {_first_diff(qt.codes, s.q.codes)}")
    _fail("backends", _bits_equal(qt.norms, s.q.norms), f"norms: {_first_diff(qt.norms, s.q.norms)}")
    a, b = qt.dequantize(backend="torch"), s.q.dequantize()
    _fail("backends", _bits_equal(a, b), f"dequantize: {_first_diff(a, b)}")


def _norm_per_coordinate(s: _Seg) -> tuple[np.ndarray, np.ndarray]:
    norms = s.q.norms.numpy().astype(np.float64)
    return norms, norms[_bucket_of(s.starts)]


def check_error_bound(s: _Seg) -> None:
    """(e) Norms are right; each code is ``l_j`` or ``l_{j+1}`` of ``u_i``'s interval; L-inf error bound.

    ``|Q(x)_i - x_i| <= norm (l_{j_hi+1} - l_{j_lo})`` holds exactly for ``Q = norm * l_k`` with
    ``k in [j_lo, j_hi + 1]`` (``x_i / norm`` lies in that range); the dequantized value adds one float32
    rounding (``U |Q|``) and one subnormal ulp.
    """
    cfg, q, x = s.config, s.q, s.x.astype(np.float64)
    norms, nb = _norm_per_coordinate(s)
    if cfg.norm is Norm.LINF:
        want = np.maximum.reduceat(np.abs(x), s.starts[:-1]) if x.size else np.zeros(0)
        _fail("error_bound", np.array_equal(norms, want), f"L-inf norms {norms[:8]} != max|x| {want[:8]}")
    else:
        want = _l2_norms64(s.x, s.starts)
        err = np.abs(norms - want)
        i = int(np.argmax(err)) if err.size else 0
        _fail("error_bound", bool((err <= 2 * U * want + TINY).all()),
              f"L2 norm of bucket {i}: {norms[i] if err.size else 0!r} vs {want[i] if err.size else 0!r}")  # fmt: skip
    if not x.size:
        return
    levels = cfg.levels.array.astype(np.float64)
    codes = q.codes.numpy().astype(np.int64)
    k, neg = codes >> 1, (codes & 1).astype(bool)
    u = np.where(nb > 0, np.abs(x) / np.where(nb > 0, nb, 1.0), 0.0)
    lo, hi = _intervals(u, levels)
    ok = (k >= lo) & (k <= hi + 1) & ((x != 0) | (codes == 0)) & (neg == ((x < 0) & (k > 0)))
    ok &= (nb > 0) | (codes == 0)
    if not ok.all():
        i = int(np.argmin(ok))
        raise PropertyFailure(
            "error_bound",
            f"coordinate {i}: x={x[i]!r}, norm={nb[i]!r}, u={u[i]!r}: code {codes[i]} (level {k[i]}), "
            f"allowed levels {lo[i]}..{hi[i] + 1} (sign {int(x[i] < 0)})",
        )
    deq = q.dequantize().numpy()
    exact = q.norms.numpy()[_bucket_of(s.starts)] * cfg.levels.array[k]  # float32 * float32: one rounding
    exact = np.where(neg, -exact, exact)
    _fail("error_bound", _bits_equal(deq, exact), "dequantize() != +-float32(norm * l_k)")
    bound = nb * (levels[hi + 1] - levels[lo]) + U * np.abs(deq) + TINY
    err = np.abs(deq.astype(np.float64) - x)
    if not (err <= bound).all():
        i = int(np.argmax(err - bound))
        raise PropertyFailure("error_bound", f"coordinate {i}: |Q - x| = {err[i]!r} > {bound[i]!r}")


def check_unbiased(s: _Seg, seeds: int = MC_SEEDS, copies: int = MC_COPIES) -> None:
    """(d) Monte-Carlo unbiasedness, with a bound valid for bounded variables (Hoeffding).

    ``N = seeds * copies`` samples: ``copies`` copies of the segment, each with the original layer
    structure (buckets restart at every layer, so each copy is bucketed as the original), quantized with
    ``seeds`` seeds.  Every coordinate of a segment draws its own uniform from the counter hash of
    (seed, index), so copies are independent samples just as seeds are.  Each sample of ``Q(x)_i`` lies in
    ``norm [l_{j_lo}, l_{j_hi+1}]`` (width ``W_i``), so by Hoeffding
    ``P(|mean_i - E Q_i| >= W_i sqrt(ln(2/delta) / 2N)) <= delta`` (``delta = HOEFFDING_DELTA``).

    ``|E Q_i - x_i|`` itself is bounded by float32 arithmetic: ``u`` carries a relative error below
    ``U_REL`` (see there), ``p = (u - l_j) / w`` a few roundings of ``u``, the rounding probability the
    ``2^-24`` grid of the uniforms (``rng`` docstring), and ``norm * l`` one rounding; together at most
    ``norm (2^-20 l_{j_hi+1} + 2^-24 W + 2^-146) + 2^-146``.
    """
    case, cfg = s.case, s.config
    n = s.x.size
    if n == 0 or n > MC_MAX_NUMEL:
        return
    tiled = torch.from_numpy(np.tile(s.x, copies))
    numels = case.numels * copies
    samples = []
    for k in range(seeds):
        qk = quantize(tiled, cfg, case.seed + 7919 * (k + 1), layer_numels=numels)
        samples.append(qk.dequantize().numpy().reshape(copies, n))
        if not _bits_equal(qk.norms.reshape(copies, -1)[0], s.q.norms):
            raise PropertyFailure("unbiased", "a copy of the segment got other bucket norms than the segment")
    vals = np.concatenate(samples).astype(np.float64)
    mean = vals.mean(axis=0)
    x = s.x.astype(np.float64)
    levels = cfg.levels.array.astype(np.float64)
    _, nb = _norm_per_coordinate(s)
    u = np.where(nb > 0, np.abs(x) / np.where(nb > 0, nb, 1.0), 0.0)
    lo, hi = _intervals(u, levels)
    width = nb * (levels[hi + 1] - levels[lo])
    n_samples = vals.shape[0]
    hoeffding = width * math.sqrt(math.log(2.0 / HOEFFDING_DELTA) / (2.0 * n_samples))
    rounding = nb * (2.0**-20 * levels[hi + 1] + 2.0**-146) + U * width + 2.0**-146
    dev = np.abs(mean - x)
    bound = hoeffding + rounding
    if not (dev <= bound).all():
        i = int(np.argmax(dev - bound))
        raise PropertyFailure(
            "unbiased",
            f"coordinate {i}: x={x[i]!r}, mean of {n_samples} samples {mean[i]!r}, |mean - x| = {dev[i]!r} > "
            f"{bound[i]!r} (norm {nb[i]!r}, levels {lo[i]}..{hi[i] + 1})",
        )


def check_invalid(case: SegmentCase, expected: str) -> None:
    """Invalid inputs raise the documented error on every path (CPU kernel, torch path, fused encoder)."""
    x, numels = case.inputs()
    paths = {
        "quantize": lambda: quantize(x, case.config, case.seed, layer_numels=numels),
        "quantize(backend=torch)": lambda: quantize(x, case.config, case.seed, backend="torch", layer_numels=numels),
        "encode_tensor": lambda: encode_tensor(x, case.config, case.seed, layer_numels=numels),
    }
    for name, fn in paths.items():
        try:
            fn()
        except NonFiniteError:
            _fail("invalid_input", expected in ("nonfinite", "both"), f"{name}: NonFiniteError for {expected} input")
        except ValueError as e:
            _fail("invalid_input", expected in ("overflow", "both") and "overflow" in str(e),
                  f"{name}: ValueError({str(e)[:80]!r}) for {expected} input")  # fmt: skip
        else:
            raise PropertyFailure("invalid_input", f"{name}: returned a result for a {expected} input")


SEGMENT_CHECKS = {
    "roundtrip": check_roundtrip,
    "bits": check_bits,
    "backends": check_backends,
    "error_bound": check_error_bound,
    "unbiased": check_unbiased,
}


def check_segment(case: SegmentCase, properties: Sequence[str] = PROPERTIES) -> tuple[list[str], dict[str, str]]:
    """Check every applicable property; returns ``(checked, failures)`` (property -> message).

    Any exception other than :class:`PropertyFailure` inside a property is that property's failure.
    """
    checked: list[str] = []
    failures: dict[str, str] = {}
    x = x32(case.layers).numpy()
    expected = expected_error(x, case.numels, case.config)
    if expected == "borderline":
        return checked, failures
    if expected is not None:
        if "invalid_input" in properties:
            checked.append("invalid_input")
            _run("invalid_input", lambda: check_invalid(case, expected), failures)
        return checked, failures
    try:
        xin, numels = case.inputs()
        q = quantize(xin, case.config, case.seed, layer_numels=numels)
    except Exception as e:  # a valid input must quantize
        failures["quantize"] = f"{type(e).__name__}: {e}"
        return ["quantize"], failures
    seg = _Seg(case, x, oracle_starts(case.numels, case.config.bucket_size), q)
    for prop, fn in SEGMENT_CHECKS.items():
        if prop in properties and (prop != "unbiased" or 0 < x.size <= MC_MAX_NUMEL):
            checked.append(prop)
            _run(prop, lambda fn=fn: fn(seg), failures)
    return checked, failures


def _run(prop: str, fn: Any, failures: dict[str, str]) -> None:
    try:
        fn()
    except PropertyFailure as e:
        failures[prop] = str(e)
    except Exception as e:  # not the documented behaviour either
        failures[prop] = f"{prop}: raised {type(e).__name__}: {str(e)[:300]}"


# ====================================================================================== messages
def check_message(case: MessageCase) -> None:
    """A layer-wise message decodes to each type's quantization (raw layers exactly); its bits add up.

    Types whose layers are invalid inputs must make ``encode`` raise (NaN/Inf: ``NonFiniteError``).
    """
    codec = LayerwiseCodec(case.plan)
    xs = list(case.tensors)
    expect: dict[int, str | None] = {}
    for k, g in enumerate(codec.groups):
        if g.config is not None:
            layers = [xs[i] for i in g.indices]
            expect[k] = expected_error(x32(layers).numpy(), [t.numel() for t in layers], g.config)
    bad = {e for e in expect.values() if e is not None}
    if bad:
        if "borderline" in bad:
            return
        try:
            codec.encode(xs, case.seed)
        except ValueError as e:
            _fail("message", isinstance(e, NonFiniteError) or "overflow" in str(e) or "both" in bad,
                  f"encode raised {type(e).__name__}({str(e)[:80]!r}) for {sorted(bad)} input")  # fmt: skip
            return
        raise PropertyFailure("message", f"encode returned a message for {sorted(bad)} input")
    msg = codec.encode(xs, case.seed)
    dec = codec.decode(msg.data)
    padding, seg_bits = 0, {}
    for k, g in enumerate(codec.groups):
        got = x32([dec[i] for i in g.indices])
        if g.config is None:
            want = x32([xs[i] for i in g.indices])
            _fail("message", _bits_equal(got, want), f"raw group: {_first_diff(got, want)}")
            seg_bits[g.name] = 8 * (HEADER_SIZE + 8 * len(g.numels) + 4 * g.numel)
            continue
        q = quantize([xs[i] for i in g.indices], g.config, segment_seed(case.seed, k))
        want = q.dequantize()
        _fail("message", _bits_equal(got, want), f"type {g.name}: {_first_diff(got, want)}")
        seg_bits[g.name] = encode(q).bits
        if g.config.coding is Coding.FIXED:
            padding += (-g.numel * g.config.bits) % 8
    _fail("message", msg.segment_bits == seg_bits, f"segment bits {msg.segment_bits} != {seg_bits}")
    _fail("message", msg.bits == 8 * len(msg) - padding, f"bits {msg.bits} != 8 * {len(msg)} - {padding}")
    size = codec.message_size()
    _fail("message", size is None or size == len(msg), f"message_size() {size} != {len(msg)}")
    outs = [torch.ones(e.shape) for e in case.plan.entries]
    codec.decode_into(msg.data, outs, accumulate=True)
    for o, d in zip(outs, dec, strict=True):
        _fail("message", _bits_equal(o.reshape(-1), (1.0 + d).reshape(-1)), "decode_into(accumulate=True) differs")
    if size is not None:
        dirty = np.full(size + 11, 0x3C, dtype=np.uint8)
        again = codec.encode_flats(codec.gather(xs), case.seed, out=dirty)
        _fail("message", _bits_equal(again.data, msg.data) and (dirty[size:] == 0x3C).all(),
              "encode_flats(out=reused buffer) differs or writes past the message")  # fmt: skip


def check_case(case: SegmentCase | MessageCase, properties: Sequence[str] = PROPERTIES) -> tuple[list[str], dict]:
    """``(checked properties, failures)`` of any drawn case."""
    if isinstance(case, MessageCase):
        if "message" not in properties:
            return [], {}
        failures: dict[str, str] = {}
        _run("message", lambda: check_message(case), failures)
        return ["message"], failures
    return check_segment(case, properties)


def assert_case(case: SegmentCase | MessageCase, properties: Sequence[str] = PROPERTIES) -> list[str]:
    """Raise ``AssertionError`` naming every failing property (for tests); returns the checked ones."""
    checked, failures = check_case(case, properties)
    if failures:
        raise AssertionError("; ".join(failures.values()))
    return checked


# ====================================================================================== counting mode
@dataclass
class GeneratedResult:
    """Counts of a generated run: cases, checks and failures by property, first failing inputs."""

    cases: int = 0
    kinds: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    failing_cases: int = 0
    examples: dict[str, list[dict]] = field(default_factory=dict)
    harness_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    keep: int = 3

    def add(self, case: SegmentCase | MessageCase, checked: Sequence[str], failures: dict[str, str]) -> None:
        self.cases += 1
        self.kinds["message" if isinstance(case, MessageCase) else "invalid" if case.poison else "segment"] += 1
        self.checks.update(checked)
        if failures:
            self.failing_cases += 1
            self.failures.update(failures.keys())
            for prop, msg in failures.items():
                kept = self.examples.setdefault(prop, [])
                if len(kept) < self.keep:
                    kept.append({"message": msg[:600], "case": describe(case)})

    def merge(self, other: dict[str, Any]) -> None:
        self.cases += other["generated_cases"]
        self.kinds.update(other["kinds"])
        self.checks.update(other["checks"])
        self.failures.update(other["failures_by_property"])
        self.failing_cases += other["failing_cases"]
        for prop, kept in other["examples"].items():
            mine = self.examples.setdefault(prop, [])
            mine.extend(kept[: max(0, self.keep - len(mine))])
        self.harness_errors.extend(other["harness_errors"])

    @property
    def ok(self) -> bool:
        return self.failing_cases == 0 and not self.harness_errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_cases": self.cases, "failing_cases": self.failing_cases,
            "failures_by_property": dict(sorted(self.failures.items())), "checks": dict(sorted(self.checks.items())),
            "kinds": dict(sorted(self.kinds.items())), "harness_errors": self.harness_errors[:10],
            "seconds": round(self.seconds, 3), "examples": self.examples,
        }  # fmt: skip


def run_chunk(seed: int, index: int, cases: int) -> dict[str, Any]:
    """``cases`` generated cases from Hypothesis seeded with ``(seed, index)``, in counting mode."""
    torch.set_num_threads(1)
    res = GeneratedResult()

    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)  # fmt: skip
    @hypothesis_seed(seed * 1_000_003 + index)
    @given(any_cases())
    def body(case: SegmentCase | MessageCase) -> None:
        checked, failures = check_case(case)
        res.add(case, checked, failures)

    try:
        body()
    except Exception as e:  # a failure of the generator itself: reported, never a silent pass
        res.harness_errors.append(f"chunk {index}: {type(e).__name__}: {str(e)[:300]}")
    return res.as_dict()


def _chunk_job(args: tuple[int, int, int]) -> dict[str, Any]:
    return run_chunk(*args)


def run_generated(
    cases: int = 100_000, seed: int = 0, workers: int | None = None, chunk: int = 2_000, log: Any = None
) -> GeneratedResult:
    """Check ``cases`` generated cases against every property in counting mode (failures are counted,
    the first few failing inputs kept, the run goes on), in ``workers`` processes (default: the CPUs,
    at most 4).  Reproducible from ``seed``."""
    t0 = time.perf_counter()
    res = GeneratedResult()
    workers = max(1, min(4, os.cpu_count() or 1)) if workers is None else workers
    index = 0
    while res.cases < cases and len(res.harness_errors) < 10:
        jobs = []
        remaining = cases - res.cases
        while remaining > 0:
            n = min(chunk, remaining)
            jobs.append((seed, index, n))
            index += 1
            remaining -= n
        if workers == 1:
            outs: Any = map(_chunk_job, jobs)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers)
            outs = pool.imap_unordered(_chunk_job, jobs)
        try:
            for out in outs:
                before = res.cases
                res.merge(out)
                if log is not None and res.cases // 10_000 > before // 10_000:
                    secs = time.perf_counter() - t0
                    log(f"  {res.cases} generated cases, {res.failing_cases} failing ({secs:.0f} s)")
        except Exception as e:  # a crashed worker: counted, the run stops here
            res.harness_errors.append(f"worker failed: {type(e).__name__}: {e}")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    res.seconds = time.perf_counter() - t0
    return res
