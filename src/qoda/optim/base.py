"""Shared machinery of the VI / min-max optimizers.

Sign convention (once for all optimizers): every parameter's ``.grad`` holds the gradient
of *its own player's loss*, so the concatenated grads are the VI operator
``V = (grad_theta L_theta, grad_phi L_phi)`` and every optimizer *descends* along it.  For a
zero-sum game ``min_theta max_phi L`` the second player's loss is ``-L``.

Communication: an optional ``averager`` (the contract :class:`qoda.comm.averager.Averager`,
re-exported here; e.g. :class:`qoda.comm.aggregate.Aggregator`) averages the dual vector across
workers in place; each call is one *exchange*.  Optimizers count oracle calls, exchanges and bits sent
in their param group (so the counts live in ``state_dict()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from qoda.comm.averager import Averager

COUNTERS = ("oracle_calls", "exchanges", "bits_sent")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, int | float) or not ok or value != value:
        raise ValueError(f"{name}: must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


def check_group(i: int, g: dict[str, Any]) -> None:
    """Validate the per-group hyper-parameters a group may override (names the field)."""
    if "lr" in g:
        check_positive(f"param_groups[{i}].lr", g["lr"])
    if "eps" in g:
        check_positive(f"param_groups[{i}].eps", g["eps"])
    if "weight_decay" in g:
        check_positive(f"param_groups[{i}].weight_decay", g["weight_decay"], allow_zero=True)
    if "betas" in g:
        b = g["betas"]
        ok = isinstance(b, tuple | list) and len(b) == 2
        if not ok or not all(isinstance(v, int | float) and 0 <= v < 1 for v in b):
            raise ValueError(f"param_groups[{i}].betas: both must be in [0, 1), got {b!r}")


class VIOptimizer(Optimizer):
    """Base class: counters, the averaged dual vector, per-group learning rates.

    Parameter groups (for example one per player) may set their own ``lr`` (and, for the Adam
    variants, ``betas``/``eps``/``weight_decay``); everything global to the iteration (counters,
    the adaptive step-size sums, the iteration ``t``) lives in the first group, :attr:`group`.
    The dual vector is always the whole operator: one exchange averages every group's gradients.

    torch.optim habits that hold here: ``add_param_group`` (validated, state initialised),
    learning-rate schedulers (methods whose iterate is ``anchor + lr * (...)`` re-anchor when a
    group's ``lr`` changes, see :meth:`_lr_changes`), and parameters without ``.grad``: they
    count as a **zero** gradient (so every worker exchanges vectors of the same shape and
    replicas stay identical); a parameter that never receives a gradient never moves, as in
    torch, but one whose gradient disappears keeps its momentum (Adam variants) where torch
    would skip it.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], averager: Averager | None) -> None:
        self._initialised = False
        super().__init__(params, {**defaults, **dict.fromkeys(COUNTERS, 0), "t": 0})
        self.averager = averager
        for g in self.param_groups:
            g["lr_used"] = g.get("lr")
        self._initialised = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` plus validation and this optimizer's per-parameter state."""
        check_group(len(self.param_groups), param_group)
        super().add_param_group(param_group)
        if self._initialised:
            g = self.param_groups[-1]
            g["lr_used"] = g.get("lr")
            for p in g["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        """Per-parameter state a subclass needs before its first step (anchors, dual sums)."""

    def _lr_changes(self) -> list[tuple[dict[str, Any], float, float]]:
        """``(group, old lr, new lr)`` for every group whose ``lr`` changed since its last step
        (a scheduler or a user wrote it); records the new one as used."""
        changed = []
        for g in self.param_groups:
            old = g.get("lr_used", g["lr"])
            if g["lr"] != old:
                check_positive("lr", g["lr"])
                changed.append((g, old, g["lr"]))
            g["lr_used"] = g["lr"]
        return changed

    @property
    def group(self) -> dict[str, Any]:
        """The first parameter group: holds the counters and the global step-size state."""
        return self.param_groups[0]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def group_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The parameter group holding ``p``."""
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter is not managed by this optimizer")

    def _lrs(self) -> list[float]:
        """The learning rate of every parameter, in :attr:`params` order."""
        return [g["lr"] for g in self.param_groups for _ in g["params"]]

    @property
    def counters(self) -> dict[str, int]:
        return {k: self.group[k] for k in COUNTERS}

    def _dual(self) -> list[torch.Tensor]:
        """The averaged dual vector at the current point: one oracle call, one exchange."""
        params = self.params
        if params and all(p.grad is None for p in params):
            raise RuntimeError("step: no parameter has a .grad; call backward() first")
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        self.group["oracle_calls"] += 1
        if self.averager is not None:
            stats = self.averager.average_(grads, self.group["exchanges"])
            self.group["bits_sent"] += int(stats.payload_bits)
        self.group["exchanges"] += 1
        return grads

    @staticmethod
    def _sq(vs: list[torch.Tensor]) -> float:
        return float(sum(float(v.double().square().sum()) for v in vs))

    def _call(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class TwoCallOptimizer(VIOptimizer):
    """Extra-gradient style: ``extrapolation()`` at ``X_t``, then ``step()`` at ``X_{t+1/2}``.

    ``step(closure)`` does both (the closure must zero the grads, compute the loss and call
    backward).  ``X_t`` is kept in the state (``x_t``) between the two calls, so a checkpoint
    taken between them resumes exactly.
    """

    def extrapolation(self) -> None:
        if self.group.get("extrapolated", False):
            raise RuntimeError("extrapolation() called twice without step()")
        with torch.no_grad():
            for p in self.params:
                self.state[p]["x_t"] = p.detach().clone()
            self._extrapolate(self._dual())
        self.group["extrapolated"] = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            self._call(closure)
            self.extrapolation()
            loss = self._call(closure)
        if not self.group.get("extrapolated", False):
            raise RuntimeError("step(): call extrapolation() first (or pass a closure)")
        with torch.no_grad():
            self._update(self._dual())
        self.group["extrapolated"] = False
        self.group["t"] += 1
        return loss

    def _extrapolate(self, v: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _update(self, v: list[torch.Tensor]) -> None:
        raise NotImplementedError
