"""qoda: layer-wise unbiased gradient quantization, compressed collectives and QODA.

What a user needs, importable from the top level (loaded on first use, so ``import qoda``
stays light; Lightning and accelerate are only imported by :mod:`qoda.integrations`)::

    from qoda import LayerPolicy, QuantizerConfig, QodaHookState, qoda_hook

    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4)), mode="allgather")
    state.register(ddp_model)  # or ddp_model.register_comm_hook(state, qoda_hook) (global policies)

Packages: ``quant`` (pure tensor maths), ``codec`` (wire format), ``comm`` (averaging over a
ProcessGroup, DDP hook), ``optim`` (VI / min-max optimizers), ``vi`` (monotone-VI suite),
``gan`` and ``lm`` (models), ``integrations`` (Lightning, accelerate), ``report`` and ``bench``
(jobs behind the ``qoda`` command).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qoda.utils.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "QuantizerConfig": "qoda.quant.config",
    "LevelSet": "qoda.quant.levels",
    "LayerPolicy": "qoda.quant.policy",
    "AdaptConfig": "qoda.quant.adapt",
    "RefitSchedule": "qoda.quant.adapt",
    "QodaHookState": "qoda.comm.ddp_hook",
    "qoda_hook": "qoda.comm.ddp_hook",
    "Aggregator": "qoda.comm.aggregate",
    "AggregationError": "qoda.comm.aggregate",
    "CommStats": "qoda.comm.aggregate",
    "Mode": "qoda.comm.aggregate",
    "create_optimizer": "qoda.optim",
    "OPTIMIZERS": "qoda.optim",
    "OptimizerSpec": "qoda.optim",
    "QODA": "qoda.optim",
    "QGenX": "qoda.optim",
    "GDA": "qoda.optim",
    "ExtraGradient": "qoda.optim",
    "OptimisticGradient": "qoda.optim",
    "ExtraAdam": "qoda.optim",
    "OptimisticAdam": "qoda.optim",
    "SimultaneousAdam": "qoda.optim",
    "load_generator": "qoda.train.sample",
}

__all__ = [
    "GDA", "OPTIMIZERS", "QODA", "AdaptConfig", "AggregationError", "Aggregator", "CommStats", "ExtraAdam",
    "ExtraGradient", "LayerPolicy", "LevelSet", "Mode", "OptimisticAdam", "OptimisticGradient", "OptimizerSpec",
    "QGenX", "QodaHookState", "QuantizerConfig", "RefitSchedule", "SimultaneousAdam", "__version__",
    "create_optimizer", "load_generator", "qoda_hook",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from qoda.comm.aggregate import AggregationError, Aggregator, CommStats, Mode
    from qoda.comm.ddp_hook import QodaHookState, qoda_hook
    from qoda.optim import (
        GDA,
        OPTIMIZERS,
        QODA,
        ExtraAdam,
        ExtraGradient,
        OptimisticAdam,
        OptimisticGradient,
        OptimizerSpec,
        QGenX,
        SimultaneousAdam,
        create_optimizer,
    )
    from qoda.quant.adapt import AdaptConfig, RefitSchedule
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.levels import LevelSet
    from qoda.quant.policy import LayerPolicy
    from qoda.train.sample import load_generator
