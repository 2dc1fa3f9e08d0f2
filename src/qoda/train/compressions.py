"""The trainer's ``--compression`` choices: a registry of frozen specs (timm-style).

Every place that needs to know something about a compression (config validation, the averager
factory in :mod:`qoda.train.compression`, the DDP hooks of :mod:`qoda.train.ddp`, the CLI help,
the bits on the wire that the trainer reports and the benchmarks record) reads it here; nobody
keeps a list of names, and nobody branches on a name.

Each entry carries its two builders and their options:

* ``averager`` - ``"module:function"`` building the GAN's averager,
  ``function(cfg, players, group, seed, **options) -> Averager``;
* ``hook`` - ``"module:function"`` building the language model's DDP hook,
  ``function(cfg, model, world, **options) -> CommHook``;
* ``options`` - the keyword arguments both receive (a level family, an all-reduce's precision, a
  :class:`~qoda.codec.compressor.Compressor` class and its settings, ...).

Builders are named by import path, resolved when called, because they read the trainer's config
(:mod:`qoda.train.config`), which reads this registry.  A new compressor is one class implementing
:class:`~qoda.codec.compressor.Compressor` (built as ``cls(shapes, **settings)``), one entry here
with ``options={"compressor": cls, **settings}`` (the default builders average it with
:class:`~qoda.comm.compressed.CompressedAverager`) and its test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qoda.codec.topk import TopK

#: The builders of an entry whose ``options`` name a compressor class.
COMPRESSOR_AVERAGER = "qoda.train.compression:compressor_averager"
COMPRESSOR_HOOK = "qoda.train.ddp:compressor_hook"


def resolve(path: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class CompressionSpec:
    """One ``--compression`` choice.

    ``levels``: the quantizer's level family (a name of :data:`qoda.quant.levels.LEVEL_FAMILIES`)
    or ``fitted`` (ALQ levels re-fitted on a schedule, starting from uniform ones); ``None`` for
    the choices that do not quantize with a layer plan.  ``layerwise``: one level set per layer
    type (``--layer-types``) instead of one for all.  ``bits``: bits per coordinate on the wire of
    the choices without a width (32, 16; ``None``: counted in bytes only, e.g. PowerSGD).
    """

    name: str
    help: str
    averager: str = COMPRESSOR_AVERAGER
    hook: str = COMPRESSOR_HOOK
    options: Mapping[str, Any] = field(default_factory=dict)
    levels: str | None = None
    layerwise: bool = False
    bits: float | None = None

    @property
    def quantized(self) -> bool:
        """Whether it quantizes with a layer plan (qoda's layer-wise codec)."""
        return self.levels is not None

    @property
    def adaptive(self) -> bool:
        return self.levels == "fitted"

    def wire_bits(self, bits: float) -> float | None:
        """Bits per coordinate on the wire: ``bits`` when quantized, else the entry's own (``None``
        when its size depends on the shapes, not on a width)."""
        return bits if self.quantized else self.bits

    def build_averager(self, cfg: Any, players: Any, group: Any, seed: int) -> Any:
        """The averager of this choice (:class:`~qoda.comm.averager.Averager`)."""
        return resolve(self.averager)(cfg, players, group, seed, **self.options)

    def build_hook(self, cfg: Any, model: Any, world: int) -> Any:
        """The DDP hook of this choice (:class:`~qoda.train.ddp.CommHook`)."""
        return resolve(self.hook)(cfg, model, world, **self.options)


_ALLREDUCE = {"averager": "qoda.train.compression:allreduce_averager", "hook": "qoda.train.ddp:allreduce_hook"}
_QUANTIZED = {"averager": "qoda.train.compression:quantized_averager", "hook": "qoda.train.ddp:quantized_hook"}

COMPRESSIONS: dict[str, CompressionSpec] = {
    s.name: s
    for s in (
        CompressionSpec("none", "fp32 all-reduce", **_ALLREDUCE, options={"precision": "fp32"}, bits=32),
        CompressionSpec("fp16", "fp16 all-reduce", **_ALLREDUCE, options={"precision": "fp16"}, bits=16),
        CompressionSpec(
            "powersgd", "PyTorch's PowerSGD hook (low rank, error feedback)",
            averager="qoda.train.compression:powersgd_averager", hook="qoda.train.ddp:powersgd_hook",
        ),
        CompressionSpec("qsgd", "one uniform level set (QSGD), L2 buckets", **_QUANTIZED, levels="uniform"),
        CompressionSpec("nuqsgd", "one exponential level set (NUQSGD), L2 buckets", **_QUANTIZED, levels="exponential"),
        CompressionSpec("global_adaptive", "one ALQ level set fitted to all tensors", **_QUANTIZED, levels="fitted"),
        CompressionSpec(
            "layerwise_adaptive", "one fitted level set per layer type", **_QUANTIZED, levels="fitted", layerwise=True
        ),
        CompressionSpec(
            "topk", "the 1% largest-magnitude coordinates, an int32 index and a float32 value each (no error feedback)",
            options={"compressor": TopK, "fraction": 0.01},
        ),
    )
}
