"""torch.optim optimizers for VIs and min-max games, and a registry to build them by name.

Every registered optimizer's class is exported here under its own name (``from qoda.optim import
QODA``), looked up in :data:`~qoda.optim.factory.OPTIMIZERS` when asked for: registering a new one
is all it takes (``tests/test_new_optimizer.py`` does it).
"""

from typing import Any

from qoda.optim.factory import OPTIMIZERS as OPTIMIZERS
from qoda.optim.factory import OptimizerSpec as OptimizerSpec
from qoda.optim.factory import create_optimizer as create_optimizer


def _classes() -> dict[str, type]:
    return {spec.cls.__name__: spec.cls for spec in OPTIMIZERS.values()}


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return ["OPTIMIZERS", "OptimizerSpec", "create_optimizer", *sorted(_classes())]
    try:
        return _classes()[name]
    except KeyError:
        raise AttributeError(f"module 'qoda.optim' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_classes()})
