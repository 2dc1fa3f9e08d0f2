"""Layer-wise policy: parameter -> type -> quantizer settings.

A *type* groups layers that share one level set (docs/method.md section 2: ``M = 1`` is global
quantization, ``M = number of layers`` fully per-layer).  The policy decides, for every
parameter of a model, either a type name or ``None`` (sent uncompressed as float32).

Presets:

* :meth:`LayerPolicy.global_` - one type for everything;
* :meth:`LayerPolicy.per_layer` - one type per parameter;
* :meth:`LayerPolicy.by_module_class` - types ``conv``, ``linear``, ``embedding``, ``norm``,
  ``bias``, ``other`` from the owning module's class;
* :meth:`LayerPolicy.by_name` - user rules (regular expressions on the parameter name,
  first match wins), falling back to another mode.

Exclusions (defaults): tensors with fewer than ``min_numel = 1024`` coordinates, and 1-D
tensors (biases, norm scales) unless ``compress_1d``, go uncompressed: they are a tiny share
of the bytes and the most sensitive to noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn

from qoda.quant.config import QuantizerConfig

DEFAULT_MIN_NUMEL = 1024


class LayerKind(StrEnum):
    CONV = "conv"
    LINEAR = "linear"
    EMBEDDING = "embedding"
    NORM = "norm"
    BIAS = "bias"
    OTHER = "other"


_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def layer_kind(module: nn.Module, param_name: str) -> LayerKind:
    """The kind of a parameter from its owning module's class and its local name."""
    if param_name == "bias" or param_name.endswith("_bias"):
        return LayerKind.BIAS
    if isinstance(module, nn.modules.conv._ConvNd):
        return LayerKind.CONV
    if isinstance(module, nn.Linear | nn.Bilinear | nn.MultiheadAttention):
        return LayerKind.LINEAR
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return LayerKind.EMBEDDING
    if isinstance(module, _NORMS):
        return LayerKind.NORM
    return LayerKind.OTHER


@dataclass(frozen=True)
class NameRule:
    """Parameters whose full name matches ``pattern`` (``re.search``) get type ``type_name``;
    ``type_name=None`` sends them uncompressed."""

    pattern: str
    type_name: str | None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"rules.pattern: invalid regular expression {self.pattern!r}: {e}") from None


@dataclass(frozen=True)
class LayerEntry:
    """One parameter in the plan."""

    name: str
    shape: torch.Size
    type_name: str | None  # None: uncompressed

    @property
    def numel(self) -> int:
        return int(self.shape.numel())


@dataclass(frozen=True)
class LayerPlan:
    """The policy applied to one model: ordered entries and each type's config."""

    entries: tuple[LayerEntry, ...]
    configs: Mapping[str, QuantizerConfig]

    @property
    def types(self) -> tuple[str, ...]:
        """Type names in order of first appearance."""
        seen: dict[str, None] = {}
        for e in self.entries:
            if e.type_name is not None:
                seen.setdefault(e.type_name)
        return tuple(seen)

    def widths(self) -> dict[str, int]:
        """Code bits per coordinate of every compressed tensor, by name (uncompressed ones absent)."""
        return {e.name: self.configs[e.type_name].bits for e in self.entries if e.type_name is not None}

    def indices(self, type_name: str | None) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.type_name == type_name]

    def fingerprint(self) -> str:
        """A string that differs whenever names, shapes, types or settings differ."""
        parts = [f"{e.name}:{tuple(e.shape)}:{e.type_name}" for e in self.entries]
        for t in self.types:
            c = self.configs[t]
            parts.append(f"{t}={c.levels.level_set_id:08x}/{c.bucket_size}/{c.norm.value}/{c.coding.value}")
        return "|".join(parts)


