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

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from qoda.comm.averager import Averager, CommStats

COUNTERS = ("oracle_calls", "exchanges", "bits_sent")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, int | float) or not ok or value != value:
        raise ValueError(f"{name}: must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


def check_betas(name: str, betas: Any) -> None:
    """Adam's moment decays: two numbers in ``[0, 1)`` (the one check of every optimizer, group and config)."""
    ok = isinstance(betas, tuple | list) and len(betas) == 2
    if not ok or not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}: two numbers in [0, 1), got {betas!r}")


def lr_value(lr: Any) -> float:
    """A learning rate as a Python float: a number, or a one-element real tensor (as compiled and
    capturable torch optimizers and schedulers use), read at its current value."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.is_complex() and lr.dtype != torch.bool:
        return float(lr)
    return lr


def check_lr(name: str, lr: Any) -> None:
    """A learning rate must be a finite number ``>= 0`` (``0`` is a step that does not move) or a
    one-element real tensor holding one."""
    v = lr_value(lr)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: must be a finite number >= 0 (or a one-element tensor holding one), got {lr!r}")


class DetachedAverager(Averager):
    """What a copy (``copy.deepcopy``, ``pickle``) of an optimizer holds in place of its averager.

    An averager owns process-group handles and per-exchange state (adaptive levels, the
    exchange's quantization noise) that can neither be pickled nor be shared by two optimizers,
    so a copy does not carry it: its first exchange raises until one is attached
    (``opt.averager = ...``, or ``None`` to step without communicating)."""

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        raise RuntimeError(
            "averager: this optimizer is a copy (copy.deepcopy or pickle) made without its averager; "
            "attach one with `optimizer.averager = ...` (or None to step without communicating)"
        )


def check_group(i: int, g: dict[str, Any]) -> None:
    """Validate the per-group hyper-parameters a group may override (names the field)."""
    if "lr" in g:
        check_lr(f"param_groups[{i}].lr", g["lr"])
    if "eps" in g:
        check_positive(f"param_groups[{i}].eps", g["eps"])
    if "weight_decay" in g:
        check_positive(f"param_groups[{i}].weight_decay", g["weight_decay"], allow_zero=True)
    if "betas" in g:
        check_betas(f"param_groups[{i}].betas", g["betas"])


class VIOptimizer(Optimizer):
    """Base class: counters, the averaged dual vector, per-group learning rates.

    Parameter groups (for example one per player) may set their own ``lr`` (and, for the Adam
    variants, ``betas``/``eps``/``weight_decay``); everything global to the iteration (counters,
    the adaptive step-size sums, the iteration ``t``) lives in the first group, :attr:`group`.
    The dual vector is always the whole operator: one exchange averages every group's gradients.

    torch.optim habits that hold here (``tests/test_optim_contract.py`` checks each on every
    registered variant):

    * ``lr`` may be ``0`` (the step does not move) or a one-element tensor (read at its value);
      every group's ``lr`` is validated at each step *before* the exchange.
    * A parameter whose ``.grad`` is ``None`` at a call is skipped, as torch does: it does not move
      and its state (moments, dual sums) is untouched, so a parameter that never receives a
      gradient never moves.  It still takes part in the exchange as zeros, so every worker
      exchanges vectors of the same shape (the set of parameters with a gradient must be the
      same on every worker, as under DDP).  A step where no parameter has a gradient does
      nothing (no exchange, counters unchanged).
    * Parameters changed outside the optimizer (loaded weights, clipping, a hand-set value) are
      kept: every step moves from the parameter as it is (dual-averaging methods re-anchor, see
      :mod:`qoda.optim.dual_averaging`).
    * ``weight_decay`` is taken by the Adam variants only (others refuse a non-zero value in any
      group); complex parameters only by the methods whose update is linear in the gradient
      (:attr:`supports_complex`); both are refused at construction, naming the group.
    * ``copy.deepcopy`` and ``pickle`` give an optimizer that steps identically, without the
      averager (see :class:`DetachedAverager`).
    """

    #: whether complex parameters are accepted (updates linear in the gradient: GDA, EG, OG)
    supports_complex = False
    #: oracle calls = exchanges per iteration (:class:`TwoCallOptimizer`: 2); the registry and the
    #: trainer read it here
    calls_per_iteration: ClassVar[int] = 1

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], averager: Averager | None) -> None:
        self._initialised = False
        super().__init__(params, {**defaults, **dict.fromkeys(COUNTERS, 0), "t": 0})
        self.averager = averager
        self._initialised = True

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param groups) and whether an averager was attached;
        the averager itself is not copied (:class:`DetachedAverager`)."""
        return {**super().__getstate__(), "averager": None if self.averager is None else DetachedAverager()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._initialised = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` plus validation and this optimizer's per-parameter state."""
        i = len(self.param_groups)
        check_group(i, param_group)
        if "weight_decay" not in self.defaults and param_group.get("weight_decay", 0) != 0:
            raise ValueError(
                f"param_groups[{i}].weight_decay: {type(self).__name__} takes no weight decay "
                "(only adam, optimistic_adam and extra_adam do); remove it or set it to 0"
            )
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        for j, p in enumerate(g["params"]):
            if p.is_complex() and not self.supports_complex:
                self.param_groups.pop()
                raise ValueError(
                    f"param_groups[{i}].params[{j}]: complex parameter (shape {tuple(p.shape)}) not supported by "
                    f"{type(self).__name__}; optimise its real and imaginary parts as real tensors (or use gda/eg/og)"
                )
        if self._initialised:
            for p in g["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        """Per-parameter state a subclass needs before its first step (anchors, dual sums)."""

    def _check_lrs(self) -> None:
        """Validate every group's ``lr`` (a scheduler or a user may have written it); called at the
        start of every step, before the exchange, so a bad value changes nothing."""
        for i, g in enumerate(self.param_groups):
            check_lr(f"param_groups[{i}].lr", g["lr"])

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
        """The learning rate of every parameter, in :attr:`params` order (as floats)."""
        return [lr_value(g["lr"]) for g in self.param_groups for _ in g["params"]]

    @property
    def counters(self) -> dict[str, int]:
        return {k: self.group[k] for k in COUNTERS}

    def _dual(self) -> list[torch.Tensor | None] | None:
        """The averaged dual vector at the current point: one oracle call, one exchange.

        Entries follow :attr:`params`; a parameter without ``.grad`` is exchanged as zeros (same
        shape on every worker) and its entry is ``None`` (it is skipped).  ``None`` when no
        parameter has a gradient: then nothing is exchanged or counted."""
        params = self.params
        if not any(p.grad is not None for p in params):
            return None
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        if self.averager is not None:  # integer parameters cannot have gradients: not exchanged
            exchanged = [v for v, p in zip(grads, params, strict=True) if p.is_floating_point() or p.is_complex()]
            stats = self.averager.average_(exchanged, self.group["exchanges"])
            self.group["bits_sent"] += int(stats.payload_bits)
        self.group["oracle_calls"] += 1
        self.group["exchanges"] += 1
        return [None if p.grad is None else v for v, p in zip(grads, params, strict=True)]

    @staticmethod
    def _sq(vs: Iterable[torch.Tensor]) -> float:
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
    taken between them resumes exactly.  A parameter without gradient at ``extrapolation()``
    stays at ``X_t``; one without gradient at ``step()`` returns to ``X_t``.
    """

    calls_per_iteration: ClassVar[int] = 2

    def extrapolation(self) -> None:
        if self.group.get("extrapolated", False):
            raise RuntimeError("extrapolation() called twice without step()")
        self._check_lrs()
        with torch.no_grad():
            for p in self.params:
                self.state[p]["x_t"] = p.detach().clone()
            v = self._dual()
            if v is not None:
                self._extrapolate(v)
        self.group["extrapolated"] = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = None
        if closure is not None:
            self._call(closure)
            self.extrapolation()
            loss = self._call(closure)
        if not self.group.get("extrapolated", False):
            raise RuntimeError("step(): call extrapolation() first (or pass a closure)")
        with torch.no_grad():
            v = self._dual()
            if v is None:  # no gradient at all: the iteration does not count, X_t is kept
                for p in self.params:
                    self._back_to_x_t(p)
            else:
                self._update(v)
        self.group["extrapolated"] = False
        if v is not None:
            self.group["t"] += 1
        return loss

    def _back_to_x_t(self, p: torch.Tensor) -> None:
        """Put ``p`` back at the iteration's starting point (a parameter skipped by :meth:`_update`)."""
        p.copy_(self.state[p]["x_t"])

    def _extrapolate(self, v: list[torch.Tensor | None]) -> None:
        raise NotImplementedError

    def _update(self, v: list[torch.Tensor | None]) -> None:
        raise NotImplementedError
