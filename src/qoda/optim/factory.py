"""A small registry: one way to build any optimizer by name (timm-style frozen specs)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from qoda.optim.adam import ExtraAdam, OptimisticAdam, SimultaneousAdam
from qoda.optim.base import Averager, VIOptimizer
from qoda.optim.dual_averaging import QODA, QGenX
from qoda.optim.gradient import GDA, ExtraGradient, OptimisticGradient


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer and its capabilities.

    :attr:`calls_per_iteration`: oracle calls = exchanges per iteration, the class's own
    (:class:`~qoda.optim.base.TwoCallOptimizer`: 2).
    ``trains_gans``: offered by the GAN trainer (the constant-step VI baselines are not).
    :attr:`options`: the keyword arguments the constructor accepts (read from its signature).
    ``variants``: named option sets that change the method (QODA's preconditionings and rate
    rules); the generic optimizer tests (``tests/test_optim_contract.py``) run on every one.
    """

    name: str
    cls: type[VIOptimizer]
    description: str
    trains_gans: bool = False
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}}, compare=False)

    @property
    def calls_per_iteration(self) -> int:
        return self.cls.calls_per_iteration

    @property
    def options(self) -> frozenset[str]:
        params = inspect.signature(self.cls.__init__).parameters
        return frozenset(n for n in params if n not in ("self", "params", "averager"))


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec(
            "qoda", QODA, "quantized optimistic dual averaging (Adam-preconditioned by default)", True,
            {"adam": {}, "none": {"precondition": "none"}, "single": {"precondition": "none", "rate": "single"},
             "coordinate": {"precondition": "none", "scope": "coordinate"}},
        ),
        OptimizerSpec("qgenx", QGenX, "quantized generalised extra-gradient, dual averaging, adaptive rate", True),
        OptimizerSpec("gda", GDA, "simultaneous gradient descent-ascent, constant step"),
        OptimizerSpec("eg", ExtraGradient, "extra-gradient, constant step"),
        OptimizerSpec("og", OptimisticGradient, "optimistic gradient (Popov), constant step"),
        OptimizerSpec("extra_adam", ExtraAdam, "extra-gradient with Adam steps (Gidel et al. 2019)", True),
        OptimizerSpec("optimistic_adam", OptimisticAdam, "optimistic Adam (Daskalakis et al. 2018)", True),
        OptimizerSpec("adam", SimultaneousAdam, "simultaneous Adam on both players (GAN baseline)", True),
    )
}


def optimizer_variants() -> list[tuple[str, str, dict[str, Any]]]:
    """Every registered variant as ``(id, name, options)``: ``("qoda-none", "qoda", {"precondition": "none"})``."""
    return [
        (name if len(spec.variants) == 1 else f"{name}-{v}", name, dict(options))
        for name, spec in OPTIMIZERS.items()
        for v, options in spec.variants.items()
    ]


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def resolve_name(name: str) -> str:
    """The registry name of ``name``, matched as timm does: case-insensitively, ignoring ``_``
    and ``-`` (``"ExtraAdam"``, ``"extra-adam"`` and ``"extra_adam"`` are one optimizer)."""
    found = {_key(n): n for n in OPTIMIZERS}.get(_key(name)) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"optimizer: unknown name {name!r}, expected one of {sorted(OPTIMIZERS)}")
    return found


def create_optimizer(
    name: str, params: Iterable[torch.Tensor], averager: Averager | None = None, **kwargs: Any
) -> VIOptimizer:
    """Build the optimizer ``name`` (see :data:`OPTIMIZERS` and :func:`resolve_name`)."""
    return OPTIMIZERS[resolve_name(name)].cls(params, averager=averager, **kwargs)
