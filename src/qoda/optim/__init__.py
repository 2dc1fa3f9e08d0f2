"""torch.optim optimizers for VIs and min-max games, and a registry to build them by name."""

from qoda.optim.adam import ExtraAdam, OptimisticAdam, SimultaneousAdam
from qoda.optim.dual_averaging import QODA, QGenX
from qoda.optim.factory import OPTIMIZERS, OptimizerSpec, create_optimizer
from qoda.optim.gradient import GDA, ExtraGradient, OptimisticGradient

__all__ = [
    "GDA", "OPTIMIZERS", "QODA", "ExtraAdam", "ExtraGradient", "OptimisticAdam", "OptimisticGradient",
    "OptimizerSpec", "QGenX", "SimultaneousAdam", "create_optimizer",
]  # fmt: skip