@dataclass(frozen=True)
class LayerPolicy:
    """Maps parameters to types and types to :class:`QuantizerConfig`.

    Attributes:
        mode: ``global``, ``per_layer``, ``module_class``: how types are named when no rule matches.
        default: config of every type without an entry in ``configs``.
        configs: per-type configs (for ``module_class`` the keys are :class:`LayerKind` values).
        rules: name rules, tried first in every mode.
        min_numel: tensors with fewer coordinates go uncompressed.
        compress_1d: quantize 1-D tensors too (default: send them uncompressed).
    """

    mode: str = "global"
    default: QuantizerConfig = field(default_factory=QuantizerConfig)
    configs: Mapping[str, QuantizerConfig] = field(default_factory=dict)
    rules: tuple[NameRule, ...] = ()
    min_numel: int = DEFAULT_MIN_NUMEL
    compress_1d: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("global", "per_layer", "module_class"):
            raise ValueError(f"mode: expected 'global', 'per_layer' or 'module_class', got {self.mode!r}")
        if not isinstance(self.default, QuantizerConfig):
            raise TypeError("default: expected a QuantizerConfig")
        for k, v in self.configs.items():
            if not isinstance(v, QuantizerConfig):
                raise TypeError(f"configs[{k!r}]: expected a QuantizerConfig, got {type(v).__name__}")
        object.__setattr__(self, "configs", dict(self.configs))
        object.__setattr__(self, "rules", tuple(self.rules))
        for i, r in enumerate(self.rules):
            if not isinstance(r, NameRule):
                raise TypeError(f"rules[{i}]: expected a NameRule")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel: must be a non-negative int, got {self.min_numel!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def global_(cls, config: QuantizerConfig, **kw: object) -> LayerPolicy:
        return cls("global", config, **kw)  # type: ignore[arg-type]

    @classmethod
    def per_layer(cls, config: QuantizerConfig, **kw: object) -> LayerPolicy:
        return cls("per_layer", config, **kw)  # type: ignore[arg-type]

    @classmethod
    def by_module_class(
        cls, default: QuantizerConfig, configs: Mapping[str | LayerKind, QuantizerConfig] | None = None, **kw: object
    ) -> LayerPolicy:
        named = {LayerKind(k).value: v for k, v in (configs or {}).items()}
        return cls("module_class", default, named, **kw)  # type: ignore[arg-type]

    @classmethod
    def by_name(
        cls,
        rules: Iterable[tuple[str, str | None]],
        default: QuantizerConfig,
        configs: Mapping[str, QuantizerConfig] | None = None,
        fallback: str = "global",
        **kw: object,
    ) -> LayerPolicy:
        return cls(fallback, default, dict(configs or {}), tuple(NameRule(p, t) for p, t in rules), **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ assignment
    def type_of(self, name: str, module: nn.Module, local: str, param: torch.Tensor) -> str | None:
        for r in self.rules:
            if re.search(r.pattern, name):
                return r.type_name
        if param.numel() < self.min_numel or (param.dim() <= 1 and not self.compress_1d):
            return None
        if self.mode == "global":
            return "global"
        if self.mode == "per_layer":
            return name
        return layer_kind(module, local).value

    def config_for(self, type_name: str) -> QuantizerConfig:
        return self.configs.get(type_name, self.default)

    def plan(self, model: nn.Module, only_trainable: bool = True) -> LayerPlan:
        """Apply the policy to ``model``'s parameters (in ``named_parameters`` order)."""
        entries = []
        seen: set[int] = set()
        for mod_name, module in model.named_modules():
            for local, p in module.named_parameters(recurse=False):
                if (only_trainable and not p.requires_grad) or id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{mod_name}.{local}" if mod_name else local
                entries.append(LayerEntry(name, p.shape, self.type_of(name, module, local, p)))
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        entries.sort(key=lambda e: order.get(e.name, len(order)))
        types = {e.type_name for e in entries if e.type_name is not None}
        return LayerPlan(tuple(entries), {t: self.config_for(t) for t in types})
