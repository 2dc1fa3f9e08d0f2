"""torch.optim optimizers for VIs and min-max games, and a registry to build them by name.

Every registered optimizer's class is exported here under its own name (``from qoda.optim import
QODA``), read from :data:`~qoda.optim.factory.OPTIMIZERS`: registering a new one is all it takes.
"""

from qoda.optim.factory import OPTIMIZERS, OptimizerSpec, create_optimizer

globals().update({spec.cls.__name__: spec.cls for spec in OPTIMIZERS.values()})

__all__ = ["OPTIMIZERS", "OptimizerSpec", "create_optimizer", *sorted(s.cls.__name__ for s in OPTIMIZERS.values())]
