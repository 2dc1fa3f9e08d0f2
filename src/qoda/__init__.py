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

from qoda.utils.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it; every registered optimizer class comes from qoda.optim's
# own exports (its registry), so adding an optimizer changes nothing here
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
    "load_generator": "qoda.train.sample",
}

# __all__: these, every name of qoda.optim.__all__ (the registry, create_optimizer and each optimizer) and
# __version__, computed on first use (one list: type checkers read the names through __getattr__)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, star=("qoda.optim",), also=("__version__",))

